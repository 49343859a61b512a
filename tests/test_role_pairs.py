"""Role-cross minimal pairs: token constraints, the target/foil rule and the both-contexts filter,
checked against a brute-force loop over full-sequence forwards of a tiny random model."""

from __future__ import annotations

import numpy as np
import pytest

import jaxcirc
from jaxcirc.model import Model
from jaxcirc.models.config import ModelConfig, RopeConfig
from jaxcirc.models.transformer import init_params
from jaxcirc.role_corpus import SPECIALS, Role, RoleCorpus, word_level_tokenizer
from jaxcirc.role_pairs import (RoleSet, build_role_pairs, corpus_role_set, default_role_set, is_role_corpus_tokenizer,
                                natural_role_set, tokenize_role_set)

ROLES = (
    Role("instrument", ("with", "the"), ("knife", "hammer", "brush", "spoon")),
    Role("beneficiary", ("for", "the"), ("guests", "children", "king", "queen")),
    Role("location", ("in", "the"), ("kitchen", "garage", "attic", "barn")),
    Role("manner", ("in", "a"), ("hurry", "rush", "panic")),             # "panic" is not in the vocabulary
    Role("comitative", ("together", "with", "the"), ("crew", "staff", "coach")),   # 3-token cue
    Role("source", ("out", "of", "the"), ("river", "well", "mine")),     # 3-token cue
)
SUBJECTS, VERBS, OBJECTS = ("chef", "farmer", "baker"), ("cut", "moved"), ("bread", "box", "rope")
RS = RoleSet("test", ROLES, SUBJECTS, VERBS, OBJECTS)


def _vocabulary() -> list[str]:
    words = [*SPECIALS, "The", "the", "a", "together", "with", "for", "in", "out", "of"]
    words += [*SUBJECTS, *VERBS, *OBJECTS]
    words += [w for r in ROLES for w in r.lexicon if w != "panic"]
    return words


@pytest.fixture(scope="module")
def model() -> Model:
    tokenizer = word_level_tokenizer(_vocabulary())
    cfg = ModelConfig(family="llama", n_layers=2, d_model=16, n_heads=2, n_kv_heads=2, d_head=8, d_mlp=32,
                      d_vocab=tokenizer.vocab_size, n_ctx=16, norm="rmsnorm", activation="silu", gated_mlp=True,
                      positional="rotary", rope=RopeConfig(theta=10000., rotary_dim=8), tied_embeddings=False,
                      initializer_range=0.5)
    return Model(cfg, init_params(cfg, seed=0), tokenizer, source="tiny")


def test_tokenize_role_set_keeps_single_known_tokens(model):
    tok = tokenize_role_set(model.tokenizer, RS)
    assert tok.dropped["manner"] == ("panic",)
    assert tok.words[tok.role_names.index("manner")] == ("hurry", "rush")
    assert [len(c) for c in tok.cue_ids] == [2, 2, 2, 2, 3, 3]
    names = tok.role_names
    assert [names[b] for b in tok.partners(names.index("comitative"))] == ["source"]
    assert [names[b] for b in tok.partners(names.index("instrument"))] == ["beneficiary", "location", "manner"]
    assert (tok.lexicon_ids[names.index("manner"), 2:] == -1).all()


def test_pairs_satisfy_the_constraints(model):
    rp = build_role_pairs(model, RS, pairs_per_role=8, require_correct=False, seed=1)
    tok = rp.tokens
    names = tok.role_names
    assert set(rp.pairs) == set(names)
    for role, pairs in rp.pairs.items():
        a = names.index(role)
        clean, corrupt, mask = np.asarray(pairs.clean), np.asarray(pairs.corrupt), np.asarray(pairs.mask)
        assert len(pairs) == len(rp.records[role]) == 8
        for i, rec in enumerate(rp.records[role]):
            b = names.index(rec["corrupt_role"])
            assert b in tok.partners(a)
            n = int(mask[i].sum())
            c_ids, x_ids = clean[i, :n].tolist(), corrupt[i, :n].tolist()
            assert model.tokenizer.encode(rec["clean"]) == c_ids                     # equal lengths, real texts
            assert model.tokenizer.encode(rec["corrupt"]) == x_ids
            cue = len(tok.cue_ids[a])
            assert c_ids[:-cue] == x_ids[:-cue]                                      # only the cue differs
            assert c_ids[-cue:] == list(tok.cue_ids[a]) and x_ids[-cue:] == list(tok.cue_ids[b])
            answer, foil = int(pairs.answer[i]), int(pairs.foil[i])
            assert model.tokenizer.encode(rec["target"], add_bos=False) == [answer]  # single tokens
            assert model.tokenizer.encode(rec["foil"], add_bos=False) == [foil]
            assert answer in tok.lexicon_ids[a] and foil in tok.lexicon_ids[b]
            assert answer not in c_ids and foil not in x_ids                          # absent from the prompt
            assert int(pairs.position[i]) == n - 1


def _last_logits(model: Model, texts: list[str]) -> np.ndarray:
    """Full-sequence forwards (every position unembedded), read at the last token: an independent path."""
    out = {}
    by_length: dict[int, list[str]] = {}
    for t in texts:
        by_length.setdefault(len(model.tokenizer.encode(t)), []).append(t)
    for group in by_length.values():
        logits, _ = jaxcirc.run(model, group)
        for t, row in zip(group, np.asarray(logits)[:, -1]):
            out[t] = row
    return out


def test_filter_matches_a_brute_force_loop(model):
    rp = build_role_pairs(model, RS, pairs_per_role=1000, seed=2)
    frames = rp.settings["frames"]
    tok = rp.tokens
    words = [[model.tokenizer.encode(" " + w, add_bos=False)[0] for w in ws] for ws in tok.words]
    prompts = {(f, a): f"{frame} {' '.join(ROLES[a].cue)}" for f, frame in enumerate(frames) for a in range(len(ROLES))}
    logits = _last_logits(model, list(prompts.values()))

    def best(f: int, a: int) -> int:
        return max(words[a], key=lambda w: logits[prompts[(f, a)]][w])

    for a, role in enumerate(tok.role_names):
        expected = {"candidates": 0, "kept": 0, "dropped_clean": 0, "dropped_corrupt": 0, "dropped_both": 0}
        for b in tok.partners(a):
            for f in range(len(frames)):
                target, foil = best(f, a), best(f, b)
                clean_ok = logits[prompts[(f, a)]][target] > logits[prompts[(f, a)]][foil]
                corrupt_ok = logits[prompts[(f, b)]][foil] > logits[prompts[(f, b)]][target]
                expected["candidates"] += 1
                key = ("kept" if clean_ok and corrupt_ok else "dropped_both" if not (clean_ok or corrupt_ok)
                       else "dropped_clean" if not clean_ok else "dropped_corrupt")
                expected[key] += 1
        report = rp.report[role]
        assert {k: report[k] for k in expected} == expected, role
        assert report["used"] == report["kept"]                      # pairs_per_role exceeds what is kept
        assert sum(report["used_by_partner"].values()) == report["used"]
        if report["used"]:
            for rec, answer, foil in zip(rp.records[role], np.asarray(rp.pairs[role].answer),
                                         np.asarray(rp.pairs[role].foil)):
                assert logits[rec["clean"]][answer] > logits[rec["clean"]][foil]
                assert logits[rec["corrupt"]][foil] > logits[rec["corrupt"]][answer]
                f = frames.index(rec["clean"].rsplit(" ", len(ROLES[a].cue))[0])
                assert answer == best(f, a)                          # the model's top clean-role word


def test_sampling_is_round_robin_over_partners(model):
    rp = build_role_pairs(model, RS, pairs_per_role=5, require_correct=False, seed=3)
    used = rp.report["instrument"]["used_by_partner"]
    assert sum(used.values()) == 5 and max(used.values()) - min(used.values()) <= 1
    frames = {rec["clean"] for rec in rp.records["instrument"]}
    assert len(frames) > 1                                           # not all from one frame
    again = build_role_pairs(model, RS, pairs_per_role=5, require_correct=False, seed=3)
    assert again.records == rp.records                               # seeded


def test_bad_input_is_refused(model):
    with pytest.raises(ValueError, match="Unknown role"):
        build_role_pairs(model, RS, role_names=["instrument", "agent"])
    with pytest.raises(ValueError, match="disjoint"):
        RoleSet("bad", (Role("x", ("with", "the"), ("knife",)), Role("y", ("for", "the"), ("knife",))),
                SUBJECTS, VERBS, OBJECTS)
    with pytest.raises(ValueError, match="subjects"):
        tokenize_role_set(model.tokenizer, RoleSet("other", ROLES, ("zebra",), VERBS, OBJECTS))
    with pytest.raises(ValueError, match="pairs_per_role"):
        build_role_pairs(model, RS, pairs_per_role=0)


def test_shipped_role_sets():
    natural, corpus = natural_role_set(), corpus_role_set()        # constructing checks disjointness
    assert len(natural.roles) == len(corpus.roles) == 9
    assert natural.role_names == corpus.role_names
    held_subjects, held_objects = RoleCorpus().frame_words("heldout")
    assert corpus.subjects == held_subjects and corpus.objects == held_objects
    tokenizer = RoleCorpus().tokenizer()
    assert is_role_corpus_tokenizer(tokenizer) and default_role_set(tokenizer) == "corpus"
    assert default_role_set(word_level_tokenizer(_vocabulary())) == "natural"
