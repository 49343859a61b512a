"""Tasks of Merullo, Eickhoff & Pavlick's vector-arithmetic paper, and their extractive twins.

Abstractive tasks (the answer is not in the context; it comes from pretraining memory):

    capitals     "Q: What is the capital of Poland?\\nA:"                      -> " Warsaw"
    uppercase    "Q: On the desk, I see a brown pen, ... What color is the pen?\\nA:" -> " Brown"
                 (the context holds only lowercase colours)
    past-tense   "Today I abolish. Yesterday I"                               -> " abolished"

Extractive twins put the answer string in the context, so the model can copy it:

    capitals-extractive    "Q: The capital of Poland is Warsaw. What is the capital of Poland?\\nA:"
    uppercase-extractive   the same colour question answered in lowercase (" brown")
    past-tense-extractive  "Yesterday I abolished. Today I abolish. Yesterday I"

Every item has an `argument` (what the relation is applied to, " Poland", " brown", " abolish") and
an `answer` (" Warsaw", " Brown", " abolished"), both with the leading space the model sees in a
prompt; answers are scored by their first token (experiments.md B.3). The capitals come from
`jaxcirc/data/world_capitals.csv` (the authors' list); the colour questions and verb lists are
generated here from our own word lists (no download).
"""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

DATA_DIR = Path(__file__).parent / "data"
CAPITALS_CSV = DATA_DIR / "world_capitals.csv"

ABSTRACTIVE = ("capitals", "uppercase", "past-tense")
EXTRACTIVE = tuple(f"{t}-extractive" for t in ABSTRACTIVE)
TASKS = ABSTRACTIVE + EXTRACTIVE
TaskKind = Literal["abstractive", "extractive"]

# Shots per prompt. The paper's demo shows one shot; its shot counts are not recoverable
# (experiments.md B.3, [NF]). These keep prompts short on CPU: colour questions are long.
DEFAULT_SHOTS = {"capitals": 3, "uppercase": 1, "past-tense": 4}


class TokenizerLike(Protocol):
    def encode(self, text: str) -> list[int]: ...


@dataclasses.dataclass(frozen=True)
class Item:
    """One query of a task. `argument`/`answer` carry the leading space the model sees.

    `fields` holds what the prompt template needs (country, colour, object, scene, verb...).
    """

    task: str
    argument: str
    answer: str
    fields: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False, compare=False)
    subset: str = ""


# --------------------------------------------------------------------------- capitals

def load_capitals(path: str | Path = CAPITALS_CSV) -> list[dict[str, str]]:
    """The rows of world_capitals.csv (country, capital, type): 248 rows, 247 countries."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall jaxcirc (it ships jaxcirc/data/world_capitals.csv).")
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"country", "capital"} <= set(rows[0]):
        raise ValueError(f"{path} must have 'country' and 'capital' columns.")
    return rows


def capital_items(rows: Sequence[dict[str, str]] | None = None) -> list[Item]:
    """One item per country (the first listed capital when a country has two, e.g. Bolivia)."""
    rows = load_capitals() if rows is None else rows
    items, seen = [], set()
    for row in rows:
        country, capital = row["country"].strip(), row["capital"].strip()
        if country in seen:
            continue
        seen.add(country)
        items.append(Item("capitals", " " + country, " " + capital, {"country": country, "capital": capital}))
    return items


# --------------------------------------------------------------------------- colours (uppercasing)

# Colours whose lowercase and capitalised forms are single, different tokens in common BPE
# vocabularies; BIG-bench's rarer ones (mauve, fuchsia...) split into pieces.
COLOURS = ("red", "orange", "yellow", "green", "blue", "brown", "purple", "pink", "black", "white",
           "grey", "silver", "gold")
OBJECTS = ("pen", "mug", "notebook", "keychain", "pair of sunglasses", "cat toy", "dog leash", "booklet",
           "stress ball", "teddy bear", "phone charger", "jug", "cup", "plate", "textbook", "puzzle",
           "envelope", "crayon", "bracelet", "necklace", "paperclip", "pencil", "sheet of paper", "scarf",
           "backpack", "umbrella", "candle", "wallet", "hat", "sock")
SURFACES = ("table", "floor", "desk", "nightstand", "shelf", "couch", "bed", "counter")


def _object_list(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + ", and " + parts[-1]


def colour_items(n: int, seed: int = 0, n_objects: tuple[int, int] = (2, 3)) -> list[Item]:
    """`n` generated colour questions in BIG-bench reasoning_about_colored_objects style.

    "On the desk, I see a brown pen, a red mug, and a blue scarf. What color is the mug?"
    The argument is the lowercase colour (" red"), the answer the capitalised one (" Red");
    objects in one scene have distinct colours so the question has one answer. BIG-bench scenes
    hold up to six objects; the default 2-3 keeps prompts short and within a 135M model's reach.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}.")
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(n):
        k = int(rng.integers(n_objects[0], n_objects[1] + 1))
        objects = [OBJECTS[i] for i in rng.choice(len(OBJECTS), k, replace=False)]
        colours = [COLOURS[i] for i in rng.choice(len(COLOURS), k, replace=False)]
        target = int(rng.integers(k))
        surface = SURFACES[int(rng.integers(len(SURFACES)))]
        viewer = "I see" if rng.random() < 0.5 else "you see"
        scene = f"On the {surface}, {viewer} " + _object_list([f"a {c} {o}" for c, o in zip(colours, objects)]) + "."
        colour = colours[target]
        items.append(Item("uppercase", " " + colour, " " + colour.capitalize(),
                          {"scene": scene, "object": objects[target], "colour": colour}))
    return items


# --------------------------------------------------------------------------- verbs (past tense)

REGULAR_VERBS = (
    "abolish", "accept", "achieve", "add", "admire", "admit", "advise", "agree", "allow", "announce",
    "answer", "appear", "arrange", "arrive", "ask", "attach", "attack", "attend", "bake", "believe",
    "borrow", "bounce", "brush", "call", "carry", "change", "cheat", "check", "chew", "clean",
    "climb", "close", "collect", "complain", "cook", "cough", "count", "crawl", "cross", "dance",
    "decide", "deliver", "depend", "describe", "destroy", "discover", "dress", "drop", "enjoy", "enter",
    "escape", "explain", "fail", "fetch", "fill", "finish", "fix", "float", "follow", "gather",
    "greet", "guess", "happen", "hate", "help", "hope", "hug", "hunt", "ignore", "imagine",
    "improve", "invent", "invite", "join", "jump", "kick", "kiss", "knock", "laugh", "learn",
    "like", "listen", "live", "look", "love", "marry", "measure", "melt", "miss", "move",
    "need", "notice", "obey", "offer", "open", "order", "paint", "pass", "pick", "plant",
    "play", "pray", "prefer", "prepare", "pretend", "promise", "pull", "punish", "push", "reach",
    "receive", "remember", "repair", "repeat", "rescue", "return", "rush", "save", "scream", "search",
    "share", "shout", "smile", "sneeze", "start", "stay", "stop", "study", "suggest", "talk",
    "thank", "touch", "try", "turn", "visit", "wait", "walk", "want", "wash", "watch",
    "whisper", "wish", "work", "worry", "yell",
)
# Verbs whose final consonant doubles before -ed (stress on the last syllable or CVC monosyllable).
_DOUBLING = frozenset({"admit", "drop", "hug", "prefer", "stop", "beg", "clap", "grab", "nod", "plan",
                       "rob", "rub", "skip", "slip", "step", "trip", "wrap", "commit", "regret", "permit"})

IRREGULAR_VERBS = (
    ("awake", "awoke"), ("bear", "bore"), ("become", "became"), ("begin", "began"), ("bend", "bent"),
    ("bind", "bound"), ("bite", "bit"), ("bleed", "bled"), ("blow", "blew"), ("break", "broke"),
    ("breed", "bred"), ("bring", "brought"), ("build", "built"), ("buy", "bought"), ("catch", "caught"),
    ("choose", "chose"), ("cling", "clung"), ("come", "came"), ("creep", "crept"), ("deal", "dealt"),
    ("dig", "dug"), ("do", "did"), ("draw", "drew"), ("drink", "drank"), ("drive", "drove"),
    ("eat", "ate"), ("fall", "fell"), ("feed", "fed"), ("feel", "felt"), ("fight", "fought"),
    ("find", "found"), ("flee", "fled"), ("fling", "flung"), ("fly", "flew"), ("forbid", "forbade"),
    ("forget", "forgot"), ("forgive", "forgave"), ("freeze", "froze"), ("get", "got"), ("give", "gave"),
    ("go", "went"), ("grind", "ground"), ("grow", "grew"), ("hang", "hung"), ("have", "had"),
    ("hear", "heard"), ("hide", "hid"), ("hold", "held"), ("keep", "kept"), ("kneel", "knelt"),
    ("know", "knew"), ("lay", "laid"), ("lead", "led"), ("leave", "left"), ("lend", "lent"),
    ("light", "lit"), ("lose", "lost"), ("make", "made"), ("mean", "meant"), ("meet", "met"),
    ("pay", "paid"), ("ride", "rode"), ("ring", "rang"), ("rise", "rose"), ("run", "ran"),
    ("say", "said"), ("see", "saw"), ("seek", "sought"), ("sell", "sold"), ("send", "sent"),
    ("shake", "shook"), ("shine", "shone"), ("shoot", "shot"), ("shrink", "shrank"), ("sing", "sang"),
    ("sink", "sank"), ("sit", "sat"), ("sleep", "slept"), ("slide", "slid"), ("speak", "spoke"),
    ("speed", "sped"), ("spend", "spent"), ("spin", "spun"), ("spit", "spat"), ("spring", "sprang"),
    ("stand", "stood"), ("steal", "stole"), ("stick", "stuck"), ("sting", "stung"), ("stink", "stank"),
    ("stride", "strode"), ("strike", "struck"), ("swear", "swore"), ("sweep", "swept"), ("swim", "swam"),
    ("swing", "swung"), ("take", "took"), ("teach", "taught"), ("tear", "tore"), ("tell", "told"),
    ("think", "thought"), ("throw", "threw"), ("tread", "trod"), ("wake", "woke"), ("wear", "wore"),
    ("weave", "wove"), ("weep", "wept"), ("win", "won"), ("wind", "wound"), ("write", "wrote"),
    ("overcome", "overcame"), ("understand", "understood"), ("withdraw", "withdrew"),
    ("mislead", "misled"), ("foresee", "foresaw"),
)


def regular_past(verb: str) -> str:
    """English regular past tense: bake->baked, carry->carried, stop->stopped, walk->walked."""
    if not verb.isalpha() or not verb.islower():
        raise ValueError(f"Expected a lowercase verb, got {verb!r}.")
    if verb.endswith("e"):
        return verb + "d"
    if len(verb) > 1 and verb.endswith("y") and verb[-2] not in "aeiou":
        return verb[:-1] + "ied"
    if verb in _DOUBLING:
        return verb + verb[-1] + "ed"
    return verb + "ed"


def past_tense_items(subsets: Sequence[str] = ("regular", "irregular")) -> list[Item]:
    """Present -> past items, regular (rule-formed) and irregular (listed) verbs."""
    pairs = []
    for subset in subsets:
        if subset == "regular":
            pairs += [(v, regular_past(v), "regular") for v in REGULAR_VERBS]
        elif subset == "irregular":
            pairs += [(v, p, "irregular") for v, p in IRREGULAR_VERBS]
        else:
            raise ValueError(f"Unknown past-tense subset {subset!r}; use 'regular' and/or 'irregular'.")
    return [Item("past-tense", " " + v, " " + p, {"verb": v, "past": p}, subset=s) for v, p, s in pairs]


# --------------------------------------------------------------------------- prompts

def base_task(task: str) -> str:
    """'capitals-extractive' -> 'capitals'; checks the name."""
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; choose one of {', '.join(TASKS)}.")
    return task.removesuffix("-extractive")


def task_kind(task: str) -> TaskKind:
    base_task(task)
    return "extractive" if task.endswith("-extractive") else "abstractive"


def task_items(task: str, n_colour_items: int = 300, seed: int = 0) -> list[Item]:
    """All items of a task (extractive twins share their abstractive task's items)."""
    base = base_task(task)
    if base == "capitals":
        return capital_items()
    if base == "uppercase":
        return colour_items(n_colour_items, seed)
    return past_tense_items()


def answer_for(task: str, item: Item) -> str:
    """The expected continuation of `item` under `task` (extractive uppercase answers in lowercase)."""
    return item.argument if task == "uppercase-extractive" else item.answer


def format_example(task: str, item: Item, with_answer: bool) -> str:
    """One demonstration (with_answer) or the query (without), in the paper's formats (B.3)."""
    base = base_task(task)
    f = item.fields
    answer = answer_for(task, item) if with_answer else ""
    if base == "capitals":
        hint = f"The capital of {f['country']} is {f['capital']}. " if task_kind(task) == "extractive" else ""
        return f"Q: {hint}What is the capital of {f['country']}?\nA:{answer}"
    if base == "uppercase":
        return f"Q: {f['scene']} What color is the {f['object']}?\nA:{answer}"
    hint = f"Yesterday I {f['past']}. " if task_kind(task) == "extractive" else ""
    return f"{hint}Today I {f['verb']}. Yesterday I{answer + '.' if with_answer else ''}"


def _separator(task: str) -> str:
    return " " if base_task(task) == "past-tense" else "\n"


def build_prompt(task: str, query: Item, shots: Sequence[Item] = ()) -> str:
    """Few-shot prompt: demonstrations with answers, then the query without its answer."""
    parts = [format_example(task, s, True) for s in shots] + [format_example(task, query, False)]
    return _separator(task).join(parts)


def choose_shots(items: Sequence[Item], query_index: int, n_shots: int, rng: np.random.Generator,
                 task: str = "") -> list[Item]:
    """`n_shots` demonstrations other than the query, with different arguments and answers, so the
    query's answer never appears in an abstractive prompt."""
    query = items[query_index]
    candidates = [i for i, it in enumerate(items) if i != query_index and it.argument != query.argument
                  and it.answer.lower() != query.answer.lower()]
    if len(candidates) < n_shots:
        raise ValueError(f"Task {task or query.task!r} has only {len(candidates)} items usable as shots "
                         f"for query {query.argument!r}; ask for fewer than {n_shots} shots.")
    picked = rng.choice(len(candidates), n_shots, replace=False)
    return [items[candidates[int(i)]] for i in picked]


@dataclasses.dataclass(frozen=True)
class PromptSet:
    """Prompts of one task with their items; `shots[i]` are the demonstrations of prompt i."""

    task: str
    prompts: list[str]
    items: list[Item]
    shots: list[list[Item]]

    @property
    def kind(self) -> TaskKind:
        return task_kind(self.task)

    def answers(self) -> list[str]:
        return [answer_for(self.task, it) for it in self.items]


def sample_queries(task: str, n: int, seed: int = 0) -> tuple[list[Item], list[int]]:
    """All items of `task` and the indices of `n` query items drawn without replacement."""
    items = task_items(task, seed=seed)
    if n > len(items):
        raise ValueError(f"Task {task!r} has {len(items)} items; asked for {n}.")
    rng = np.random.default_rng(seed)
    return items, sorted(int(i) for i in rng.choice(len(items), n, replace=False))


def few_shot_prompts(task: str, n: int, n_shots: int | None = None, seed: int = 0) -> PromptSet:
    """`n` few-shot prompts of `task`. The same (n, seed) gives the same queries and shots for a task
    and its extractive twin, so the two can be compared item by item."""
    base = base_task(task)
    n_shots = DEFAULT_SHOTS[base] if n_shots is None else n_shots
    items, chosen = sample_queries(task, n, seed)
    rng = np.random.default_rng(seed + 1)
    shots = [choose_shots(items, q, n_shots, rng, task) for q in chosen]
    queries = [items[q] for q in chosen]
    prompts = [build_prompt(task, q, s) for q, s in zip(queries, shots)]
    return PromptSet(task, prompts, queries, shots)


def zero_shot_prompts(task: str, items: Sequence[Item]) -> PromptSet:
    """The queries alone (no demonstrations)."""
    return PromptSet(task, [build_prompt(task, it) for it in items], list(items), [[] for _ in items])


# Neutral filler words for copy contexts: no colours, countries or verbs of the task lists.
NEUTRAL_WORDS = ("table", "mug", "free", "lamp", "river", "window", "garden", "cloud", "stone", "bottle",
                 "chair", "ocean", "pillow", "ladder", "basket", "mirror", "forest", "ticket", "button",
                 "engine", "planet", "rocket", "bridge", "castle", "meadow", "pocket", "violin", "carpet",
                 "tunnel", "island", "kettle", "blanket", "harbor", "pepper", "saddle", "marble", "anchor",
                 "tiger", "velvet", "quiet", "gentle", "narrow", "simple", "early", "open", "soft")


def copy_context(argument: str, words: Sequence[str], repeats: int = 3) -> str:
    """Neutral copy context: "table mug free Poland table mug free Poland table mug free".

    The model predicts the argument by induction; an o-vector should turn that into the answer.
    `argument` carries its leading space (" Poland").
    """
    if not argument.startswith(" "):
        raise ValueError(f"argument {argument!r} must start with a space, as the model sees it mid-sentence.")
    filler = " ".join(words)
    return (filler + argument + " ") * (repeats - 1) + filler


def copy_contexts(items: Sequence[Item], seed: int = 0, n_words: int = 3, repeats: int = 3) -> list[str]:
    rng = np.random.default_rng(seed + 2)
    return [copy_context(it.argument, [NEUTRAL_WORDS[i] for i in rng.choice(len(NEUTRAL_WORDS), n_words, replace=False)],
                         repeats) for it in items]


# --------------------------------------------------------------------------- scoring

def first_token(tokenizer: TokenizerLike, text: str) -> int:
    """The first token id of `text` (e.g. " Warsaw"), without any BOS the tokenizer adds."""
    try:
        ids = tokenizer.encode(text, add_bos=False)  # type: ignore[call-arg]
    except TypeError:
        ids = tokenizer.encode(text)
        bos = getattr(tokenizer, "bos_id", None)
        if ids and bos is not None and ids[0] == bos:
            ids = ids[1:]
    if not ids:
        raise ValueError(f"{text!r} tokenizes to nothing.")
    return int(ids[0])


def first_tokens(tokenizer: TokenizerLike, texts: Sequence[str]) -> np.ndarray:
    """[n] int32 first-token ids of `texts`."""
    return np.array([first_token(tokenizer, t) for t in texts], np.int32)


def first_token_correct(top1: Any, answer_ids: Any) -> np.ndarray:
    """[n] bool: the model's top-1 next token equals the answer's first token."""
    return np.asarray(top1) == np.asarray(answer_ids)
