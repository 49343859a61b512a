"""Tokenizer: GGUF metadata and HF directories, parity with transformers, serialization."""

from __future__ import annotations

import json

import pytest

gguf = pytest.importorskip("gguf")

from jaxcirc.tokenizer import GGUF_PRE_TOKENIZERS, Tokenizer  # noqa: E402

TEXTS = [
    "The capital of France is",
    "in 2024 there were 12345 cats",
    " leading space",
    "  two spaces and trailing ",
    "line1\nline2\n\nline4\r\n",
    "héllo wörld 日本語 🙂 naïve café",
    "x=3.14159; y = 42 -> f(x) // 7",
    "<|im_start|>user\nhi<|im_end|>",
    "Don't you'll I'M THEY'RE",
    "\t tab\tseparated",
    "1,000,000 and 9.99%",
    "",
]


@pytest.fixture(scope="module")
def reader(smollm_path):
    return gguf.GGUFReader(smollm_path)  # about 2 s: it parses all 100k vocabulary strings


@pytest.fixture(scope="module")
def metadata(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


@pytest.fixture(scope="module")
def tok(metadata) -> Tokenizer:
    return Tokenizer.from_gguf(metadata)


@pytest.fixture(scope="module")
def hf_tok(smollm_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(smollm_path.parent, gguf_file=smollm_path.name)


def test_capital_of_france(tok):
    assert tok.encode("The capital of France is") == [504, 3575, 282, 4649, 314]


def test_metadata_facts(tok):
    assert tok.vocab_size == 49152
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    assert tok.add_bos is False  # tokenizer.ggml.add_bos_token = false in this file
    assert tok.chat_template and "<|im_start|>" in tok.chat_template


@pytest.mark.parametrize("text", TEXTS)
def test_matches_transformers_gguf_tokenizer(tok, hf_tok, text):
    assert tok.encode(text) == hf_tok(text, add_special_tokens=True)["input_ids"]


def test_digits_after_several_spaces_follow_llamacpp(tok):
    # Where transformers' GGUF tokenizer and llama.cpp disagree, we follow llama.cpp (and SmolLM's own
    # tokenizer.json): every digit is split off first, so "  " before "123" stays one "ĠĠ" token (256).
    # transformers 5.24 keeps GPT-2's " ?\p{N}+" split instead and gives [81, 216, 216, 33, 34, 35, 216, 278].
    assert tok.encode("a  123  b") == [81, 256, 33, 34, 35, 216, 278]


def test_same_pretokenizer_families_as_transformers(metadata):
    """The gpt2 / llama3 / qwen2 families split text exactly like transformers' GGUF converter."""
    pytest.importorskip("transformers")
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    for pre in ("gpt2", "llama-bpe", "qwen2"):
        meta = dict(metadata, **{"tokenizer.ggml.pre": pre})
        ours = Tokenizer.from_gguf(meta)
        reference, _ = convert_gguf_tokenizer("llama", {
            "tokenizer_type": "gpt2", "pre_tokenizer_type": pre, "tokens": meta["tokenizer.ggml.tokens"],
            "merges": meta["tokenizer.ggml.merges"], "token_type": meta["tokenizer.ggml.token_type"],
        })
        for text in TEXTS + ["a  123  b", "HELLO's   world\r\n\r\nfoo"]:
            assert ours.encode(text) == reference.encode(text, add_special_tokens=False).ids, (pre, text)


def test_llama3_family_adds_bos_by_default(metadata):
    meta = {k: v for k, v in metadata.items() if k != "tokenizer.ggml.add_bos_token"}
    assert Tokenizer.from_gguf(dict(meta, **{"tokenizer.ggml.pre": "llama-bpe"})).add_bos is True
    assert Tokenizer.from_gguf(dict(meta, **{"tokenizer.ggml.pre": "qwen2"})).add_bos is False


def test_bos_override_and_batch(tok):
    assert tok.encode("Hi", add_bos=True) == [1, *tok.encode("Hi")]
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
    assert tok.encode_batch(["a", "b c"], add_bos=True)[1][0] == 1


def test_decode_and_token_str(tok):
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    paris = tok.encode(" Paris")
    assert len(paris) == 1
    assert tok.token_str(paris[0]) == " Paris"
    assert tok.id_to_token(paris[0]) == "ĠParis"
    assert tok.token_str(504) == "The"
    assert tok.token_str(1) == "<|im_start|>"
    assert tok.decode([1, 4093, 2], skip_special_tokens=True) == "user"
    with pytest.raises(ValueError, match="out of range"):
        tok.token_str(49152)


def test_token_str_keeps_sentencepiece_leading_space():
    """Metaspace decoders drop the space of a text's first token; token_str must keep it."""
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers

    backend = Backend(models.WordLevel({"a": 0, "\u2581Paris": 1, "\u2581a": 2, "<unk>": 3}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    backend.decoder = decoders.Metaspace(prepend_scheme="first")
    tok = Tokenizer(backend)
    assert tok.decode([1]) == "Paris"
    assert tok.token_str(1) == " Paris"
    assert tok.token_str(0) == "a"


def test_json_round_trip(tok):
    text = tok.to_json()
    again = Tokenizer.from_json(text)
    for t in TEXTS:
        assert again.encode(t) == tok.encode(t)
    assert (again.bos_token_id, again.eos_token_id, again.add_bos, again.vocab_size) == (1, 2, False, 49152)
    assert again.chat_template == tok.chat_template
    with pytest.raises(ValueError, match="to_json"):
        Tokenizer.from_json(json.dumps({"format": "something else"}))


def test_from_gguf_accepts_a_reader(reader, tok):
    assert Tokenizer.from_gguf(reader).encode("Hello world") == tok.encode("Hello world")


def test_from_file_hf_directory_written_by_transformers(hf_tok, tok, tmp_path):
    hf_tok.save_pretrained(tmp_path)
    loaded = Tokenizer.from_file(tmp_path)
    for text in TEXTS + ["a  123  b"]:
        assert loaded.encode(text) == hf_tok(text)["input_ids"]
    assert loaded.eos_token_id == hf_tok.eos_token_id
    assert Tokenizer.from_file(tmp_path / "tokenizer.json").encode("Hi there") == tok.encode("Hi there")


def test_from_file_honours_tokenizer_config(tok, tmp_path):
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True,
        "bos_token": {"content": "<|im_start|>", "special": True},
        "eos_token": "<|im_end|>",
    }))
    loaded = Tokenizer.from_file(tmp_path)
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.add_bos) == (1, 2, True)
    assert loaded.encode("The capital of France is") == [1, 504, 3575, 282, 4649, 314]


def test_from_file_detects_bos_from_post_processor(tok, tmp_path):
    from tokenizers import processors

    backend = Tokenizer.from_json(tok.to_json()).backend
    backend.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)]
    )
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<|im_start|>"}))
    loaded = Tokenizer.from_file(tmp_path)
    assert loaded.add_bos is True
    assert loaded.encode("Hi") == [1, *tok.encode("Hi")]  # once, not twice


def test_from_file_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_file(tmp_path)


def test_unsupported_gguf_tokenizers_are_named(metadata):
    with pytest.raises(ValueError, match=r"'made-up'.*smollm"):
        Tokenizer.from_gguf(dict(metadata, **{"tokenizer.ggml.pre": "made-up"}))
    with pytest.raises(ValueError, match="'llama'"):
        Tokenizer.from_gguf(dict(metadata, **{"tokenizer.ggml.model": "llama"}))
    assert {"smollm", "gpt2", "llama-bpe", "qwen2"} <= set(GGUF_PRE_TOKENIZERS)
