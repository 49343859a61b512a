"""Minimal pairs: padding, validation errors that name the pair, skip reports, slicing."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from jaxcirc.pairs import MinimalPairs, PairError, from_jsonl, from_texts, from_tokens


class WordTokenizer:
    """A fake tokenizer: one token per whitespace-separated word, ids assigned on first sight;
    optionally prepends BOS (id 1) like some real tokenizers do."""

    def __init__(self, add_bos: bool = False):
        self.vocab = {"<pad>": 0, "<bos>": 1}
        self.add_bos = add_bos

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        ids = [self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]
        bos = self.add_bos if add_bos is None else add_bos
        return ([1] if bos else []) + ids

    def decode(self, ids) -> str:
        inverse = {i: w for w, i in self.vocab.items()}
        return " ".join(inverse[i] for i in ids)

    def token_str(self, token_id: int) -> str:
        return {i: w for w, i in self.vocab.items()}[token_id]


class PlainTokenizer(WordTokenizer):
    """The same without the add_bos keyword (the minimal interface)."""

    def encode(self, text: str) -> list[int]:  # type: ignore[override]
        return super().encode(text)


RECORDS = [
    {"clean": "When Mary and John went John gave to", "corrupt": "When Mary and John went Mary gave to",
     "answer": " Mary", "foil": " John"},
    {"clean": "The capital of France is", "corrupt": "The capital of Spain is",
     "answer": " Paris", "foil": " Madrid"},
]


def test_from_tokens_right_pads_mixed_lengths():
    pairs = from_tokens([[5, 6, 7], [8, 9]], [[5, 6, 4], [3, 9]], answer=[11, 12], foil=[13, 14], pad_id=99)
    assert isinstance(pairs, MinimalPairs)
    np.testing.assert_array_equal(pairs.clean, [[5, 6, 7], [8, 9, 99]])
    np.testing.assert_array_equal(pairs.corrupt, [[5, 6, 4], [3, 9, 99]])
    np.testing.assert_array_equal(pairs.mask, [[True, True, True], [True, True, False]])
    np.testing.assert_array_equal(pairs.position, [2, 1])
    np.testing.assert_array_equal(pairs.lengths, [3, 2])
    np.testing.assert_array_equal(pairs.answer, [11, 12])
    assert pairs.clean.dtype == np.int32 and pairs.position.dtype == np.int32 and pairs.mask.dtype == bool
    assert len(pairs) == 2 and pairs.n_pos == 3


def test_from_tokens_array_with_lengths():
    clean = np.array([[1, 2, 3], [4, 5, 0]])
    pairs = from_tokens(clean, clean + 1, [1, 2], [[3], [4]], lengths=[3, 2])
    np.testing.assert_array_equal(pairs.position, [2, 1])
    np.testing.assert_array_equal(pairs.corrupt, [[2, 3, 4], [5, 6, 0]])  # padding rewritten with pad_id
    full = from_tokens(clean, clean + 1, [1, 2], [3, 4])
    np.testing.assert_array_equal(full.position, [2, 2])


def test_from_tokens_refuses_length_mismatch_naming_the_pair():
    with pytest.raises(PairError, match=r"Pair 1: clean has 2 tokens but corrupt has 3"):
        from_tokens([[1, 2], [3, 4]], [[1, 2], [3, 4, 5]], [1, 1], [2, 2])


def test_from_tokens_refuses_multi_token_answer():
    with pytest.raises(PairError, match=r"Pair 0: answer must be a single token, got 2 ids"):
        from_tokens([[1, 2]], [[1, 3]], [[7, 8]], [9])


def test_from_texts_builds_and_reports():
    tok = WordTokenizer()
    pairs, report = from_texts(tok, RECORDS)
    assert len(pairs) == 2 and report.n_kept == 2 and report.n_skipped == 0 and report.kept == (0, 1)
    np.testing.assert_array_equal(pairs.position, [7, 4])
    assert pairs.answer[1] == tok.vocab["Paris"] and pairs.foil[1] == tok.vocab["Madrid"]
    assert tok.decode(np.asarray(pairs.clean[1][:5]).tolist()) == "The capital of France is"


def test_answers_are_encoded_without_bos():
    tok = WordTokenizer(add_bos=True)
    pairs, _ = from_texts(tok, RECORDS[1:])
    assert int(pairs.clean[0, 0]) == 1  # the prompt keeps the tokenizer's own BOS rule
    assert int(pairs.answer[0]) == tok.vocab["Paris"]


def test_tokenizer_without_add_bos_keyword():
    pairs, _ = from_texts(PlainTokenizer(), RECORDS)
    assert len(pairs) == 2


BAD = [
    RECORDS[0],
    {"clean": "The capital of France is", "corrupt": "The capital of the US is",
     "answer": " Paris", "foil": " Washington"},  # 1: lengths differ
    {"clean": "The capital of USA is", "corrupt": "The capital of France is",
     "answer": " Washington D.C.", "foil": " Paris"},  # 2: multi-token answer
    {"clean": "a b c", "corrupt": "a b d", "answer": " x", "foil": " y z"},  # 3: multi-token foil
    {"clean": "a b c", "corrupt": "a b d", "answer": " x"},  # 4: no foil
    RECORDS[1],
]


def test_from_texts_raise_names_pair_index_and_texts():
    with pytest.raises(PairError) as info:
        from_texts(WordTokenizer(), BAD)
    message = str(info.value)
    assert "Pair 1" in message and "The capital of the US is" in message
    assert "clean has 5 tokens but corrupt has 6" in message


@pytest.mark.parametrize("index, pattern", [
    (2, r"Pair 0 .*answer ' Washington D.C.' is 2 tokens"),
    (3, r"Pair 0 .*foil ' y z' is 2 tokens"),
    (4, r"Pair 0 .*missing or non-text field\(s\) \['foil'\]"),
])
def test_each_problem_is_named(index, pattern):
    with pytest.raises(PairError, match=pattern):
        from_texts(WordTokenizer(), [BAD[index]])


def test_skip_reports_counts_and_reasons():
    tok = WordTokenizer()
    pairs, report = from_texts(tok, BAD, on_error="skip")
    assert len(pairs) == 2 and report.total == 6 and report.kept == (0, 5) and report.n_skipped == 4
    assert report.reasons == {"length_mismatch": 1, "answer_not_single_token": 1,
                              "foil_not_single_token": 1, "missing_field": 1}
    assert [s[0] for s in report.skipped] == [1, 2, 3, 4]
    assert "2 of 6 pairs kept; skipped 4" in report.summary()
    np.testing.assert_array_equal(pairs.position, [7, 4])


def test_skip_everything_is_an_error():
    with pytest.raises(ValueError, match="No usable pairs"):
        from_texts(WordTokenizer(), BAD[1:3], on_error="skip")


def test_bad_on_error():
    with pytest.raises(ValueError, match="on_error"):
        from_texts(WordTokenizer(), RECORDS, on_error="ignore")


def test_from_jsonl(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in BAD[:2]) + "\n\n" + json.dumps(RECORDS[1]) + "\n")
    with pytest.raises(PairError, match=r"Pair 1 \(line 2 of pairs.jsonl\)"):
        from_jsonl(path, WordTokenizer())
    pairs, report = from_jsonl(path, WordTokenizer(), on_error="skip")
    assert len(pairs) == 2 and report.kept == (0, 2) and report.reasons == {"length_mismatch": 1}


def test_from_jsonl_bad_json(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"pairs.jsonl:2: not valid JSON"):
        from_jsonl(path, WordTokenizer())


def test_take_slice_batches_and_pytree():
    rows = [[i, i + 1, i + 2][: 1 + i % 3] for i in range(7)]
    pairs = from_tokens(rows, rows, list(range(7)), list(range(7, 14)))
    sub = pairs.take([5, 1])
    np.testing.assert_array_equal(sub.answer, [5, 1])
    np.testing.assert_array_equal(sub.position, [2, 1])
    np.testing.assert_array_equal(pairs[2:4].answer, [2, 3])
    np.testing.assert_array_equal(pairs[-1].answer, [6])
    np.testing.assert_array_equal(pairs[np.arange(7) % 2 == 0].answer, [0, 2, 4, 6])
    batches = list(pairs.batches(3))
    assert [len(b) for b in batches] == [3, 3, 1]
    assert [len(b) for b in pairs.batches(3, drop_last=True)] == [3, 3]
    assert pairs.take([0, 3]).trim().n_pos == 1
    leaves = jax.tree.leaves(pairs)
    assert len(leaves) == 6
    doubled = jax.jit(lambda p: p.answer * 2)(pairs)
    np.testing.assert_array_equal(doubled, np.arange(7) * 2)
    with pytest.raises(IndexError):
        pairs.take([7])


def test_shared_prefix_is_where_every_pair_still_agrees():
    clean = [[5, 6, 7, 8], [5, 9, 7]]
    pairs = from_tokens(clean, [[5, 6, 2, 8], [5, 9, 7]], answer=[1, 2], foil=[3, 4])
    assert pairs.shared_prefix() == 2  # the first pair differs at position 2, the second nowhere
    assert pairs[1].shared_prefix() == 4  # identical prompts (padding included) share everything
    assert from_tokens(clean, [[0, 6, 7, 8], [5, 9, 7]], answer=[1, 2], foil=[3, 4]).shared_prefix() == 0
