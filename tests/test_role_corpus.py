"""The synthetic semantic-role corpus: lexicons, held-out split, tokenizer, evaluator."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from jaxcirc import pairs as pairs_module
from jaxcirc.role_corpus import (DEFAULT_OBJECTS, DEFAULT_ROLES, DEFAULT_SUBJECTS, DEFAULT_VERBS, Role, RoleCorpus,
                                 check_lexicons, lexicon_id_table, role_accuracy, role_correct, role_scores)
from jaxcirc.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def corpus() -> RoleCorpus:
    return RoleCorpus()


@pytest.fixture(scope="module")
def tokenizer(corpus) -> Tokenizer:
    return corpus.tokenizer()


def test_at_least_eight_roles_with_pairwise_disjoint_lexicons():
    assert len(DEFAULT_ROLES) >= 8
    for a, b in itertools.combinations(DEFAULT_ROLES, 2):
        assert not set(a.lexicon) & set(b.lexicon), (a.name, b.name)
        assert a.cue != b.cue
    frame = set(DEFAULT_SUBJECTS) | set(DEFAULT_VERBS) | set(DEFAULT_OBJECTS)
    for role in DEFAULT_ROLES:
        assert not set(role.lexicon) & frame, role.name
        assert len(role.cue) == 2


def test_overlapping_lexicons_are_refused():
    roles = (Role("location", ("in", "the"), ("office", "barn")), Role("goal", ("to", "the"), ("office", "city")))
    with pytest.raises(ValueError, match="'office' is in both"):
        check_lexicons(roles, ("chef",), ("cut",), ("bread",))
    with pytest.raises(ValueError, match="disjoint"):
        RoleCorpus(roles=(Role("instrument", ("with", "the"), ("knife", "bread")),) + DEFAULT_ROLES[1:])


def test_heldout_words_never_precede_a_role_cue_in_training(corpus):
    held_subjects, held_objects = corpus.frame_words("heldout")
    train_subjects, train_objects = corpus.frame_words("train")
    assert held_subjects and held_objects
    assert not set(held_subjects) & set(train_subjects) and not set(held_objects) & set(train_objects)
    assert set(held_subjects) | set(train_subjects) == set(corpus.subjects)
    cue_words = {w for r in corpus.roles for w in r.cue} - {"the", "a"}
    seen_heldout_in_plain = False
    for sentence in corpus.sentences(3000, seed=3):
        words = sentence.split()
        has_cue = any(w in cue_words for w in words[5:])
        if set(words[:5]) & (set(held_subjects) | set(held_objects)):
            assert not has_cue, sentence
            seen_heldout_in_plain = True
    assert seen_heldout_in_plain, "held-out words should still occur in role-free sentences"


def test_sentences_put_the_role_lexicon_after_its_cue(corpus):
    by_cue = {r.cue: set(r.lexicon) for r in corpus.roles}
    n_phrases = 0
    for sentence in corpus.sentences(500, seed=0):
        words = sentence.split()
        assert words[0] == "The" and words[-1] == "."
        rest = words[5:-1]
        assert len(rest) % 3 == 0
        for i in range(0, len(rest), 3):
            assert rest[i + 2] in by_cue[(rest[i], rest[i + 1])], sentence
            n_phrases += 1
    assert n_phrases > 400


def test_tokenizer_round_trip(corpus, tokenizer):
    assert tokenizer.vocab_size == len(corpus.vocabulary())
    for sentence in corpus.sentences(50, seed=1):
        ids = tokenizer.encode(sentence)
        assert ids[0] == tokenizer.bos_token_id and len(ids) == len(sentence.split()) + 1
        assert tokenizer.decode(ids, skip_special_tokens=True) == sentence
    again = Tokenizer.from_json(tokenizer.to_json())
    text = "The chef cut the bread with the knife ."
    assert again.encode(text) == tokenizer.encode(text)
    assert tokenizer.token_str(tokenizer.encode("knife", add_bos=False)[0]) == " knife"
    assert tokenizer.encode("The zebra", add_bos=False)[1] == tokenizer.token_to_id("<unk>")


def test_prompts_have_equal_length_and_end_in_the_cue(corpus, tokenizer):
    prompts = corpus.prompts(per_role=3, split="heldout", seed=0)
    lengths = {len(tokenizer.encode(t)) for t in prompts.texts}
    assert lengths == {8}
    held = set(corpus.frame_words("heldout")[0])
    for text, role in zip(prompts.texts, prompts.roles):
        words = text.split()
        assert tuple(words[-2:]) == corpus.roles[role].cue and words[1] in held
    assert np.bincount(prompts.roles).tolist() == [3] * len(corpus.roles)


def test_pair_records_build_minimal_pairs(corpus, tokenizer):
    records = corpus.pair_records(per_role_pair=1, seed=0)
    n = len(corpus.roles)
    assert len(records) == n * (n - 1)
    batch, report = pairs_module.from_texts(tokenizer, records)
    assert report.n_skipped == 0
    differs = np.asarray(batch.clean) != np.asarray(batch.corrupt)
    assert differs[:, :-2].sum() == 0  # only the cue differs


def _lse(values):
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


def test_evaluator_uses_lexicon_mass_not_the_top_token(tokenizer):
    vocab = 12
    lexicons = np.array([[1, 2, 3, 4], [5, -1, -1, -1], [6, 7, -1, -1]], dtype=np.int32)
    logits = np.zeros((3, vocab), np.float32)
    # Example 0: role 1 has the single largest token (5.0), but role 0 spreads more mass
    # over four tokens (4.0 + ln 4 = 5.39): role 0 wins.
    logits[0, [1, 2, 3, 4]] = 4.0
    logits[0, 5] = 5.0
    # Example 1: role 2 wins clearly.
    logits[1, 6] = 9.0
    # Example 2: roles 1 and 2 tie exactly (one token each at 3.0; token 7 has no mass): a tie
    # counts as wrong.
    logits[2, [1, 2, 3, 4, 7]] = -1e9
    logits[2, [5, 6]] = 3.0
    roles = np.array([0, 2, 1])
    scores = np.asarray(role_scores(logits, lexicons))
    for b in range(3):
        log_z = _lse(logits[b].tolist())
        for r in range(3):
            ids = [i for i in lexicons[r] if i >= 0]
            assert scores[b, r] == pytest.approx(_lse([float(logits[b, i]) for i in ids]) - log_z, abs=1e-5, rel=1e-6)
    correct = np.asarray(role_correct(logits, roles, lexicons))
    expected = [scores[b, roles[b]] > max(s for r, s in enumerate(scores[b]) if r != roles[b]) for b in range(3)]
    assert correct.tolist() == expected == [True, True, False]
    assert float(role_accuracy(logits, roles, lexicons)) == pytest.approx(2 / 3)


def test_lexicon_table_refuses_unknown_words(tokenizer):
    with pytest.raises(ValueError, match="not a single known token"):
        lexicon_id_table([["knife", "zebra"]], tokenizer)
    table = RoleCorpus().lexicon_ids(tokenizer)
    assert table.shape == (len(DEFAULT_ROLES), 16) and (table >= 0).all()
    assert len(set(table.ravel().tolist())) == table.size
