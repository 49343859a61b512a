"""A tokenizer: text <-> token ids, built from an HF directory or from GGUF metadata.

`Tokenizer` wraps a `tokenizers.Tokenizer` (the Rust backend) together with the few
facts the backend does not carry itself: the BOS/EOS ids and whether `encode` prepends
BOS / appends EOS. Those flags are applied by `encode`, never by the backend's
post-processor, so a tokenizer built from either source behaves the same way and
`to_json()` / `from_json()` round-trip it exactly (e.g. into a checkpoint).

From a GGUF file, only llama.cpp's byte-level BPE vocabularies (`tokenizer.ggml.model`
= "gpt2") are rebuilt; the pre-tokenizer is chosen by `tokenizer.ggml.pre` with the
same splitting rules llama.cpp applies (see `GGUF_PRE_TOKENIZERS`).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

__all__ = ["Tokenizer", "GGUF_PRE_TOKENIZERS"]

_JSON_FORMAT = "jaxcirc.tokenizer/1"

# llama.cpp's token_type values (gguf.TokenType).
_CONTROL = 3
_USER_DEFINED = 4

# Split patterns of the HF tokenizer.json files these vocabularies were trained with
# (llama.cpp uses equivalent hand-adapted spellings of the same regexes).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# `tokenizer.ggml.pre` value -> pre-tokenizer family. Families:
#   "gpt2":        GPT-2's regex (ByteLevel's built-in one).
#   "digits+gpt2": every digit split off on its own first, then GPT-2's regex.
#   "llama3":      Llama 3's regex; merges ignored for words that are whole tokens.
#   "qwen2":       Qwen2's regex (single digits).
GGUF_PRE_TOKENIZERS: dict[str, str] = {
    **dict.fromkeys(["gpt2", "gpt-2", "mpt", "olmo", "jais"], "gpt2"),
    **dict.fromkeys(
        ["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"], "digits+gpt2"
    ),
    **dict.fromkeys(
        ["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"], "llama3"
    ),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "stablelm2"], "qwen2"),
}


@functools.lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (256 entries)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    # Bytes without a printable glyph get code points from 256 upwards, in byte order.
    next_code = 256
    for b in range(256):
        if b not in table:
            table[b] = chr(next_code)
            next_code += 1
    return table


def _byte_level_spelling(token: str) -> str:
    """`token` in the byte-level alphabet (unchanged when it already is spelled that way)."""
    table = _byte_alphabet()
    alphabet = set(table.values())
    if set(token) <= alphabet:
        return token
    return "".join(table[b] for b in token.encode("utf-8"))


def _gguf_tokenizer_metadata(source: Any) -> dict[str, Any]:
    """The `tokenizer.*` metadata of a GGUF path, `gguf.GGUFReader` or metadata mapping."""
    if isinstance(source, Mapping):
        return dict(source)
    if isinstance(source, (str, os.PathLike)):
        import gguf

        source = gguf.GGUFReader(os.fspath(source))
    fields = getattr(source, "fields", None)
    if fields is None:
        raise TypeError(
            f"Tokenizer.from_gguf expects a .gguf path, a gguf.GGUFReader or a metadata dict; got {type(source)!r}."
        )
    return {key: field.contents() for key, field in fields.items() if key.startswith("tokenizer.")}


def _special_token_content(value: Any) -> str | None:
    """The text of a special token as tokenizer_config.json spells it (a str or an AddedToken dict)."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


class Tokenizer:
    """Text <-> token ids. Construct with `from_file`, `from_gguf` or `from_json`."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        add_bos: bool = False,
        add_eos: bool = False,
        chat_template: str | None = None,
    ) -> None:
        if add_bos and bos_token_id is None:
            raise ValueError("add_bos=True needs a bos_token_id; pass one or set add_bos=False.")
        if add_eos and eos_token_id is None:
            raise ValueError("add_eos=True needs an eos_token_id; pass one or set add_eos=False.")
        self._backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.add_bos = bool(add_bos)
        self.add_eos = bool(add_eos)
        self.chat_template = chat_template
        # A token that decodes to plain text, put in front of a token in `token_str` so that
        # decoders that strip a leading space from the first token (sentencepiece) keep it.
        self._anchor_id = backend.token_to_id("a")

    # ----------------------------------------------------------------- construction

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> "Tokenizer":
        """From an HF `tokenizer.json` (or a directory holding one).

        BOS/EOS come from `tokenizer_config.json`, else `special_tokens_map.json`, else
        `config.json`; `add_bos_token` / `add_eos_token` from `tokenizer_config.json`, else
        from what the tokenizer.json post-processor does.
        """
        path = Path(path).expanduser()
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(
                f"No tokenizer.json at {file}. Pass an HF model directory that contains tokenizer.json "
                "(or the file itself); a GGUF file carries its tokenizer in its metadata instead."
            )
        backend = tokenizers.Tokenizer.from_file(os.fspath(file))
        folder = file.parent
        tok_config = _read_json(folder / "tokenizer_config.json")
        special_map = _read_json(folder / "special_tokens_map.json")
        model_config = _read_json(folder / "config.json")

        def token_id(role: str) -> int | None:
            for source in (tok_config, special_map):
                content = _special_token_content(source.get(f"{role}_token"))
                if content is not None and backend.token_to_id(content) is not None:
                    return backend.token_to_id(content)
            value = model_config.get(f"{role}_token_id")
            if isinstance(value, list):  # e.g. Llama 3.1 lists several EOS ids; the first is the main one
                value = value[0] if value else None
            return value if isinstance(value, int) else None

        bos, eos, pad = token_id("bos"), token_id("eos"), token_id("pad")

        # What the post-processor adds, to honour tokenizer.json when the config is silent.
        probe_plain = backend.encode("a", add_special_tokens=False).ids
        probe_full = backend.encode("a", add_special_tokens=True).ids
        post_adds_bos = bos is not None and probe_full[:1] == [bos] and probe_plain[:1] != [bos]
        post_adds_eos = eos is not None and probe_full[-1:] == [eos] and probe_plain[-1:] != [eos]
        add_bos = tok_config.get("add_bos_token", post_adds_bos)
        add_eos = tok_config.get("add_eos_token", post_adds_eos)
        chat_template = tok_config.get("chat_template")
        return cls(
            backend,
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=pad,
            add_bos=bool(add_bos) and bos is not None,
            add_eos=bool(add_eos) and eos is not None,
            chat_template=chat_template if isinstance(chat_template, str) else None,
        )

    @classmethod
    def from_gguf(cls, source: Any) -> "Tokenizer":
        """From GGUF metadata: a `.gguf` path, a `gguf.GGUFReader`, or a dict of metadata
        values keyed by GGUF key (e.g. `{"tokenizer.ggml.tokens": [...], ...}`).

        Supports byte-level BPE vocabularies (`tokenizer.ggml.model == "gpt2"`) with the
        `tokenizer.ggml.pre` values listed in `GGUF_PRE_TOKENIZERS`.
        """
        meta = _gguf_tokenizer_metadata(source)
        model = meta.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(
                f"Cannot build a tokenizer from GGUF tokenizer model {model!r}: jaxcirc rebuilds only byte-level "
                "BPE vocabularies ('gpt2', used by GPT-2, Llama 3, Qwen2, SmolLM, ...). Load the model from its HF "
                "directory (with tokenizer.json) instead."
            )
        pre = meta.get("tokenizer.ggml.pre", "gpt2")
        family = GGUF_PRE_TOKENIZERS.get(pre)
        if family is None:
            raise ValueError(
                f"Unsupported GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre). Supported: "
                f"{', '.join(sorted(GGUF_PRE_TOKENIZERS))}. Load the model from its HF directory (with "
                "tokenizer.json) instead, or add the pre-tokenizer to jaxcirc.tokenizer.GGUF_PRE_TOKENIZERS."
            )
        tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
        if "tokenizer.ggml.merges" not in meta:
            raise ValueError("GGUF tokenizer metadata has no tokenizer.ggml.merges; a byte-level BPE needs them.")
        types: Sequence[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)

        # Control and user-defined tokens are matched on raw text, so they keep the file's
        # spelling; ordinary tokens must be spelled in the byte alphabet for BPE.
        vocab: dict[str, int] = {}
        for index, (token, kind) in enumerate(zip(tokens, types)):
            spelled = token if kind in (_CONTROL, _USER_DEFINED) else _byte_level_spelling(token)
            vocab.setdefault(spelled, index)
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
        bpe = models.BPE(vocab=vocab, merges=merges, ignore_merges=(family == "llama3"))
        backend = tokenizers.Tokenizer(bpe)
        backend.pre_tokenizer = _gguf_pre_tokenizer(family)
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == _CONTROL]
        )
        backend.add_tokens(
            [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == _USER_DEFINED]
        )

        def opt_id(key: str) -> int | None:
            value = meta.get(key)
            return int(value) if value is not None else None

        bos, eos = opt_id("tokenizer.ggml.bos_token_id"), opt_id("tokenizer.ggml.eos_token_id")
        # llama.cpp's default when the file does not say: BOS only for the Llama 3 family.
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", family == "llama3"))
        add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
        template = meta.get("tokenizer.chat_template")
        return cls(
            backend,
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=opt_id("tokenizer.ggml.padding_token_id"),
            add_bos=add_bos and bos is not None,
            add_eos=add_eos and eos is not None,
            chat_template=template if isinstance(template, str) else None,
        )

    @classmethod
    def from_json(cls, text: str) -> "Tokenizer":
        """Inverse of `to_json`."""
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != _JSON_FORMAT:
            raise ValueError(
                f"Not a serialized jaxcirc tokenizer (expected format {_JSON_FORMAT!r}); "
                "was it written by Tokenizer.to_json()?"
            )
        return cls(
            tokenizers.Tokenizer.from_str(data["backend"]),
            bos_token_id=data.get("bos_token_id"),
            eos_token_id=data.get("eos_token_id"),
            pad_token_id=data.get("pad_token_id"),
            add_bos=data.get("add_bos", False),
            add_eos=data.get("add_eos", False),
            chat_template=data.get("chat_template"),
        )

    def to_json(self) -> str:
        """Everything needed to rebuild this tokenizer, as one JSON string."""
        return json.dumps(
            {
                "format": _JSON_FORMAT,
                "bos_token_id": self.bos_token_id,
                "eos_token_id": self.eos_token_id,
                "pad_token_id": self.pad_token_id,
                "add_bos": self.add_bos,
                "add_eos": self.add_eos,
                "chat_template": self.chat_template,
                "backend": self._backend.to_str(),
            }
        )

    # ----------------------------------------------------------------- use

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped `tokenizers.Tokenizer`."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added/special tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def _wrap(self, ids: list[int], add_bos: bool | None) -> list[int]:
        if self.add_bos if add_bos is None else add_bos:
            if self.bos_token_id is None:
                raise ValueError("add_bos=True but this tokenizer has no BOS token.")
            ids = [self.bos_token_id, *ids]
        if self.add_eos:
            ids = [*ids, self.eos_token_id]
        return ids

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text` ([len]); BOS/EOS added as the model's metadata says
        unless `add_bos` overrides. Special-token text (e.g. "<|im_start|>") maps to its id."""
        return self._wrap(self._backend.encode(text, add_special_tokens=False).ids, add_bos)

    def encode_batch(self, texts: Iterable[str], *, add_bos: bool | None = None) -> list[list[int]]:
        """`encode` for many texts at once (unpadded, one list per text)."""
        encodings = self._backend.encode_batch(list(texts), add_special_tokens=False)
        return [self._wrap(e.ids, add_bos) for e in encodings]

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Text of a sequence of token ids."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_str(self, token_id: int) -> str:
        """The text one token stands for, leading space included (e.g. " Paris")."""
        token_id = int(token_id)
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"Token id {token_id} is out of range for a vocabulary of {self.vocab_size}.")
        if self._anchor_id is not None:
            anchor = self.decode([self._anchor_id])
            both = self.decode([self._anchor_id, token_id])
            if anchor and both.startswith(anchor):
                return both[len(anchor):]
        return self.decode([token_id])

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry (raw spelling, e.g. "ĠParis") of an id."""
        return self._backend.id_to_token(int(token_id))

    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary entry in its raw spelling, or None."""
        return self._backend.token_to_id(token)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos_token_id={self.bos_token_id}, "
            f"eos_token_id={self.eos_token_id}, add_bos={self.add_bos})"
        )


def _gguf_pre_tokenizer(family: str) -> pre_tokenizers.PreTokenizer:
    """The `tokenizers` pre-tokenizer for one of the families in `GGUF_PRE_TOKENIZERS`."""
    if family == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if family == "digits+gpt2":
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    split = {"llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}[family]
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
