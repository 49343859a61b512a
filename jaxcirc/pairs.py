"""Minimal pairs: clean and corrupted prompts of equal token length, with an answer and a foil.

    pairs = from_tokens([[5, 6, 7], [5, 8]], [[5, 9, 7], [5, 3]], answer=[11, 12], foil=[13, 14])
    pairs, report = from_jsonl("pairs.jsonl", model.tokenizer, on_error="skip")

Every example of a batch is right-padded to the longest one; `position` is where the metric
is read (the last real token of each example) and `mask` marks the real tokens. Because the
clean and corrupted prompt of a pair have the same length, position `p` means the same slot in
both runs, which is what makes position-wise patching well defined.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from jaxcirc.sharding import to_host

Array = jax.Array
OnError = Literal["raise", "skip"]

FIELDS = ("clean", "corrupt", "answer", "foil")


class TokenizerLike(Protocol):
    """What pairs need of a tokenizer (`jaxcirc.tokenizer.Tokenizer` has it)."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def token_str(self, token_id: int) -> str: ...


class PairError(ValueError):
    """A pair that cannot be used; the message names it (index and texts)."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MinimalPairs:
    """A batch of minimal pairs. Every field is an array (a pytree leaf), so a batch passes
    through `jax.jit` / `jax.vmap` as data.

    clean, corrupt: int32 [batch, pos], right-padded; equal real length per example.
    answer, foil:   int32 [batch] single-token ids (metric: answer vs foil).
    position:       int32 [batch] where the metric is read (the last real token).
    mask:           bool [batch, pos], True at real (non-padding) tokens.
    """

    clean: Array
    corrupt: Array
    answer: Array
    foil: Array
    position: Array
    mask: Array

    def __len__(self) -> int:
        return int(self.clean.shape[0])

    @property
    def n_pos(self) -> int:
        """Padded sequence length."""
        return int(self.clean.shape[1])

    @property
    def lengths(self) -> Array:
        """int32 [batch] number of real tokens of each example."""
        return self.mask.sum(axis=1).astype(jnp.int32)

    def shared_prefix(self) -> int:
        """How many leading positions every pair's clean and corrupted tokens agree at (n_pos when
        they agree everywhere). With causal attention every activation there is the same in both
        runs. Reads the tokens on the host (gathered from every process when the batch is
        sharded across processes): call it outside jit."""
        differs = np.any(to_host(self.clean) != to_host(self.corrupt), axis=0)
        return int(np.argmax(differs)) if differs.any() else self.n_pos

    def take(self, indices: Any) -> "MinimalPairs":
        """The pairs at `indices` (ints or a bool mask over the batch), in that order."""
        idx = np.asarray(indices)
        if idx.dtype == bool:
            if idx.shape != (len(self),):
                raise ValueError(f"Boolean selection has shape {idx.shape}; expected ({len(self)},).")
            idx = np.nonzero(idx)[0]
        idx = idx.astype(np.int64).reshape(-1)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"Pair index out of range for {len(self)} pairs: {idx.tolist()}.")
        return jax.tree.map(lambda a: _index(a, idx), self)

    def __getitem__(self, key: Any) -> "MinimalPairs":
        """`pairs[2:5]`, `pairs[[0, 3]]`, `pairs[3]` (a batch of one)."""
        if isinstance(key, slice):
            return self.take(np.arange(len(self))[key])
        if isinstance(key, (int, np.integer)):
            return self.take([key])
        return self.take(key)

    def batches(self, size: int, drop_last: bool = False) -> Iterator["MinimalPairs"]:
        """Consecutive batches of `size` pairs (the last one smaller unless `drop_last`)."""
        if size < 1:
            raise ValueError(f"Batch size must be at least 1, got {size}.")
        for start in range(0, len(self), size):
            if drop_last and start + size > len(self):
                return
            yield self[start:start + size]

    def trim(self) -> "MinimalPairs":
        """Drop padding columns that no example uses (after `take`, the longest pair may be gone)."""
        keep = max(int(np.asarray(self.lengths).max(initial=1)), 1)
        if keep == self.n_pos:
            return self
        cols = np.s_[:, :keep]
        return dataclasses.replace(self, clean=_index(self.clean, cols), corrupt=_index(self.corrupt, cols),
                                   mask=_index(self.mask, cols))


def _index(array: Any, index: Any) -> Any:
    """Index on the host when the array is concrete (no XLA compilation per new shape)."""
    if isinstance(array, jax.core.Tracer):
        return array[index]
    return jax.device_put(np.asarray(array)[index])


def _as_id_rows(tokens: Any, what: str) -> list[list[int]]:
    """A [batch, pos] array or a list of per-example id lists -> list of int lists."""
    if isinstance(tokens, (np.ndarray, jax.Array)):
        array = np.asarray(tokens)
        if array.ndim != 2:
            raise ValueError(f"`{what}` must be [batch, pos] token ids, got shape {array.shape}.")
        return [[int(t) for t in row] for row in array]
    rows = []
    for i, row in enumerate(tokens):
        row = np.asarray(row)
        if row.ndim != 1:
            raise ValueError(f"`{what}` pair {i}: expected a list of token ids, got shape {row.shape}.")
        if row.size and not np.issubdtype(row.dtype, np.integer):
            raise ValueError(f"`{what}` pair {i}: token ids must be integers, got dtype {row.dtype}.")
        rows.append([int(t) for t in row])
    return rows


def _single_ids(values: Any, what: str, n: int) -> list[int]:
    """Answer/foil ids: ints, or one-element id lists (anything longer is refused)."""
    if isinstance(values, (np.ndarray, jax.Array)) and np.asarray(values).ndim == 1:
        values = np.asarray(values).tolist()
    values = list(values)
    if len(values) != n:
        raise ValueError(f"`{what}` has {len(values)} entries but there are {n} pairs.")
    out = []
    for i, v in enumerate(values):
        ids = np.asarray(v).reshape(-1)
        if ids.size != 1:
            raise PairError(f"Pair {i}: {what} must be a single token, got {ids.size} ids {ids.tolist()}.")
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"Pair {i}: {what} id must be an integer, got {ids.tolist()}.")
        out.append(int(ids[0]))
    return out


def from_tokens(clean: Any, corrupt: Any, answer: Any, foil: Any, pad_id: int = 0,
                lengths: Any = None) -> MinimalPairs:
    """Minimal pairs from token ids.

    clean, corrupt: [batch, pos] arrays or lists of per-example id lists (mixed lengths are
    right-padded with `pad_id`); answer, foil: [batch] ids (or one-element lists).
    A [batch, pos] array is taken as all real tokens unless `lengths` [batch] says otherwise.
    Raises PairError naming the pair if clean and corrupt lengths differ or an answer is not one token.
    """
    clean_rows, corrupt_rows = _as_id_rows(clean, "clean"), _as_id_rows(corrupt, "corrupt")
    n = len(clean_rows)
    if n == 0:
        raise ValueError("No pairs given: clean is empty.")
    if len(corrupt_rows) != n:
        raise ValueError(f"clean has {n} examples but corrupt has {len(corrupt_rows)}.")
    if lengths is not None:
        lengths = [int(x) for x in np.asarray(lengths).reshape(-1)]
        if len(lengths) != n:
            raise ValueError(f"`lengths` has {len(lengths)} entries but there are {n} pairs.")
        for i, (length, row) in enumerate(zip(lengths, clean_rows)):
            if not 1 <= length <= len(row):
                raise ValueError(f"Pair {i}: length {length} is not in 1..{len(row)}.")
        clean_rows = [row[:length] for row, length in zip(clean_rows, lengths)]
        corrupt_rows = [row[:length] for row, length in zip(corrupt_rows, lengths)]
    for i, (c, k) in enumerate(zip(clean_rows, corrupt_rows)):
        if len(c) != len(k):
            raise PairError(
                f"Pair {i}: clean has {len(c)} tokens but corrupt has {len(k)}; a minimal pair needs "
                f"equal lengths so that positions line up (clean={c}, corrupt={k})."
            )
        if len(c) == 0:
            raise PairError(f"Pair {i}: the prompts are empty.")
    answers, foils = _single_ids(answer, "answer", n), _single_ids(foil, "foil", n)
    width = max(len(r) for r in clean_rows)
    clean_arr = np.full((n, width), pad_id, np.int32)
    corrupt_arr = np.full((n, width), pad_id, np.int32)
    mask = np.zeros((n, width), bool)
    for i, (c, k) in enumerate(zip(clean_rows, corrupt_rows)):
        clean_arr[i, :len(c)], corrupt_arr[i, :len(k)], mask[i, :len(c)] = c, k, True
    return MinimalPairs(
        clean=jax.device_put(clean_arr), corrupt=jax.device_put(corrupt_arr),
        answer=jax.device_put(np.array(answers, np.int32)), foil=jax.device_put(np.array(foils, np.int32)),
        position=jax.device_put(mask.sum(1).astype(np.int32) - 1), mask=jax.device_put(mask),
    )


@dataclasses.dataclass(frozen=True)
class PairsReport:
    """What building pairs from texts kept and skipped.

    kept: indices (into the input records) of the pairs in the batch, in order.
    skipped: (index, reason code, message) for each refused pair.
    """

    total: int
    kept: tuple[int, ...]
    skipped: tuple[tuple[int, str, str], ...]

    @property
    def n_kept(self) -> int:
        return len(self.kept)

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

    @property
    def reasons(self) -> dict[str, int]:
        """Reason code -> number of pairs skipped for it."""
        return dict(Counter(code for _, code, _ in self.skipped))

    def summary(self) -> str:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.reasons.items())) or "none"
        return f"{self.n_kept} of {self.total} pairs kept; skipped {self.n_skipped} ({reasons})."


def _encode_without_bos(tokenizer: TokenizerLike, text: str) -> list[int]:
    """Answers are continuations, so a tokenizer that prepends BOS must not do so here."""
    try:
        accepts_flag = "add_bos" in inspect.signature(tokenizer.encode).parameters
    except (TypeError, ValueError):
        accepts_flag = False
    return list(tokenizer.encode(text, add_bos=False) if accepts_flag else tokenizer.encode(text))


def _describe(index: int, record: Mapping[str, Any], where: str = "") -> str:
    texts = ", ".join(f"{k}={record.get(k)!r}" for k in FIELDS if k in record)
    return f"Pair {index}{where} ({texts})"


def _check_record(tokenizer: TokenizerLike, index: int, record: Any, where: str = ""):
    """(clean ids, corrupt ids, answer id, foil id) or raise PairError with a reason code."""
    if not isinstance(record, Mapping):
        raise _coded(PairError(f"Pair {index}{where}: expected an object with keys {list(FIELDS)}, "
                               f"got {type(record).__name__}."), "bad_record")
    missing = [k for k in FIELDS if not isinstance(record.get(k), str)]
    if missing:
        raise _coded(PairError(f"{_describe(index, record, where)}: missing or non-text field(s) "
                               f"{missing}; each pair needs {list(FIELDS)} as strings."), "missing_field")
    clean = list(tokenizer.encode(record["clean"]))
    corrupt = list(tokenizer.encode(record["corrupt"]))
    if not clean:
        raise _coded(PairError(f"{_describe(index, record, where)}: the clean prompt has no tokens."), "empty")
    if len(clean) != len(corrupt):
        raise _coded(PairError(
            f"{_describe(index, record, where)}: clean has {len(clean)} tokens but corrupt has "
            f"{len(corrupt)}; rephrase so that both tokenize to the same length."), "length_mismatch")
    ids = {}
    for field in ("answer", "foil"):
        tokens = _encode_without_bos(tokenizer, record[field])
        if len(tokens) != 1:
            shown = [_token_text(tokenizer, t) for t in tokens]
            raise _coded(PairError(
                f"{_describe(index, record, where)}: {field} {record[field]!r} is {len(tokens)} tokens "
                f"{shown}, not one; pick a single-token {field} (mind the leading space)."),
                f"{field}_not_single_token")
        ids[field] = tokens[0]
    return clean, corrupt, ids["answer"], ids["foil"]


def _token_text(tokenizer: TokenizerLike, token_id: int) -> str:
    try:
        return tokenizer.token_str(token_id)
    except Exception:  # a display nicety only
        return str(token_id)


def _coded(error: PairError, code: str) -> PairError:
    error.code = code
    return error


def _build(tokenizer: TokenizerLike, items: Iterable[tuple[int, Any, str]], on_error: OnError,
           pad_id: int | None) -> tuple[MinimalPairs, PairsReport]:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}.")
    rows, kept, skipped, total = [], [], [], 0
    for index, record, where in items:
        total += 1
        try:
            rows.append(_check_record(tokenizer, index, record, where))
            kept.append(index)
        except PairError as error:
            if on_error == "raise":
                raise
            skipped.append((index, getattr(error, "code", "invalid"), str(error)))
    report = PairsReport(total=total, kept=tuple(kept), skipped=tuple(skipped))
    if not rows:
        detail = f" First problem: {skipped[0][2]}" if skipped else ""
        raise ValueError(f"No usable pairs: {report.summary()}{detail}")
    if pad_id is None:
        pad_id = getattr(tokenizer, "pad_id", None)
        pad_id = 0 if pad_id is None else int(pad_id)
    clean, corrupt, answer, foil = zip(*rows)
    return from_tokens(list(clean), list(corrupt), list(answer), list(foil), pad_id=pad_id), report


def from_texts(tokenizer: TokenizerLike, records: Sequence[Mapping[str, str]], on_error: OnError = "raise",
               pad_id: int | None = None) -> tuple[MinimalPairs, PairsReport]:
    """Minimal pairs from `{"clean", "corrupt", "answer", "foil"}` text records.

    Prompts are encoded with `tokenizer.encode` (its own BOS rule); answers are encoded as given
    (e.g. " Paris") without BOS and must be one token. A pair whose clean/corrupt lengths differ
    or whose answer/foil is not a single token raises PairError naming it (index and texts), or,
    with on_error="skip", is left out and counted in the report.
    """
    return _build(tokenizer, ((i, r, "") for i, r in enumerate(records)), on_error, pad_id)


def from_jsonl(path: str | Path, tokenizer: TokenizerLike, on_error: OnError = "raise",
               pad_id: int | None = None) -> tuple[MinimalPairs, PairsReport]:
    """Minimal pairs from a JSON-lines file, one `{"clean", "corrupt", "answer", "foil"}` object
    per line (blank lines ignored). Pair indices count records; messages also give the line."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Pairs file {path} does not exist.")

    def records():
        index = 0
        for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({error.msg}); each line must be "
                                 f"one object with keys {list(FIELDS)}.") from None
            yield index, record, f" (line {line_no} of {path.name})"
            index += 1

    return _build(tokenizer, records(), on_error, pad_id)
