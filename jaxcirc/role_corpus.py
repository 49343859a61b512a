"""A built-in synthetic corpus for the semantic-role task, its tokenizer, prompts and evaluator.

Sentences are "The chef cut the bread with the knife in the kitchen ." : a subject, a verb, an
object, then zero to two role phrases. Each role phrase is a role-marking cue (preposition +
determiner, e.g. "with the" for INSTRUMENT) followed by a word from that role's lexicon, so the
word after the cue is predictable from the role alone. The role lexicons are pairwise disjoint
and disjoint from the subject/object/verb vocabulary (experiments.md: overlapping lexicons make
roles indistinguishable and the task fails).

Held-out split: a quarter of the subjects and objects ("held-out words") occur in training only in
sentences WITHOUT a role phrase, so the model learns their embeddings but never sees them next to
a cue. Held-out prompts ("The poet folded the ladder through the") test that the role
prediction comes from the cue, not from memorised sentence prefixes.

    corpus = RoleCorpus()                          # default lexicons and split
    texts = corpus.sentences(20_000, seed=0)       # training texts, one sentence each
    tok = corpus.tokenizer()                       # jaxcirc.tokenizer.Tokenizer (word level)
    prompts = corpus.prompts(per_role=32, split="heldout", seed=0)
    acc = role_accuracy(logits_at_last, prompts.roles, corpus.lexicon_ids(tok))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxcirc.tokenizer import Tokenizer

Array = jax.Array
Split = Literal["train", "heldout"]

BOS, EOS, PAD, UNK = "<bos>", "<eos>", "<pad>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)


@dataclasses.dataclass(frozen=True)
class Role:
    """One semantic role: its cue (two words: preposition + determiner) and its filler lexicon."""

    name: str
    cue: tuple[str, str]
    lexicon: tuple[str, ...]


# Every cue is exactly two words, so prompts of different roles have equal token length
# (minimal pairs need aligned positions).
DEFAULT_ROLES: tuple[Role, ...] = (
    Role("instrument", ("with", "the"), ("knife", "hammer", "brush", "saw", "spoon", "needle", "scissors",
                                         "shovel", "wrench", "sponge", "chisel", "axe", "pliers", "drill",
                                         "broom", "ruler")),
    Role("beneficiary", ("for", "the"), ("guests", "children", "orphans", "widow", "neighbours", "patients",
                                         "king", "queen", "villagers", "refugees", "elderly", "visitors",
                                         "customers", "bride", "troops", "family")),
    Role("location", ("in", "the"), ("kitchen", "garage", "attic", "cellar", "barn", "office", "library",
                                     "warehouse", "classroom", "hospital", "studio", "chapel", "basement",
                                     "laboratory", "workshop", "bakery")),
    Role("source", ("from", "the"), ("river", "quarry", "mine", "orchard", "vault", "cupboard", "pantry",
                                     "truck", "wagon", "lake", "pond", "cave", "spring", "glacier", "volcano",
                                     "swamp")),
    Role("goal", ("to", "the"), ("market", "station", "airport", "museum", "school", "church", "bank", "castle",
                                 "palace", "stadium", "prison", "embassy", "village", "city", "island", "farm")),
    Role("time", ("during", "the"), ("storm", "war", "night", "winter", "summer", "festival", "meeting",
                                     "ceremony", "lecture", "concert", "flood", "drought", "holiday", "parade",
                                     "eclipse", "blackout")),
    Role("comitative", ("alongside", "the"), ("apprentice", "partner", "assistant", "colleague", "cousin",
                                              "stranger", "volunteers", "crew", "nephew", "niece", "intern",
                                              "veteran", "rookie", "coach", "captain", "mayor")),
    Role("manner", ("in", "a"), ("hurry", "rush", "panic", "daze", "frenzy", "huff", "flash", "trance", "fury",
                                 "whisper", "jiffy", "heartbeat", "fever", "temper", "snap", "blur")),
    Role("path", ("through", "the"), ("tunnel", "forest", "gate", "window", "corridor", "valley", "desert",
                                      "jungle", "canyon", "maze", "meadow", "pipe", "doorway", "crowd", "fog",
                                      "archway")),
)

DEFAULT_SUBJECTS: tuple[str, ...] = (
    "chef", "farmer", "teacher", "doctor", "pilot", "nurse", "baker", "painter", "sailor", "miner", "lawyer",
    "student", "soldier", "writer", "singer", "dancer", "hunter", "driver", "clerk", "judge", "tailor",
    "plumber", "banker", "poet", "guard", "monk", "waiter", "gardener", "butcher", "carpenter", "mechanic",
    "pianist")
DEFAULT_VERBS: tuple[str, ...] = (
    "cut", "carried", "painted", "cleaned", "fixed", "moved", "opened", "wrapped", "washed", "built", "cooked",
    "lifted", "pushed", "pulled", "packed", "sorted", "checked", "marked", "polished", "folded", "tied",
    "stored", "delivered", "sent", "bought", "sold", "found", "took", "brought", "repaired")
DEFAULT_OBJECTS: tuple[str, ...] = (
    "bread", "box", "letter", "chair", "table", "rope", "bottle", "basket", "parcel", "book", "coat", "lamp",
    "bag", "bucket", "blanket", "mirror", "clock", "vase", "plate", "cup", "shirt", "drawer", "fence", "door",
    "ladder", "bicycle", "cart", "carpet", "barrel", "package", "map", "jar")


@dataclasses.dataclass(frozen=True)
class RolePrompts:
    """Prompts ending in a role cue. texts [n]; roles [n] int (index into the corpus's roles)."""

    texts: tuple[str, ...]
    roles: np.ndarray


@dataclasses.dataclass(frozen=True)
class RoleCorpus:
    """Lexicons, the held-out split and sentence generation for the semantic-role task.

    `heldout_fraction` of subjects and objects are held out (see the module docstring);
    `phrase_probs` are the probabilities of 0, 1, 2 role phrases in a sentence.
    """

    roles: tuple[Role, ...] = DEFAULT_ROLES
    subjects: tuple[str, ...] = DEFAULT_SUBJECTS
    verbs: tuple[str, ...] = DEFAULT_VERBS
    objects: tuple[str, ...] = DEFAULT_OBJECTS
    heldout_fraction: float = 0.25
    phrase_probs: tuple[float, float, float] = (0.15, 0.55, 0.30)
    split_seed: int = 0

    def __post_init__(self):
        check_lexicons(self.roles, self.subjects, self.verbs, self.objects)
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}.")
        if len(self.phrase_probs) != 3 or abs(sum(self.phrase_probs) - 1) > 1e-6 or min(self.phrase_probs) < 0:
            raise ValueError(f"phrase_probs must be 3 probabilities (0, 1, 2 role phrases) summing to 1, "
                             f"got {self.phrase_probs}.")

    @property
    def role_names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.roles)

    def split(self, words: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(train words, held-out words): a fixed pseudo-random split of `words`."""
        order = np.random.default_rng(self.split_seed).permutation(len(words))
        n_held = max(1, int(round(self.heldout_fraction * len(words))))
        held = sorted(order[:n_held].tolist())
        train = sorted(order[n_held:].tolist())
        return tuple(words[i] for i in train), tuple(words[i] for i in held)

    def frame_words(self, split: Split) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(subjects, objects) of one split."""
        index = {"train": 0, "heldout": 1}[_check_split(split)]
        return self.split(self.subjects)[index], self.split(self.objects)[index]

    def vocabulary(self) -> list[str]:
        """Every word the corpus and its prompts use, specials first (their ids are 0..3)."""
        words = [*SPECIALS, "The", "the", "a", "."]
        for role in self.roles:
            words += [w for w in role.cue if w not in words]
        words += [*self.subjects, *self.verbs, *self.objects]
        for role in self.roles:
            words += list(role.lexicon)
        return words

    def tokenizer(self) -> Tokenizer:
        """A word-level tokenizer over `vocabulary()` that prepends BOS (jaxcirc Tokenizer)."""
        return word_level_tokenizer(self.vocabulary())

    def sentences(self, n: int, seed: int = 0) -> list[str]:
        """`n` training sentences. Role phrases use only train subjects/objects; sentences without a
        role phrase use all of them, so held-out words are known but never precede a cue."""
        rng = np.random.default_rng(seed)
        train_subj, train_obj = self.frame_words("train")
        n_phrases = rng.choice(3, size=n, p=np.asarray(self.phrase_probs))
        out = []
        for k in n_phrases:
            subjects, objects = (self.subjects, self.objects) if k == 0 else (train_subj, train_obj)
            words = ["The", _pick(rng, subjects), _pick(rng, self.verbs), "the", _pick(rng, objects)]
            for r in rng.choice(len(self.roles), size=int(k), replace=False):
                role = self.roles[int(r)]
                words += [*role.cue, _pick(rng, role.lexicon)]
            out.append(" ".join(words + ["."]))
        return out

    def prompts(self, per_role: int, split: Split = "heldout", seed: int = 0) -> RolePrompts:
        """`per_role` prompts per role ending in its cue: "The {subj} {verb} the {obj} {cue}".

        split="heldout" draws subjects and objects from the held-out words, "train" from the
        training words (fresh combinations, not necessarily unseen sentences).
        """
        subjects, objects = self.frame_words(split)
        rng = np.random.default_rng(seed)
        texts, roles = [], []
        for r, role in enumerate(self.roles):
            for _ in range(per_role):
                words = ["The", _pick(rng, subjects), _pick(rng, self.verbs), "the", _pick(rng, objects), *role.cue]
                texts.append(" ".join(words))
                roles.append(r)
        return RolePrompts(tuple(texts), np.asarray(roles, dtype=np.int32))

    def pair_records(self, per_role_pair: int, split: Split = "heldout", seed: int = 0) -> list[dict[str, str]]:
        """Minimal pairs for every ordered pair of roles (clean role != corrupt role):
        {"clean", "corrupt", "answer", "foil", "clean_role", "corrupt_role"} texts, accepted by
        `jaxcirc.pairs.from_texts`. Prompts differ only in the cue; answer/foil are lexicon words
        of the clean/corrupt role (with a leading space)."""
        subjects, objects = self.frame_words(split)
        rng = np.random.default_rng(seed)
        records = []
        for clean in self.roles:
            for corrupt in self.roles:
                if clean.name == corrupt.name:
                    continue
                for _ in range(per_role_pair):
                    prefix = f"The {_pick(rng, subjects)} {_pick(rng, self.verbs)} the {_pick(rng, objects)}"
                    records.append({
                        "clean": f"{prefix} {' '.join(clean.cue)}", "corrupt": f"{prefix} {' '.join(corrupt.cue)}",
                        "answer": f" {_pick(rng, clean.lexicon)}", "foil": f" {_pick(rng, corrupt.lexicon)}",
                        "clean_role": clean.name, "corrupt_role": corrupt.name})
        return records

    def lexicon_ids(self, tokenizer: Tokenizer) -> np.ndarray:
        """Token ids of each role's lexicon, [n_roles, max_lexicon] int32, padded with -1."""
        return lexicon_id_table([r.lexicon for r in self.roles], tokenizer)


def check_lexicons(roles: Sequence[Role], subjects: Sequence[str], verbs: Sequence[str],
                   objects: Sequence[str]) -> None:
    """Raise ValueError unless role lexicons are pairwise disjoint, disjoint from the frame
    words, every cue is two words, and role names are unique."""
    names = [r.name for r in roles]
    if len(set(names)) != len(names):
        raise ValueError(f"Role names must be unique, got {names}.")
    if len(roles) < 2:
        raise ValueError("Need at least two roles for a role task.")
    cues = [r.cue for r in roles]
    if len(set(cues)) != len(cues):
        raise ValueError(f"Two roles share a cue ({cues}); each role needs its own cue.")
    owner: dict[str, str] = {}
    for group, words in (("subjects", subjects), ("verbs", verbs), ("objects", objects),
                         *((f"role {r.name}", r.lexicon) for r in roles)):
        if not words:
            raise ValueError(f"The {group} lexicon is empty.")
        for w in words:
            if len(w.split()) != 1 or not w.isalpha():
                raise ValueError(f"{group}: {w!r} must be one alphabetic word (one token).")
            if w in owner:
                raise ValueError(f"{w!r} is in both {owner[w]} and {group}; lexicons must be disjoint "
                                 "(shared words make roles indistinguishable).")
            owner[w] = group
    for r in roles:
        if len(r.cue) != 2:
            raise ValueError(f"Role {r.name}: cue {r.cue} must be two words (preposition, determiner) so that "
                             "prompts of all roles have equal token length.")
        for w in r.cue:
            if w in owner:
                raise ValueError(f"Cue word {w!r} of role {r.name} is also in the {owner[w]} lexicon.")


def word_level_tokenizer(words: Sequence[str]) -> Tokenizer:
    """A whitespace/punctuation-splitting word-level tokenizer over `words` (ids in order).

    `words` must contain "<bos>", "<eos>", "<pad>" and "<unk>"; unknown words map to <unk>;
    `encode` prepends <bos>.
    """
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    missing = [s for s in SPECIALS if s not in words]
    if missing:
        raise ValueError(f"A word-level vocabulary needs the special tokens {list(SPECIALS)}; missing {missing}.")
    if len(set(words)) != len(words):
        raise ValueError("Duplicate words in the vocabulary.")
    vocab = {w: i for i, w in enumerate(words)}
    backend = Backend(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    # WordPiece's decoder joins word tokens with single spaces (no "##" pieces occur here).
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    backend.add_special_tokens(list(SPECIALS))
    return Tokenizer(backend, bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[PAD],
                     add_bos=True)


def lexicon_id_table(lexicons: Sequence[Sequence[str]], tokenizer: Tokenizer) -> np.ndarray:
    """[n_roles, max_lexicon] int32 token ids (padding -1). Every word must be a single known token."""
    width = max(len(lex) for lex in lexicons)
    table = np.full((len(lexicons), width), -1, dtype=np.int32)
    unk = tokenizer.token_to_id(UNK)
    for r, lex in enumerate(lexicons):
        for j, word in enumerate(lex):
            ids = tokenizer.encode(word, add_bos=False)
            if len(ids) != 1 or (unk is not None and ids[0] == unk):
                raise ValueError(f"Lexicon word {word!r} is not a single known token of this tokenizer ({ids}).")
            table[r, j] = ids[0]
    return table


def role_scores(logits: Array, lexicon_ids: Array) -> Array:
    """Log-probability mass of each role's lexicon: logits [batch, vocab] -> [batch, n_roles]
    (log-sum-exp of the log-softmax over the role's lexicon ids; -1 ids are padding)."""
    logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    ids = jnp.asarray(lexicon_ids)
    picked = jnp.take(logp, jnp.maximum(ids, 0), axis=-1)  # [batch, n_roles, max_lexicon]
    picked = jnp.where(ids >= 0, picked, -jnp.inf)
    return jax.nn.logsumexp(picked, axis=-1)


def role_accuracy(logits: Array, roles: Array, lexicon_ids: Array) -> Array:
    """Fraction of prompts whose own role has the highest lexicon mass among all roles.

    logits [batch, vocab] at the cue's last token; roles [batch] int (true role index);
    lexicon_ids [n_roles, max_lexicon] (see `lexicon_id_table`). Chance is 1 / n_roles when the
    lexicons have equal sizes (they do by default): a bigger lexicon collects more mass from a
    flat distribution.
    """
    return jnp.mean(role_correct(logits, roles, lexicon_ids).astype(jnp.float32))


def role_correct(logits: Array, roles: Array, lexicon_ids: Array) -> Array:
    """[batch] bool: is the true role's lexicon mass strictly the highest (ties count as wrong)?"""
    scores = role_scores(logits, lexicon_ids)
    roles = jnp.asarray(roles)
    own = jnp.take_along_axis(scores, roles[:, None], axis=-1)[:, 0]
    others = jnp.where(jax.nn.one_hot(roles, scores.shape[-1], dtype=bool), -jnp.inf, scores)
    return own > jnp.max(others, axis=-1)


def per_role_accuracy(correct: np.ndarray, roles: np.ndarray, names: Sequence[str]) -> Mapping[str, float]:
    """{role name: accuracy} from per-prompt correctness [n] and role indices [n]."""
    correct, roles = np.asarray(correct), np.asarray(roles)
    return {name: float(correct[roles == r].mean()) if (roles == r).any() else float("nan")
            for r, name in enumerate(names)}


def _pick(rng: np.random.Generator, words: Sequence[str]) -> str:
    return words[int(rng.integers(len(words)))]


def _check_split(split: str) -> str:
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}.")
    return split
