"""Role-cross minimal pairs (experiments.md A.3), generated per tokenizer and filtered per model.

A prompt is a frame "The {subject} {verb} the {object}" followed by a role cue (" with the" for
INSTRUMENT, " for the" for BENEFICIARY, ...). A pair of roles (A, B) with cues of equal token length
and one frame give a minimal pair for role A:

    clean   "The chef cut the bread with the"   target  " knife"   (A = instrument lexicon)
    corrupt "The chef cut the bread for the"    foil    " guests"  (B = beneficiary lexicon)

Clean and corrupt prompts share the frame's tokens and differ only in the cue's tokens (checked on
the token ids: the prompt's ids are the frame's ids followed by the cue's ids). Target and foil are
single tokens (with a leading space) from the two roles' lexicons, which are pairwise disjoint and
disjoint from the frame words, and neither occurs in the prompt.

Choosing target and foil (the documented rule): the target is the clean role's lexicon word the
model ranks highest after the clean prompt, the foil the corrupt role's word it ranks highest after
the corrupt prompt. A pair is kept only if the model is right in BOTH contexts (A.3):
logit(target) > logit(foil) after the clean prompt and logit(foil) > logit(target) after the
corrupt one. Circuits therefore describe success cases only (the filter is not a corpus success
rate). Per role, the report counts the candidates, the pairs kept and the pairs dropped (wrong in
the clean context, the corrupt context, or both); kept pairs are then sampled round-robin over the
partner roles (each partner's kept frames in a seeded random order) up to `pairs_per_role`.

Role sets shipped here:
  * "natural": nine roles with natural-English cues and lexicons for pretrained models (SmolLM2,
    Pythia, Llama); words that are not single tokens of a tokenizer are dropped (and reported);
  * "corpus": `jaxcirc.role_corpus.DEFAULT_ROLES` with the corpus's held-out subjects and objects,
    for models trained on that corpus (the built-in suite).

    rp = build_role_pairs(model, "natural", pairs_per_role=64, seed=0)
    rp.pairs["instrument"]           # MinimalPairs [n, pos]; answer = target, foil = foil
    rp.report["instrument"]          # {"candidates": .., "kept": .., "dropped_clean": .., ...}
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcirc.models.config import ModelConfig
from jaxcirc.models.transformer import make_forward
from jaxcirc.pairs import MinimalPairs, from_tokens
from jaxcirc.role_corpus import DEFAULT_ROLES, Role, RoleCorpus

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class RoleSet:
    """Roles (cue + lexicon) and the frame words prompts are built from."""

    name: str
    roles: tuple[Role, ...]
    subjects: tuple[str, ...]
    verbs: tuple[str, ...]
    objects: tuple[str, ...]
    description: str = ""

    def __post_init__(self):
        check_role_set(self.roles, self.subjects, self.verbs, self.objects)

    @property
    def role_names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.roles)

    def select(self, roles: Sequence[str] | None) -> "RoleSet":
        """The same set restricted to `roles` (names, in the set's order)."""
        if roles is None:
            return self
        unknown = sorted(set(roles) - set(self.role_names))
        if unknown:
            raise ValueError(f"Unknown role(s) {unknown}; the {self.name!r} role set has {list(self.role_names)}.")
        if len(set(roles)) < 2:
            raise ValueError("Role-cross pairs need at least two roles.")
        return dataclasses.replace(self, roles=tuple(r for r in self.roles if r.name in set(roles)))


def check_role_set(roles: Sequence[Role], subjects: Sequence[str], verbs: Sequence[str], objects: Sequence[str]) -> None:
    """Raise ValueError unless role names and cues are unique, cues are non-empty, and every lexicon
    and frame word is one alphabetic word owned by exactly one group (roles would otherwise share
    answers; cues may have any number of words: pairs only join cues of equal token length)."""
    names = [r.name for r in roles]
    if len(set(names)) != len(names):
        raise ValueError(f"Role names must be unique, got {names}.")
    if len(roles) < 2:
        raise ValueError("Role-cross pairs need at least two roles.")
    cues = [tuple(r.cue) for r in roles]
    if len(set(cues)) != len(cues) or any(not c for c in cues):
        raise ValueError(f"Every role needs its own non-empty cue, got {cues}.")
    owner: dict[str, str] = {}
    for group, words in (("subjects", subjects), ("verbs", verbs), ("objects", objects),
                         *((f"role {r.name}", r.lexicon) for r in roles)):
        if not words:
            raise ValueError(f"The {group} list is empty.")
        for w in dict.fromkeys(words):
            if len(w.split()) != 1 or not w.isalpha():
                raise ValueError(f"{group}: {w!r} must be one alphabetic word.")
            if w in owner:
                raise ValueError(f"{w!r} is in both {owner[w]} and {group}; lexicons must be disjoint "
                                 "(shared words make roles indistinguishable).")
            owner[w] = group


# Natural-English lexicons for pretrained models. Written once from everyday usage (not tuned to any
# model's pass rate); every word belongs to exactly one role and no role word is a frame word.
NATURAL_ROLES: tuple[Role, ...] = (
    Role("instrument", ("with", "the"), ("knife", "hammer", "brush", "saw", "spoon", "needle", "scissors", "shovel",
                                         "wrench", "sponge", "axe", "drill", "broom", "ruler", "pen", "pencil",
                                         "towel", "cloth", "stick", "fork", "tool", "machine", "tape", "glue", "rag",
                                         "blade", "mop", "pliers")),
    Role("beneficiary", ("for", "the"), ("guests", "children", "family", "kids", "poor", "king", "queen", "boss",
                                         "baby", "patients", "customers", "elderly", "neighbors", "visitors",
                                         "audience", "orphans", "villagers", "bride", "sick", "homeless", "widow",
                                         "newborn", "grandchildren", "hungry")),
    Role("location", ("in", "the"), ("kitchen", "garage", "attic", "basement", "barn", "office", "library", "garden",
                                     "yard", "bathroom", "bedroom", "shed", "studio", "cellar", "hall", "lab",
                                     "workshop", "classroom", "lobby", "backyard", "pool", "gym", "cabin", "tent")),
    Role("source", ("from", "the"), ("river", "well", "fridge", "cupboard", "shelf", "oven", "closet", "pantry",
                                     "ground", "floor", "truck", "car", "sea", "lake", "mine", "tree", "roof",
                                     "freezer", "trash", "sink", "rack", "pile", "stack", "heap")),
    Role("goal", ("to", "the"), ("market", "station", "airport", "store", "bank", "hospital", "school", "church",
                                 "beach", "city", "village", "park", "shop", "hotel", "farm", "museum", "zoo",
                                 "house", "cinema", "mall", "dump", "post", "pharmacy", "bakery")),
    Role("time", ("during", "the"), ("storm", "war", "night", "winter", "summer", "meeting", "ceremony", "day",
                                     "week", "game", "break", "show", "party", "holidays", "lunch", "dinner", "trip",
                                     "flight", "concert", "festival", "match", "wedding", "funeral", "season")),
    Role("comitative", ("alongside", "the"), ("crew", "staff", "workers", "volunteers", "coach", "captain",
                                              "others", "rest", "players", "team", "men", "women", "locals",
                                              "troops", "engineers", "soldiers", "police", "firefighters",
                                              "nurses", "students", "professionals", "experts", "veterans")),
    Role("manner", ("in", "a"), ("hurry", "rush", "panic", "daze", "way", "moment", "bit", "flash", "minute",
                                 "second", "row", "manner", "fashion", "circle", "line", "frenzy", "fury", "huff",
                                 "jiffy", "trance", "careful", "similar", "gentle", "quiet")),
    Role("path", ("through", "the"), ("tunnel", "forest", "woods", "gate", "window", "corridor", "valley", "crowd",
                                      "streets", "air", "water", "wall", "hole", "pipe", "mud", "snow", "grass",
                                      "trees", "field", "fields", "town", "mountains", "desert", "jungle")),
)

NATURAL_SUBJECTS: tuple[str, ...] = (
    "chef", "farmer", "teacher", "doctor", "nurse", "baker", "painter", "sailor", "miner", "lawyer", "student",
    "writer", "singer", "driver", "clerk", "judge", "tailor", "plumber", "banker", "poet", "guard", "monk",
    "waiter", "gardener", "butcher", "carpenter", "mechanic", "woman", "man", "boy", "girl", "pilot")
NATURAL_VERBS: tuple[str, ...] = (
    "cut", "carried", "painted", "cleaned", "fixed", "moved", "opened", "wrapped", "washed", "built", "cooked",
    "lifted", "pushed", "pulled", "packed", "sorted", "checked", "marked", "polished", "folded", "tied", "stored",
    "delivered", "sent", "bought", "sold", "found", "took", "brought", "repaired")
NATURAL_OBJECTS: tuple[str, ...] = (
    "bread", "box", "letter", "chair", "table", "rope", "bottle", "basket", "parcel", "book", "coat", "lamp", "bag",
    "bucket", "blanket", "mirror", "clock", "vase", "plate", "cup", "shirt", "drawer", "door", "ladder", "bicycle",
    "cart", "carpet", "barrel", "package", "map", "jar", "boat")


def natural_role_set() -> RoleSet:
    return RoleSet("natural", NATURAL_ROLES, NATURAL_SUBJECTS, NATURAL_VERBS, NATURAL_OBJECTS,
                   "natural-English cues and lexicons for pretrained models (jaxcirc.role_pairs.NATURAL_ROLES)")


def corpus_role_set() -> RoleSet:
    corpus = RoleCorpus()
    subjects, objects = corpus.frame_words("heldout")
    return RoleSet("corpus", DEFAULT_ROLES, subjects, corpus.verbs, objects,
                   "jaxcirc.role_corpus.DEFAULT_ROLES; frames from the corpus's held-out subjects and objects "
                   "(never seen before a role cue in training)")


ROLE_SETS = {"natural": natural_role_set, "corpus": corpus_role_set}


def role_set(name: str | RoleSet) -> RoleSet:
    """A shipped role set by name ("natural", "corpus"), or a RoleSet passed through."""
    if isinstance(name, RoleSet):
        return name
    if name not in ROLE_SETS:
        raise ValueError(f"Unknown role set {name!r}; choose one of {sorted(ROLE_SETS)} or pass a RoleSet.")
    return ROLE_SETS[name]()


def is_role_corpus_tokenizer(tokenizer: Any) -> bool:
    """True for the word-level tokenizer of `jaxcirc.role_corpus` (models trained on the role corpus)."""
    vocab = RoleCorpus().vocabulary()
    try:
        if tokenizer.vocab_size != len(vocab):
            return False
        return all(tokenizer.token_to_id(w) == i for i, w in enumerate(vocab))
    except Exception:  # any other tokenizer type: not the corpus tokenizer
        return False


def default_role_set(tokenizer: Any) -> str:
    """"corpus" for role-corpus models, "natural" otherwise."""
    return "corpus" if is_role_corpus_tokenizer(tokenizer) else "natural"


# ----------------------------------------------------------------------------------- tokenization


def _encode(tokenizer: Any, text: str, add_bos: bool | None = None) -> list[int]:
    return list(tokenizer.encode(text) if add_bos is None else tokenizer.encode(text, add_bos=add_bos))


def _unknown_id(tokenizer: Any) -> int | None:
    try:
        return tokenizer.token_to_id("<unk>")
    except Exception:  # tokenizers without a lookup simply have no unknown token to refuse
        return None


def single_token(tokenizer: Any, word: str) -> int | None:
    """The id of " word" if it is one known token (no BOS), else None."""
    ids = _encode(tokenizer, " " + word, add_bos=False)
    if len(ids) != 1 or ids[0] == _unknown_id(tokenizer):
        return None
    return ids[0]


@dataclasses.dataclass(frozen=True)
class TokenizedRoles:
    """A role set as token ids of one tokenizer.

    lexicon_ids [n_roles, max_words] int32 (-1 padding); words[r]: the kept words of role r;
    cue_ids[r]: token ids of role r's cue (with its leading space); subjects/verbs/objects: the
    kept single-token frame words; dropped: {group: words that are not one known token}.
    """

    role_set: RoleSet
    words: tuple[tuple[str, ...], ...]
    lexicon_ids: np.ndarray
    cue_ids: tuple[tuple[int, ...], ...]
    subjects: tuple[str, ...]
    verbs: tuple[str, ...]
    objects: tuple[str, ...]
    dropped: dict[str, tuple[str, ...]]

    @property
    def role_names(self) -> tuple[str, ...]:
        return self.role_set.role_names

    def partners(self, r: int) -> list[int]:
        """Roles whose cue has as many tokens as role r's (their prompts align position by position)."""
        return [b for b in range(len(self.cue_ids)) if b != r and len(self.cue_ids[b]) == len(self.cue_ids[r])
                and self.words[b]]


def tokenize_role_set(tokenizer: Any, roles: RoleSet, min_words: int = 2) -> TokenizedRoles:
    """Keep the lexicon and frame words that are single tokens (leading space) of `tokenizer`."""
    dropped: dict[str, tuple[str, ...]] = {}
    words, table = [], []
    for role in roles.roles:
        kept = [(w, single_token(tokenizer, w)) for w in dict.fromkeys(role.lexicon)]
        dropped[role.name] = tuple(w for w, i in kept if i is None)
        kept = [(w, i) for w, i in kept if i is not None]
        if len(kept) < min_words:
            kept = []  # too few words to choose from: the role is left out (reported)
        words.append(tuple(w for w, _ in kept))
        table.append([i for _, i in kept])
    width = max(1, max(len(t) for t in table))
    lexicon_ids = np.full((len(table), width), -1, np.int32)
    for r, ids in enumerate(table):
        lexicon_ids[r, :len(ids)] = ids
    cue_ids = tuple(tuple(_encode(tokenizer, " " + " ".join(role.cue), add_bos=False)) for role in roles.roles)
    frames = {}
    for group in ("subjects", "verbs", "objects"):
        values = getattr(roles, group)
        frames[group] = tuple(w for w in values if single_token(tokenizer, w) is not None)
        dropped[group] = tuple(w for w in values if w not in frames[group])
        if not frames[group]:
            raise ValueError(f"None of the {group} of role set {roles.name!r} is a single token of this tokenizer; "
                             "this role set does not suit the model (try role_set='corpus' or 'natural').")
    if sum(bool(w) for w in words) < 2:
        raise ValueError(f"Fewer than two roles of role set {roles.name!r} keep {min_words}+ single-token lexicon "
                         f"words with this tokenizer (dropped: { {k: len(v) for k, v in dropped.items()} }).")
    return TokenizedRoles(roles, tuple(words), lexicon_ids, cue_ids, frames["subjects"], frames["verbs"],
                          frames["objects"], dropped)


def frame_text(subject: str, verb: str, obj: str) -> str:
    return f"The {subject} {verb} the {obj}"


def prompt_tokens(tokenizer: Any, frame: str, role: Role, cue_ids: Sequence[int]) -> list[int] | None:
    """Token ids of `frame + cue`, or None when they are not the frame's ids followed by the cue's ids
    (the cue merged with the frame), which would make the pair differ outside the cue."""
    ids = _encode(tokenizer, frame + " " + " ".join(role.cue))
    prefix = _encode(tokenizer, frame)
    if ids != prefix + list(cue_ids):
        return None
    return ids


# ----------------------------------------------------------------------------------- scoring


@partial(jax.jit, static_argnames=("cfg",))
def _lexicon_logits(params: Any, tokens: Array, position: Array, lexicon_ids: Array, *, cfg: ModelConfig) -> Array:
    """[batch, n_roles, max_words] logits of every role's lexicon at `position` (-inf at padding).
    Keyed on the config, so every model (checkpoint) of one architecture shares the compilation."""
    logits, _ = make_forward(cfg, jit=False)(params, tokens, None, logits_at=position)
    picked = jnp.take(logits.astype(jnp.float32), jnp.maximum(lexicon_ids, 0), axis=-1)
    return jnp.where(lexicon_ids >= 0, picked, -jnp.inf)


def lexicon_logits(model: Any, rows: Sequence[Sequence[int]], lexicon_ids: np.ndarray, batch_size: int = 64,
                   pad_id: int = 0) -> np.ndarray:
    """[n, n_roles, max_words] lexicon logits after each prompt (ids rows of any lengths), in fixed-size
    padded batches so the forward compiles once per model config (`model` needs .config, .params)."""
    n = len(rows)
    width = max(len(r) for r in rows)
    tokens = np.full((n, width), pad_id, np.int32)
    position = np.zeros(n, np.int32)
    for i, r in enumerate(rows):
        tokens[i, :len(r)], position[i] = r, len(r) - 1
    size = min(batch_size, n)
    out = []
    for start in range(0, n, size):
        idx = np.minimum(np.arange(start, start + size), n - 1)
        values = _lexicon_logits(model.params, jax.device_put(tokens[idx]), jax.device_put(position[idx]),
                                 jax.device_put(lexicon_ids), cfg=model.config)
        out.append(np.asarray(values)[:min(size, n - start)])
    return np.concatenate(out)


# ----------------------------------------------------------------------------------- pairs


@dataclasses.dataclass(frozen=True)
class RolePairs:
    """Filtered role-cross pairs of one model, grouped by clean role.

    pairs[role]: MinimalPairs (answer = target, foil = foil); records[role]: per pair
    {"clean", "corrupt", "target", "foil", "corrupt_role"} texts; report[role]: counts (module
    docstring); tokens: the TokenizedRoles used; settings: how they were built.
    """

    pairs: dict[str, MinimalPairs]
    records: dict[str, list[dict[str, str]]]
    report: dict[str, dict[str, Any]]
    tokens: TokenizedRoles
    settings: dict[str, Any]

    @property
    def roles(self) -> tuple[str, ...]:
        """Roles with at least one kept pair, in role-set order."""
        return tuple(r for r in self.tokens.role_names if r in self.pairs)

    def counts(self) -> dict[str, int]:
        return {r: len(p) for r, p in self.pairs.items()}


def choose_pairs(values: np.ndarray, prompt_ids: np.ndarray, lexicon_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Apply the target/foil rule and the both-contexts filter to every (frame, clean role, corrupt role).

    values [F, R, R, W]: logits after prompt (frame f, cue of role a) of role b's lexicon words;
    prompt_ids [F, R, P] token ids of the prompts (-1 padding, or all -1 for an invalid prompt).
    Returns target/foil word indices [F, R, R] (clean role a, corrupt role b) and bool arrays
    clean_ok, corrupt_ok [F, R, R]. Words that occur in the prompt are never chosen.
    """
    F, R, _, W = values.shape
    # Words in a prompt (possible only if a lexicon shared a token with a frame) are excluded.
    in_prompt = (lexicon_ids[None, None, :, :, None] == prompt_ids[:, :, None, None, :]).any(-1)  # [F,R,R,W]
    masked = np.where(in_prompt | (lexicon_ids[None, None] < 0), -np.inf, values)
    own = masked[:, np.arange(R), np.arange(R)]                     # [F, R, W] role a's words after cue a
    best = own.argmax(-1)                                           # [F, R]
    target = np.broadcast_to(best[:, :, None], (F, R, R))           # clean role a's word
    foil = np.broadcast_to(best[:, None, :], (F, R, R))             # corrupt role b's word
    f_idx, a_idx, b_idx = np.meshgrid(np.arange(F), np.arange(R), np.arange(R), indexing="ij")
    # clean prompt (a): target (role a's word) vs foil (role b's word); corrupt prompt (b): the reverse.
    clean_t = masked[f_idx, a_idx, a_idx, target]
    clean_f = masked[f_idx, a_idx, b_idx, foil]
    corrupt_f = masked[f_idx, b_idx, b_idx, foil]
    corrupt_t = masked[f_idx, b_idx, a_idx, target]
    finite = np.isfinite(clean_t) & np.isfinite(clean_f) & np.isfinite(corrupt_f) & np.isfinite(corrupt_t)
    return {"target": target, "foil": foil, "clean_ok": finite & (clean_t > clean_f),
            "corrupt_ok": finite & (corrupt_f > corrupt_t), "valid": finite}


def build_role_pairs(model: Any, roles: str | RoleSet = "natural", *, pairs_per_role: int = 64,
                     role_names: Sequence[str] | None = None, seed: int = 0, oversample: float = 3.0,
                     require_correct: bool = True, batch_size: int = 64, min_frames: int = 32) -> RolePairs:
    """Role-cross minimal pairs for `model` (needs .tokenizer, .config, .params), filtered by it.

    Samples frames (seeded), scores every (frame, role) prompt once, applies the target/foil rule
    and the both-contexts filter (`require_correct=False` keeps wrong pairs too), then takes up to
    `pairs_per_role` kept pairs per clean role, round-robin over partner roles (each partner's kept
    frames in a seeded random order). max(min_frames, oversample * pairs_per_role / n_partners)
    frames are scored.
    """
    if pairs_per_role < 1:
        raise ValueError(f"pairs_per_role must be at least 1, got {pairs_per_role}.")
    if model.tokenizer is None:
        raise ValueError("The model has no tokenizer; role pairs are built from text.")
    rs = role_set(roles).select(role_names)
    tok = tokenize_role_set(model.tokenizer, rs)
    R = len(rs.roles)
    partners = {a: tok.partners(a) for a in range(R) if tok.words[a]}
    usable = [a for a, p in partners.items() if p]
    if not usable:
        raise ValueError(f"No two roles of {rs.name!r} have cues of equal token length with usable lexicons.")
    min_partners = min(len(partners[a]) for a in usable)
    n_total = len(tok.subjects) * len(tok.verbs) * len(tok.objects)
    # Scoring a frame costs one forward per role, far less than attributing a pair: score generously.
    n_frames = min(n_total, max(min_frames, math.ceil(oversample * pairs_per_role / min_partners)))
    rng = np.random.default_rng(seed)
    picks = rng.choice(n_total, size=n_frames, replace=False)
    frames = []
    for k in picks:
        s, rest = divmod(int(k), len(tok.verbs) * len(tok.objects))
        v, o = divmod(rest, len(tok.objects))
        frames.append(frame_text(tok.subjects[s], tok.verbs[v], tok.objects[o]))

    rows, where = [], []
    prompt_len = 0
    prompts: dict[tuple[int, int], list[int]] = {}
    for f, frame in enumerate(frames):
        for a in range(R):
            ids = prompt_tokens(model.tokenizer, frame, rs.roles[a], tok.cue_ids[a]) if tok.words[a] else None
            if ids is not None:
                prompts[(f, a)] = ids
                rows.append(ids)
                where.append((f, a))
                prompt_len = max(prompt_len, len(ids))
    if not rows:
        raise ValueError("No prompt tokenizes as frame + cue with this tokenizer.")
    pad_id = getattr(model.tokenizer, "pad_token_id", None) or 0
    scored = lexicon_logits(model, rows, tok.lexicon_ids, batch_size=batch_size, pad_id=int(pad_id))
    W = tok.lexicon_ids.shape[1]
    values = np.full((len(frames), R, R, W), -np.inf, np.float32)
    prompt_ids = np.full((len(frames), R, prompt_len), -1, np.int64)
    for (f, a), v in zip(where, scored):
        values[f, a] = v
        prompt_ids[f, a, :len(prompts[(f, a)])] = prompts[(f, a)]
    choice = choose_pairs(values, prompt_ids, tok.lexicon_ids)

    pairs, records, report = {}, {}, {}
    for a in range(R):
        name = rs.roles[a].name
        entry = {"candidates": 0, "kept": 0, "dropped_clean": 0, "dropped_corrupt": 0, "dropped_both": 0,
                 "used": 0, "partners": [rs.roles[b].name for b in partners.get(a, [])],
                 "lexicon_words": len(tok.words[a]), "lexicon_dropped": list(tok.dropped[name])}
        by_partner: dict[int, list[int]] = {b: [] for b in partners.get(a, [])}
        for b in partners.get(a, []):
            for f in range(len(frames)):
                if (f, a) not in prompts or (f, b) not in prompts or not choice["valid"][f, a, b]:
                    continue
                entry["candidates"] += 1
                ok_c, ok_x = bool(choice["clean_ok"][f, a, b]), bool(choice["corrupt_ok"][f, a, b])
                if ok_c and ok_x:
                    entry["kept"] += 1
                else:
                    entry["dropped_both" if not (ok_c or ok_x) else "dropped_clean" if not ok_c else
                          "dropped_corrupt"] += 1
                if (ok_c and ok_x) or not require_correct:
                    by_partner[b].append(f)
        # Each partner's kept frames in their own seeded order, so a small sample still spans many frames.
        for b in by_partner:
            order = np.random.default_rng([seed, a, b]).permutation(len(by_partner[b]))
            by_partner[b] = [by_partner[b][i] for i in order]
        chosen = _round_robin(by_partner, pairs_per_role)
        entry["used"] = len(chosen)
        entry["used_by_partner"] = {rs.roles[b].name: sum(1 for bb, _ in chosen if bb == b) for b in by_partner}
        report[name] = entry
        if not chosen:
            continue
        clean, corrupt, answer, foil, recs = [], [], [], [], []
        for b, f in chosen:
            t_id = int(tok.lexicon_ids[a, choice["target"][f, a, b]])
            f_id = int(tok.lexicon_ids[b, choice["foil"][f, a, b]])
            clean.append(prompts[(f, a)])
            corrupt.append(prompts[(f, b)])
            answer.append(t_id)
            foil.append(f_id)
            recs.append({"clean": frames[f] + " " + " ".join(rs.roles[a].cue),
                         "corrupt": frames[f] + " " + " ".join(rs.roles[b].cue),
                         "target": " " + tok.words[a][choice["target"][f, a, b]],
                         "foil": " " + tok.words[b][choice["foil"][f, a, b]],
                         "corrupt_role": rs.roles[b].name})
        pairs[name] = from_tokens(clean, corrupt, answer, foil, pad_id=int(pad_id))
        records[name] = recs
    settings = {"role_set": rs.name, "role_set_description": rs.description, "pairs_per_role": pairs_per_role,
                "seed": seed, "frames_scored": len(frames), "oversample": oversample,
                "require_correct": require_correct,
                "rule": "target = clean role's top-ranked lexicon word after the clean prompt; foil = corrupt "
                        "role's top-ranked word after the corrupt prompt; kept iff logit(target) > logit(foil) "
                        "after the clean prompt and logit(foil) > logit(target) after the corrupt prompt",
                "frame_template": "The {subject} {verb} the {object} + cue", "frames": frames,
                "dropped_frame_words": {g: list(tok.dropped[g]) for g in ("subjects", "verbs", "objects")}}
    return RolePairs(pairs, records, report, tok, settings)


def _round_robin(by_partner: Mapping[int, list[int]], limit: int) -> list[tuple[int, int]]:
    """(partner, frame) picks alternating over partners in order until `limit` or exhaustion."""
    queues = {b: list(fs) for b, fs in by_partner.items()}
    out: list[tuple[int, int]] = []
    while len(out) < limit and any(queues.values()):
        for b in sorted(queues):
            if queues[b] and len(out) < limit:
                out.append((b, queues[b].pop(0)))
    return out
