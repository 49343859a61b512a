"""Train small decoder-only models with optax, checkpointed with orbax at a Pythia-like schedule.

    jaxcirc train role_suite --out runs/role_suite        # the built-in three-size suite
    results = train_command("my_config.toml", "runs/mine")

    trainer = Trainer(TrainConfig(model={"family": "llama", "n_layers": 2, "d_model": 64, "n_heads": 4},
                                  steps=300), texts=my_sentences, tokenizer=my_tokenizer)
    result = trainer.run("runs/llama")                    # resumes if runs/llama holds a run

Every checkpoint is a folder `OUT/step_N/` that `jaxcirc.load` opens (jaxcirc.json + params) with a
`train_state/` subfolder (optimizer state, data position) for resuming. A checkpoint is written
into a temporary folder and renamed into place, so `step_N/` is either complete or absent. A run
started again on the same OUT resumes from its last checkpoint and reaches bit-identical weights
to an uninterrupted run: the data order is a pure function of (seed, step), the step is the only
iterator state, and the training step has no other randomness.

Training is data-parallel over the available devices: the batch is sharded over a `data` mesh
axis and the parameters and optimizer state are replicated (`NamedSharding`); the gradient mean
is XLA's all-reduce, so results equal one device's up to float summation order.

OUT also gets `train_config.json`, `metrics.jsonl` (one record per step: step, loss, lr,
grad_norm, time_s; at checkpoints also val_loss and the task accuracies), `results.json`,
`report.md` and `figures/loss.png`, `figures/accuracy.png`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from jaxcirc import checkpoint
from jaxcirc.checkpoints import checkpoint_steps, checkpoints
from jaxcirc.model import Model
from jaxcirc.models.config import ModelConfig, RopeConfig
from jaxcirc.models.transformer import make_forward, param_shapes
from jaxcirc.sharding import make_mesh
from jaxcirc.tokenizer import Tokenizer

Array = jax.Array
Params = dict[str, Any]
Texts = Sequence[str] | Callable[[], Iterable[str]]

__all__ = ["TrainConfig", "Trainer", "TrainResult", "model_config", "load_config", "train_command", "training_init",
           "lr_schedule", "make_optimizer", "BUILTIN_CONFIGS"]

BUILTIN_CONFIGS = {name: Path(__file__).parent / "suites" / f"{name}.toml" for name in ("role_suite", "short_context")}
TRAIN_STATE = "train_state"
STATE_FILE = "state.json"

# Per family: the switches that make a Pythia-style (gpt_neox), Llama-style or GPT-2-style model.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "gpt_neox": dict(norm="layernorm", activation="gelu", parallel_residual=True, positional="rotary",
                     tied_embeddings=False, qkv_bias=True, o_bias=True, mlp_bias=True),
    "llama": dict(norm="rmsnorm", activation="silu", gated_mlp=True, positional="rotary", tied_embeddings=True),
    "gpt2": dict(norm="layernorm", activation="gelu_new", positional="learned", tied_embeddings=True,
                 qkv_bias=True, o_bias=True, mlp_bias=True),
}
ROTARY_PCT = {"gpt_neox": 0.25, "llama": 1.0}


# ----------------------------------------------------------------------------- configuration

@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run. `model` is a model spec (see `model_config`); `corpus` and `eval` say
    what to train on and measure (see `load_config` for their keys)."""

    model: Mapping[str, Any]
    name: str = "model"
    steps: int = 1000
    batch_size: int = 32
    seq_len: int = 16
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 0  # 0: steps // 10
    keep_train_state: int = 2  # checkpoints that keep their optimizer state (the newest ones)
    corpus: Mapping[str, Any] = dataclasses.field(default_factory=lambda: {"kind": "role"})
    eval: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # {}: the role task iff the corpus is the role corpus

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "warmup_steps", "checkpoint_every", "keep_train_state"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"TrainConfig.{name} must be a non-negative integer, got {value!r}.")
        if self.steps < 1 or self.batch_size < 1 or self.seq_len < 2:
            raise ValueError("TrainConfig needs steps >= 1, batch_size >= 1 and seq_len >= 2.")
        if self.keep_train_state < 1:
            raise ValueError("keep_train_state must be >= 1 (the newest checkpoint is what a run resumes from).")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"Need lr > 0 and 0 <= min_lr_ratio <= 1, got lr={self.lr}, min_lr_ratio={self.min_lr_ratio}.")

    @property
    def checkpoint_interval(self) -> int:
        return self.checkpoint_every or max(1, self.steps // 10)

    def checkpoint_steps(self) -> list[int]:
        return checkpoint_steps(self.steps, self.checkpoint_interval)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown training settings {unknown}; known: {sorted(known)}.")
        return cls(**data)


def model_config(spec: Mapping[str, Any], d_vocab: int, n_ctx: int) -> ModelConfig:
    """A `ModelConfig` from a short spec: family, n_layers, d_model, n_heads, and optionally
    d_head (d_model / n_heads), d_mlp (4 d_model; 8/3 d_model rounded up to 8 for gated MLPs),
    n_kv_heads, rotary_pct (0.25 for gpt_neox, 1 for llama), rope_theta (10000), and any other
    ModelConfig field (norm, tied_embeddings, initializer_range, ...)."""
    spec = dict(spec)
    missing = [k for k in ("family", "n_layers", "d_model", "n_heads") if k not in spec]
    if missing:
        raise ValueError(f"Model spec {spec} lacks {missing}; give at least family, n_layers, d_model, n_heads.")
    family = spec.pop("family")
    if family not in FAMILY_DEFAULTS:
        raise ValueError(f"Unknown model family {family!r}; trainable families: {sorted(FAMILY_DEFAULTS)}.")
    fields = {**FAMILY_DEFAULTS[family], "family": family}
    d_model, n_heads = int(spec.pop("d_model")), int(spec.pop("n_heads"))
    if "d_head" not in spec and d_model % n_heads:
        raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}; give d_head explicitly.")
    d_head = int(spec.pop("d_head", d_model // n_heads))
    gated = spec.get("gated_mlp", fields.get("gated_mlp", False))
    default_mlp = 8 * ((8 * d_model // 3 + 7) // 8) if gated else 4 * d_model
    rotary_pct = float(spec.pop("rotary_pct", ROTARY_PCT.get(family, 1.0)))
    rope_theta = float(spec.pop("rope_theta", 10000.0))
    fields.update(n_layers=int(spec.pop("n_layers")), d_model=d_model, n_heads=n_heads, d_head=d_head,
                  d_mlp=int(spec.pop("d_mlp", default_mlp)), d_vocab=d_vocab, n_ctx=n_ctx)
    positional = spec.get("positional", fields["positional"])
    if positional == "rotary":
        rotary_dim = max(2, 2 * int(d_head * rotary_pct / 2))
        fields["rope"] = RopeConfig(theta=rope_theta, rotary_dim=rotary_dim)
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ValueError(f"Unknown model settings {unknown}; use family, n_layers, d_model, n_heads, d_head, d_mlp, "
                         f"rotary_pct, rope_theta or a ModelConfig field ({sorted(known)}).")
    fields.update(spec)
    return ModelConfig(**fields)


def lr_schedule(config: TrainConfig) -> optax.Schedule:
    """Linear warmup from lr / warmup_steps to `lr`, then cosine decay to `lr * min_lr_ratio` at the last step."""
    warmup = min(config.warmup_steps, config.steps - 1)
    # Start the warmup at lr / warmup rather than 0, so that step 1 already differs from step 0.
    return optax.warmup_cosine_decay_schedule(config.lr / max(warmup, 1), config.lr, warmup,
                                              max(config.steps, warmup + 1), end_value=config.lr * config.min_lr_ratio)


def training_init(cfg: ModelConfig, seed: int) -> Params:
    """Initial parameters for training, drawn with numpy (no compilation, the same on any device
    count): weight matrices normal(0, initializer_range), the residual-writing ones (attention
    W_O, MLP W_out) scaled by 1/sqrt(2 n_layers) as in GPT-2, norm weights 1, biases 0."""
    rng = np.random.default_rng(seed)
    output_scale = 1.0 / math.sqrt(2 * cfg.n_layers)

    def draw(path, shape) -> np.ndarray:
        name = str(getattr(path[-1], "key", ""))
        if name.startswith("W_"):
            std = cfg.initializer_range * (output_scale if name in ("W_O", "W_out") else 1.0)
            return (std * rng.standard_normal(shape.shape)).astype(shape.dtype)
        if name == "w":
            return np.ones(shape.shape, shape.dtype)
        if name.startswith("b"):
            return np.zeros(shape.shape, shape.dtype)
        raise ValueError(f"training_init does not know how to initialise parameter {jax.tree_util.keystr(path)}.")

    return jax.tree_util.tree_map_with_path(draw, param_shapes(cfg))


def _decay_mask(params: Params) -> Params:
    # Weight decay on weight matrices only (W_*), not on norms or biases.
    return jax.tree_util.tree_map_with_path(lambda path, _: str(getattr(path[-1], "key", "")).startswith("W_"), params)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Global-norm gradient clipping, then AdamW on the warmup + cosine schedule."""
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip) if config.grad_clip > 0 else optax.identity(),
        optax.adamw(lr_schedule(config), b1=config.b1, b2=config.b2, eps=config.eps,
                    weight_decay=config.weight_decay, mask=_decay_mask),
    )


# ----------------------------------------------------------------------------- data

def text_windows(tokenizer: Tokenizer, texts: Iterable[str], seq_len: int) -> Iterator[tuple[np.ndarray, int]]:
    """Each text as BOS + ids + EOS, cut into windows of seq_len + 1 tokens that overlap by one
    (every token is a target once). Yields (window [seq_len + 1] int32 right-padded, real length)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos = tokenizer.eos_token_id
    for text in texts:
        ids = tokenizer.encode(text)
        if eos is not None and not tokenizer.add_eos:
            ids = [*ids, eos]
        for start in range(0, max(len(ids) - 1, 1), seq_len):
            chunk = ids[start:start + seq_len + 1]
            if len(chunk) < 2:
                continue
            window = np.full(seq_len + 1, pad, dtype=np.int32)
            window[:len(chunk)] = chunk
            yield window, len(chunk)


def _as_batch(windows: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [batch, seq_len + 1] int32, loss mask [batch, seq_len] float32 at real targets)."""
    mask = (np.arange(windows.shape[1] - 1)[None, :] + 1 < lengths[:, None]).astype(np.float32)
    return windows, mask


class ShuffledWindows:
    """A finite corpus: windows reshuffled every epoch by a permutation seeded with (seed, epoch).
    `batch(step, size)` is a pure function of its arguments, so resuming needs only the step."""

    def __init__(self, windows: np.ndarray, lengths: np.ndarray, seed: int):
        if len(windows) == 0:
            raise ValueError("The corpus produced no training windows (every text is empty?).")
        self.windows, self.lengths, self.seed = windows, lengths, seed

    def indices(self, start: int, count: int) -> np.ndarray:
        n, out = len(self.windows), []
        while count > 0:
            epoch, offset = divmod(start, n)
            order = np.random.default_rng([self.seed, epoch]).permutation(n)
            take = order[offset:offset + count]
            out.append(take)
            start, count = start + len(take), count - len(take)
        return np.concatenate(out)

    def batch(self, step: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        idx = self.indices(step * size, size)
        return _as_batch(self.windows[idx], self.lengths[idx])

    def state(self, step: int, size: int) -> dict[str, Any]:
        return {"kind": "shuffled", "windows_seen": step * size, "n_windows": len(self.windows), "seed": self.seed}


class StreamedWindows:
    """A corpus from a generator factory (called again on resume, and fast-forwarded): windows in
    the order the generator yields them. Batches must be requested for consecutive steps."""

    def __init__(self, factory: Callable[[], Iterable[str]], tokenizer: Tokenizer, seq_len: int):
        self.factory, self.tokenizer, self.seq_len = factory, tokenizer, seq_len
        self._iterator: Iterator[tuple[np.ndarray, int]] | None = None
        self._seen = 0

    def batch(self, step: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        start = step * size
        if self._iterator is None or self._seen > start:
            self._iterator, self._seen = text_windows(self.tokenizer, self.factory(), self.seq_len), 0
        rows = []
        while self._seen < start + size:
            try:
                item = next(self._iterator)
            except StopIteration:
                raise ValueError(f"The text generator ran out after {self._seen} windows; training step {step} "
                                 f"needs {start + size}. Give a longer (or endless) generator.") from None
            if self._seen >= start:
                rows.append(item)
            self._seen += 1
        windows, lengths = zip(*rows)
        return _as_batch(np.stack(windows), np.asarray(lengths))

    def state(self, step: int, size: int) -> dict[str, Any]:
        return {"kind": "stream", "windows_seen": step * size}


def _data_source(texts: Texts, tokenizer: Tokenizer, seq_len: int, seed: int):
    if callable(texts):
        return StreamedWindows(texts, tokenizer, seq_len)
    pairs = list(text_windows(tokenizer, texts, seq_len))
    if not pairs:
        raise ValueError("The corpus produced no training windows (is it empty?).")
    windows, lengths = zip(*pairs)
    return ShuffledWindows(np.stack(windows), np.asarray(lengths, dtype=np.int64), seed)


# ----------------------------------------------------------------------------- corpus and task

@dataclasses.dataclass(frozen=True)
class _Task:
    """What to measure at checkpoints: prompts [n, pos] for the role task and a validation set."""

    prompts: dict[str, tuple[np.ndarray, np.ndarray]]  # split -> (tokens [n, pos], roles [n])
    lexicon_ids: np.ndarray | None
    role_names: tuple[str, ...]
    val: tuple[np.ndarray, np.ndarray] | None  # (tokens [n, seq_len + 1], mask [n, seq_len])


def _resolve(path: str, base_dir: Path | None) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() or base_dir is None else base_dir / p


def corpus_from_config(corpus: Mapping[str, Any], base_dir: Path | None = None) -> tuple[Texts, Tokenizer, Any]:
    """(texts, tokenizer, role corpus or None) for a `[corpus]` table.

    kind = "role": the built-in semantic-role corpus (n_sentences, seed; sentences_per_text > 1
    runs that many sentences together into one text, for models that should use a longer context).
    kind = "file": `path` (one text per line, relative to the config file), `tokenizer` = "word"
    (word-level over the corpus's words) or a tokenizer.json / HF directory path.
    """
    from jaxcirc import role_corpus

    corpus = dict(corpus)
    kind = corpus.pop("kind", "role")
    if kind == "role":
        extra = sorted(set(corpus) - {"n_sentences", "seed", "sentences_per_text"})
        if extra:
            raise ValueError(f"Unknown [corpus] keys {extra} for kind='role'; use n_sentences, seed, sentences_per_text.")
        per_text = int(corpus.get("sentences_per_text", 1))
        if per_text < 1:
            raise ValueError(f"[corpus] sentences_per_text must be >= 1, got {per_text}.")
        roles = role_corpus.RoleCorpus()
        texts = roles.sentences(int(corpus.get("n_sentences", 20000)), seed=int(corpus.get("seed", 0)))
        texts = [" ".join(texts[i:i + per_text]) for i in range(0, len(texts), per_text)]
        return texts, roles.tokenizer(), roles
    if kind == "file":
        if "path" not in corpus:
            raise ValueError("A [corpus] with kind='file' needs path = 'corpus.txt' (one text per line).")
        path = _resolve(corpus["path"], base_dir)
        if not path.is_file():
            raise FileNotFoundError(f"Corpus file {path} does not exist.")
        texts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        spec = corpus.get("tokenizer", "word")
        if spec == "word":
            from tokenizers import pre_tokenizers

            split = pre_tokenizers.Whitespace()
            words = sorted({w for t in texts for w, _ in split.pre_tokenize_str(t)})
            tokenizer = role_corpus.word_level_tokenizer([*role_corpus.SPECIALS, *words])
        else:
            tokenizer = Tokenizer.from_file(_resolve(spec, base_dir))
        return texts, tokenizer, None
    raise ValueError(f"Unknown corpus kind {kind!r}; use 'role' (built-in) or 'file'.")


def _make_task(config: TrainConfig, tokenizer: Tokenizer, roles: Any) -> _Task:
    spec = dict(config.eval or {})
    task = spec.get("task", "role" if roles is not None else "none")
    if task == "none" or task is None:
        return _Task({}, None, (), None)
    if task != "role":
        raise ValueError(f"Unknown eval task {task!r}; use 'role' or 'none'.")
    from jaxcirc import role_corpus

    roles = roles or role_corpus.RoleCorpus()
    per_role, seed = int(spec.get("per_role", 32)), int(spec.get("seed", 1))
    prompts = {}
    for split in ("heldout", "train"):
        p = roles.prompts(per_role, split=split, seed=seed)
        prompts[split] = (np.asarray(tokenizer.encode_batch(list(p.texts)), dtype=np.int32), p.roles)
    val = None
    n_val = int(spec.get("val_sentences", 256))
    if n_val:
        # A seed no training corpus uses, so validation sentences are fresh draws.
        texts = roles.sentences(n_val, seed=10_000_019 + seed)
        windows, lengths = zip(*text_windows(tokenizer, texts, config.seq_len))
        val = _as_batch(np.stack(windows), np.asarray(lengths))
    return _Task(prompts, roles.lexicon_ids(tokenizer), roles.role_names, val)


# ----------------------------------------------------------------------------- the trainer

def _token_nll(forward: Callable, params: Params, tokens: Array, mask: Array) -> tuple[Array, Array]:
    """(sum of masked next-token NLL, number of masked targets) for tokens [batch, seq_len + 1]."""
    logits, _ = forward(params, tokens[:, :-1])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(nll * mask), jnp.sum(mask)


@dataclasses.dataclass(frozen=True)
class TrainResult:
    name: str
    out_dir: Path
    final_step: int
    wall_time_s: float
    metrics: list[dict[str, Any]]

    @property
    def final(self) -> dict[str, Any]:
        """The last checkpoint's metrics record."""
        return next(r for r in reversed(self.metrics) if r.get("checkpoint"))


class Trainer:
    """Compiles one training step for `config` and runs it into output folders (`run`).

    texts: a list of texts, or a zero-argument callable returning a fresh iterable of texts (a
    generator; it is called again and fast-forwarded on resume, so it must be deterministic).
    Default: the config's `[corpus]`. devices: the data-parallel devices (default all).
    """

    def __init__(self, config: TrainConfig, *, texts: Texts | None = None, tokenizer: Tokenizer | None = None,
                 devices: Sequence[jax.Device] | None = None, base_dir: str | Path | None = None):
        self.config = config
        roles = None
        if texts is None:
            texts, default_tokenizer, roles = corpus_from_config(config.corpus, Path(base_dir) if base_dir else None)
            tokenizer = tokenizer or default_tokenizer
        elif tokenizer is None:
            raise ValueError("Pass the tokenizer together with texts (e.g. role_corpus.word_level_tokenizer(words)).")
        self.tokenizer = tokenizer
        self.model_config = model_config(config.model, d_vocab=tokenizer.vocab_size, n_ctx=config.seq_len)
        self.data = _data_source(texts, tokenizer, config.seq_len, seed=config.seed)
        self.task = _make_task(config, tokenizer, roles)

        devices = list(devices if devices is not None else jax.devices())
        if config.batch_size % len(devices):
            raise ValueError(f"batch_size={config.batch_size} is not divisible by the {len(devices)} devices; "
                             f"use a multiple of {len(devices)} (the batch is split over a 'data' mesh axis).")
        self.mesh = make_mesh(devices=devices)  # all devices on `data`, model axis of 1
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.sharded = NamedSharding(self.mesh, PartitionSpec("data"))
        self.schedule = lr_schedule(config)
        self.optimizer = make_optimizer(config)
        self.forward = make_forward(self.model_config)
        self._step = self._compile_step()
        self._evaluate = self._compile_eval()
        self._eval_inputs = self._task_arrays()

    def _compile_step(self) -> Callable:
        forward = make_forward(self.model_config, jit=False)
        optimizer = self.optimizer

        def loss_fn(params, tokens, mask):
            total, count = _token_nll(forward, params, tokens, mask)
            return total / jnp.maximum(count, 1.0)

        def step(params, opt_state, tokens, mask):
            loss, grads = jax.value_and_grad(loss_fn)(params, tokens, mask)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

        rep, data = self.replicated, self.sharded
        return jax.jit(step, in_shardings=(rep, rep, data, data), out_shardings=(rep, rep, rep), donate_argnums=(0, 1))

    # ---- state

    def init_state(self) -> tuple[Params, Any]:
        """(params, optimizer state) at step 0, replicated over the mesh."""
        params = jax.device_put(training_init(self.model_config, self.config.seed), self.replicated)
        return params, jax.jit(self.optimizer.init, out_shardings=self.replicated)(params)

    def _abstract(self, tree: Any) -> Any:
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self.replicated), tree)

    def restore(self, step_dir: Path) -> tuple[Params, Any, dict[str, Any]]:
        """(params, optimizer state, state.json) of a checkpoint folder written by `run`."""
        import orbax.checkpoint as ocp

        meta = json.loads((step_dir / checkpoint.MARKER).read_text())
        if ModelConfig.from_dict(meta["config"]) != self.model_config:
            raise ValueError(f"{step_dir} holds a model with another config than this run's; use a new output folder.")
        abstract_params = self._abstract(param_shapes(self.model_config))
        abstract_opt = self._abstract(jax.eval_shape(self.optimizer.init, abstract_params))
        with ocp.StandardCheckpointer() as ckpt:
            params = ckpt.restore(step_dir / "params", abstract_params)
            opt_state = ckpt.restore(step_dir / TRAIN_STATE / "optimizer", abstract_opt)
        state = json.loads((step_dir / TRAIN_STATE / STATE_FILE).read_text())
        return params, opt_state, state

    # ---- evaluation

    def _compile_eval(self) -> Callable:
        from jaxcirc import role_corpus

        forward = make_forward(self.model_config, jit=False)

        def evaluate(params, arrays):
            # One forward over validation windows and prompts together (prompts right-padded to
            # seq_len; causal attention keeps the padding from touching them): one compilation.
            tokens, mask, n_val = arrays["tokens"], arrays["val_mask"], arrays["val_mask"].shape[0]
            logits, _ = forward(params, tokens)
            out = {}
            if n_val:
                logp = jax.nn.log_softmax(logits[:n_val].astype(jnp.float32), axis=-1)
                nll = -jnp.take_along_axis(logp, arrays["val_targets"][..., None], axis=-1)[..., 0]
                out["val_loss"] = jnp.sum(nll * mask) / jnp.sum(mask)
            if "roles" in arrays:
                rows = jnp.arange(n_val, tokens.shape[0])
                last = logits[rows, arrays["last"]]
                out["correct"] = role_corpus.role_correct(last, arrays["roles"], arrays["lexicon_ids"])
            return out

        return jax.jit(evaluate)

    def _task_arrays(self) -> dict[str, np.ndarray]:
        """The evaluation inputs as arrays: tokens [n_val + n_prompts, seq_len], ..."""
        seq_len, pad = self.config.seq_len, self.tokenizer.pad_token_id or 0
        val_tokens, val_mask = self.task.val if self.task.val is not None else (
            np.zeros((0, seq_len + 1), np.int32), np.zeros((0, seq_len), np.float32))
        rows, arrays = [val_tokens[:, :-1]], {"val_mask": val_mask, "val_targets": val_tokens[:, 1:]}
        roles, last = [], []
        for split in self.task.prompts:
            tokens, split_roles = self.task.prompts[split]
            if tokens.shape[1] > seq_len:
                raise ValueError(f"Role prompts are {tokens.shape[1]} tokens, longer than seq_len={seq_len}.")
            padded = np.full((len(tokens), seq_len), pad, np.int32)
            padded[:, :tokens.shape[1]] = tokens
            rows.append(padded)
            roles.append(split_roles)
            last.append(np.full(len(tokens), tokens.shape[1] - 1, np.int32))
        arrays["tokens"] = np.concatenate(rows).astype(np.int32)
        if roles:
            arrays.update(roles=np.concatenate(roles), last=np.concatenate(last), lexicon_ids=self.task.lexicon_ids)
        return arrays

    def evaluate(self, params: Params) -> dict[str, Any]:
        """Validation loss and role accuracies (held-out and seen words), per role too."""
        from jaxcirc import role_corpus

        if self.task.val is None and not self.task.prompts:
            return {}
        raw = jax.device_get(self._evaluate(params, self._eval_inputs))
        out: dict[str, Any] = {}
        if "val_loss" in raw:
            out["val_loss"] = float(raw["val_loss"])
        correct, start = np.asarray(raw.get("correct", [])), 0
        for split in self.task.prompts:
            roles = self.task.prompts[split][1]
            split_correct = correct[start:start + len(roles)]
            start += len(roles)
            out["role_acc" if split == "heldout" else "role_acc_seen"] = float(split_correct.mean())
            if split == "heldout":
                out["role_acc_by_role"] = dict(role_corpus.per_role_accuracy(split_correct, roles, self.task.role_names))
        return out

    # ---- checkpoints

    def _write_checkpoint(self, out_dir: Path, step: int, params: Params, opt_state: Any, elapsed: float) -> Path:
        import orbax.checkpoint as ocp

        from jaxcirc.loading import params_digest

        final = out_dir / f"step_{step}"
        if final.exists():
            raise FileExistsError(f"{final} already exists; a run never rewrites a checkpoint.")
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp_step_{step}_", dir=out_dir))
        # Host (numpy) copies carry no device layout, so the checkpoint loads on any device count.
        params, opt_state = jax.device_get((params, opt_state))
        model = Model(self.model_config, params, self.tokenizer, source=f"jaxcirc train {self.config.name} step {step}",
                      source_hash=params_digest(params), forward=self.forward)
        checkpoint.save(model, tmp, extra={"training": {"run": self.config.name, "step": step,
                                                        "train_config": self.config.to_dict()}})
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(tmp / TRAIN_STATE / "optimizer", opt_state)
        state = {"step": step, "seed": self.config.seed, "elapsed_s": elapsed,
                 "data": self.data.state(step, self.config.batch_size)}
        (tmp / TRAIN_STATE / STATE_FILE).write_text(json.dumps(state, indent=2))
        os.rename(tmp, final)  # atomic: step_N appears complete or not at all
        return final

    def _prune_train_state(self, out_dir: Path) -> None:
        with_state = [p for _, p in checkpoints(out_dir) if (p / TRAIN_STATE / STATE_FILE).is_file()]
        for path in with_state[:-self.config.keep_train_state]:
            doomed = path / f".{TRAIN_STATE}.deleting"
            os.rename(path / TRAIN_STATE, doomed)  # never leaves a half-deleted state that looks complete
            shutil.rmtree(doomed)

    # ---- the loop

    def run(self, out_dir: str | Path, *, stop_at: int | None = None, resume: bool = True,
            log: Callable[[str], None] | None = None) -> TrainResult:
        """Train into `out_dir` up to `config.steps` (or stop after step `stop_at`, e.g. to split a run).

        If `out_dir` already holds this run, continue from its last checkpoint (resume=False
        refuses instead); the metrics of steps after that checkpoint are discarded and redone.
        """
        config = self.config
        log = log if log is not None else (lambda line: print(line, file=sys.stderr, flush=True))
        out_dir = Path(out_dir).absolute()
        out_dir.mkdir(parents=True, exist_ok=True)
        # What a killed run may leave: an unfinished checkpoint, an unfinished optimizer-state deletion.
        for stale in [*out_dir.glob(".tmp_step_*"), *out_dir.glob(f"step_*/.{TRAIN_STATE}.deleting")]:
            shutil.rmtree(stale)
        config_file = out_dir / "train_config.json"
        if config_file.exists():
            if json.loads(config_file.read_text()) != config.to_dict():
                raise ValueError(f"{out_dir} holds a run with a different training config ({config_file}); "
                                 "choose a new output folder or delete it.")
        else:
            config_file.write_text(json.dumps(config.to_dict(), indent=2))

        metrics_file = out_dir / "metrics.jsonl"
        resumable = [(s, p) for s, p in checkpoints(out_dir) if (p / TRAIN_STATE / STATE_FILE).is_file()]
        if resumable and not resume:
            raise FileExistsError(f"{out_dir} already holds checkpoints up to step {resumable[-1][0]}; "
                                  "resume it, or choose a new output folder.")
        if resumable:
            step, path = resumable[-1]
            params, opt_state, state = self.restore(path)
            expected = self.data.state(step, config.batch_size)
            if state["data"] != expected:
                raise ValueError(f"{path}: saved data position {state['data']} does not match this corpus "
                                 f"({expected}); the corpus changed since the run started.")
            started = time.perf_counter() - float(state.get("elapsed_s", 0.0))
            records = [r for r in _read_metrics(metrics_file) if r["step"] <= step]
            _write_metrics(metrics_file, records)
            log(f"[{config.name}] resuming from step {step} ({path.name})")
        else:
            step, started = 0, time.perf_counter()
            params, opt_state = self.init_state()
            record = {"step": 0, "checkpoint": True, **self.evaluate(params)}
            record["time_s"] = time.perf_counter() - started
            _write_metrics(metrics_file, [record])
            self._write_checkpoint(out_dir, 0, params, opt_state, record["time_s"])
            log(_describe(config.name, record, config.steps))

        save_at = set(config.checkpoint_steps())
        stop = config.steps if stop_at is None else min(stop_at, config.steps)
        log_every = max(1, config.steps // 20)
        with open(metrics_file, "a") as metrics:
            while step < stop:
                tokens, mask = self.data.batch(step, config.batch_size)
                tokens = jax.device_put(tokens, self.sharded)
                mask = jax.device_put(mask, self.sharded)
                lr = float(self.schedule(step))
                params, opt_state, stats = self._step(params, opt_state, tokens, mask)
                step += 1
                record = {"step": step, "loss": float(stats["loss"]), "lr": lr,
                          "grad_norm": float(stats["grad_norm"]), "time_s": time.perf_counter() - started}
                if not math.isfinite(record["loss"]):
                    raise FloatingPointError(f"[{config.name}] loss is {record['loss']} at step {step}; "
                                             "lower lr or raise warmup_steps.")
                if step in save_at:
                    record.update(checkpoint=True, **self.evaluate(params))
                metrics.write(json.dumps(record) + "\n")
                if step in save_at:
                    metrics.flush()
                    os.fsync(metrics.fileno())
                    self._write_checkpoint(out_dir, step, params, opt_state, record["time_s"])
                    self._prune_train_state(out_dir)
                if step in save_at or step % log_every == 0:
                    log(_describe(config.name, record, config.steps))
        records = _read_metrics(metrics_file)
        wall = records[-1]["time_s"] if records else 0.0
        result = TrainResult(config.name, out_dir, step, wall, records)
        if step == config.steps:
            write_run_report(result, config, self.model_config)
        return result


def _describe(name: str, record: Mapping[str, Any], total: int) -> str:
    parts = [f"[{name}] step {record['step']}/{total}"]
    for key, fmt in (("loss", ".4f"), ("lr", ".2e"), ("val_loss", ".4f"), ("role_acc", ".3f"), ("time_s", ".1f")):
        if record.get(key) is not None:
            parts.append(f"{key} {record[key]:{fmt}}")
    return "  ".join(parts)


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut short by a kill; everything after it is redone on resume
    return records


def _write_metrics(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(path)


# ----------------------------------------------------------------------------- reports

def _plot_runs(runs: Sequence[tuple[str, list[dict[str, Any]]]], figures: Path, chance: float | None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures.mkdir(parents=True, exist_ok=True)
    written = []
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, records in runs:
        steps = [r["step"] for r in records if r.get("loss") is not None]
        losses = np.asarray([r["loss"] for r in records if r.get("loss") is not None])
        if len(losses):
            window = max(1, len(losses) // 50)
            smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
            # Centre the moving average on its window so the curve does not lag the steps.
            line, = ax.plot(steps[(window - 1) // 2:][:len(smooth)], smooth, label=f"{name} train")
            val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
            if val:
                ax.plot(*zip(*val), "o--", color=line.get_color(), markersize=3, label=f"{name} val")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="Training loss", yscale="log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(figures / "loss.png", dpi=120)
    plt.close(fig)
    written.append("figures/loss.png")
    acc = [(name, [(r["step"], r["role_acc"]) for r in records if r.get("role_acc") is not None]) for name, records in runs]
    if any(points for _, points in acc):
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for name, points in acc:
            if points:
                ax.plot([max(s, 0.5) for s, _ in points], [a for _, a in points], "o-", markersize=3, label=name)
        if chance is not None:
            ax.axhline(chance, color="gray", linestyle=":", label="chance")
        ax.set(xlabel="step (checkpoints; step 0 drawn at 0.5)", ylabel="role accuracy (held-out prompts)",
               title="Semantic-role task accuracy", xscale="log", ylim=(-0.02, 1.02))
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(figures / "accuracy.png", dpi=120)
        plt.close(fig)
        written.append("figures/accuracy.png")
    return written


def _summary_row(result: TrainResult, model_cfg: ModelConfig) -> dict[str, Any]:
    final = result.final
    losses = [r["loss"] for r in result.metrics if r.get("loss") is not None]
    tail = losses[-max(1, len(losses) // 20):]
    return {"name": result.name, "layers": model_cfg.n_layers, "d_model": model_cfg.d_model,
            "heads": model_cfg.n_heads, "family": model_cfg.family, "steps": result.final_step,
            "wall_time_s": result.wall_time_s, "final_train_loss": float(np.mean(tail)) if tail else None,
            "final_val_loss": final.get("val_loss"), "role_acc": final.get("role_acc"),
            "role_acc_seen": final.get("role_acc_seen"), "role_acc_by_role": final.get("role_acc_by_role")}


def _fmt(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def write_run_report(result: TrainResult, config: TrainConfig, model_cfg: ModelConfig) -> Path:
    """results.json, report.md and figures/ for one finished run."""
    from jaxcirc.rundir import versions

    out = result.out_dir
    row = _summary_row(result, model_cfg)
    n_roles = len(row["role_acc_by_role"] or {})
    figures = _plot_runs([(result.name, result.metrics)], out / "figures", 1 / n_roles if n_roles else None)
    (out / "results.json").write_text(json.dumps({
        "command": "train", "config": config.to_dict(), "model_config": model_cfg.to_dict(),
        "versions": versions(), "scalars": row,
        "checkpoints": [r["step"] for r in result.metrics if r.get("checkpoint")]}, indent=2))
    lines = [f"# Training run `{result.name}`", "",
             f"{model_cfg.family}, {model_cfg.n_layers} layers x d_model {model_cfg.d_model}, {model_cfg.n_heads} heads, "
             f"vocab {model_cfg.d_vocab}, context {model_cfg.n_ctx}; {config.steps} steps of batch {config.batch_size}, "
             f"AdamW lr {config.lr:g} (warmup {config.warmup_steps}, cosine to {config.lr * config.min_lr_ratio:g}), "
             f"seed {config.seed}; corpus {dict(config.corpus)}.", "",
             f"- wall time: {row['wall_time_s']:.1f} s",
             f"- final train loss (mean of the last 5% of steps): {_fmt(row['final_train_loss'], '.4f')}",
             f"- final validation loss: {_fmt(row['final_val_loss'], '.4f')}",
             f"- role accuracy at the final checkpoint, held-out words: {_fmt(row['role_acc'], '.3f')}"
             + (f" (chance {1 / n_roles:.3f})" if n_roles else ""),
             f"- role accuracy, seen words: {_fmt(row['role_acc_seen'], '.3f')}", ""]
    if row["role_acc_by_role"]:
        lines += ["| role | accuracy |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in row["role_acc_by_role"].items()] + [""]
    lines += ["## Checkpoints", "", "| step | train loss | val loss | role acc (held-out) | role acc (seen) |",
              "|---|---|---|---|---|"]
    for r in result.metrics:
        if r.get("checkpoint"):
            lines.append(f"| {r['step']} | {_fmt(r.get('loss'), '.4f')} | {_fmt(r.get('val_loss'), '.4f')} | "
                         f"{_fmt(r.get('role_acc'), '.3f')} | {_fmt(r.get('role_acc_seen'), '.3f')} |")
    lines += [""] + [f"![{Path(f).stem}]({f})" for f in figures] + [
        "", "Each `step_N/` folder loads with `jaxcirc.load`; `jaxcirc.checkpoints(DIR)` lists them."]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return out / "report.md"


def write_suite_report(out_dir: Path, name: str, run_names: Sequence[str], description: str = "") -> Path:
    """report.md, results.json and figures/ comparing the finished runs `out_dir/<name>/` of a suite."""
    rows, runs = [], []
    for run_name in run_names:
        results_file = out_dir / run_name / "results.json"
        if not results_file.is_file():
            continue  # not trained (yet)
        rows.append(json.loads(results_file.read_text())["scalars"])
        runs.append((run_name, _read_metrics(out_dir / run_name / "metrics.jsonl")))
    n_roles = max((len(r["role_acc_by_role"] or {}) for r in rows), default=0)
    figures = _plot_runs(runs, out_dir / "figures", 1 / n_roles if n_roles else None)
    (out_dir / "results.json").write_text(json.dumps({"command": "train", "suite": name, "runs": rows}, indent=2))
    lines = [f"# Training suite `{name}`", "", description, "",
             "| model | family | layers x width | steps | wall time (s) | final train loss | val loss | "
             "role acc (held-out) | role acc (seen) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| [{r['name']}]({r['name']}/report.md) | {r['family']} | {r['layers']}x{r['d_model']} | "
                     f"{r['steps']} | {r['wall_time_s']:.1f} | {_fmt(r['final_train_loss'], '.4f')} | "
                     f"{_fmt(r['final_val_loss'], '.4f')} | {_fmt(r['role_acc'], '.3f')} | {_fmt(r['role_acc_seen'], '.3f')} |")
    missing = [n for n in run_names if n not in {r["name"] for r in rows}]
    if missing:
        lines += ["", f"Not trained yet: {', '.join(missing)}."]
    if n_roles:
        lines += ["", f"Chance role accuracy: {1 / n_roles:.3f} ({n_roles} roles). Wall time is the training loop "
                  "(compilation, evaluation and checkpoint writing included) on this machine."]
    lines += [""] + [f"![{Path(f).stem}]({f})" for f in figures]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    return out_dir / "report.md"


# ----------------------------------------------------------------------------- config files and the command

def _read_toml(path: Path) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{path} is not valid TOML: {error}") from None


def resolve_config_path(config: str | Path) -> Path:
    """A config file path, or the name of a built-in config (`role_suite`)."""
    path = Path(config).expanduser()
    if path.is_file():
        return path
    if str(config) in BUILTIN_CONFIGS:
        return BUILTIN_CONFIGS[str(config)]
    raise FileNotFoundError(f"No config file {config!r}; give a .toml path or a built-in config name "
                            f"({', '.join(BUILTIN_CONFIGS)}).")


def load_config(config: str | Path) -> tuple[dict[str, Any], list[TrainConfig]]:
    """(suite table, one TrainConfig per model) from a TOML file or built-in name.

    Tables: `[suite]` (name, description; optional), `[train]` (TrainConfig settings: steps,
    batch_size, seq_len, lr, min_lr_ratio, warmup_steps, weight_decay, b1, b2, eps, grad_clip,
    seed, checkpoint_every, keep_train_state), `[model]` (model spec shared by all models, see
    `model_config`), `[corpus]` (kind = "role" | "file", ...), `[eval]` (task = "role" | "none",
    per_role, seed, val_sentences), and `[[models]]`: one entry per model (name + model spec
    keys overriding `[model]`, and an optional `train` table overriding `[train]`). Without
    `[[models]]` the file describes one model.
    """
    path = resolve_config_path(config)
    data = _read_toml(path)
    known = {"suite", "train", "model", "corpus", "eval", "models"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown tables {unknown}; known: {sorted(known)}.")
    suite = dict(data.get("suite", {}))
    suite.setdefault("name", path.stem)
    base_model, base_train = dict(data.get("model", {})), dict(data.get("train", {}))
    entries = data.get("models") or [{"name": suite["name"]}]
    runs, names = [], set()
    for entry in entries:
        entry = dict(entry)
        name = str(entry.pop("name", f"model{len(runs)}"))
        if name in names or not name or "/" in name:
            raise ValueError(f"{path}: model names must be unique folder names, got {name!r}.")
        names.add(name)
        train = {**base_train, **entry.pop("train", {})}
        runs.append(TrainConfig.from_dict({**train, "name": name, "model": {**base_model, **entry},
                                           "corpus": dict(data.get("corpus", {"kind": "role"})),
                                           "eval": dict(data.get("eval", {}))}))
    return suite, runs


def train_command(config: str | Path, out_dir: str | Path, *, models: Sequence[str] | None = None,
                  steps: int | None = None, stop_at: int | None = None, resume: bool = True,
                  quiet: bool = False) -> list[TrainResult]:
    """`jaxcirc train CONFIG --out DIR`: train every model of CONFIG (a TOML file or a built-in
    name such as `role_suite`). A suite writes one folder per model (`DIR/<name>/step_N/...`)
    plus a suite `report.md` and `figures/` in DIR; a single-model config writes into DIR.
    `models` picks some models of a suite; `steps` overrides the step count (a different run);
    `stop_at` stops after that step (run again to resume). Re-running resumes finished or
    interrupted runs from their last checkpoint."""
    path = resolve_config_path(config)
    suite, runs = load_config(path)
    if models:
        missing = sorted(set(models) - {r.name for r in runs})
        if missing:
            raise ValueError(f"No model(s) {missing} in {path}; it has {[r.name for r in runs]}.")
        runs = [r for r in runs if r.name in set(models)]
    if steps is not None:
        runs = [dataclasses.replace(r, steps=steps) for r in runs]
    out_dir = Path(out_dir).expanduser().absolute()
    is_suite = "models" in _read_toml(path)
    log = (lambda line: None) if quiet else None
    results = []
    for run in runs:
        trainer = Trainer(run, base_dir=path.parent)
        results.append(trainer.run(out_dir / run.name if is_suite else out_dir, stop_at=stop_at, resume=resume, log=log))
    if is_suite:
        write_suite_report(out_dir, suite["name"], [r.name for r in load_config(path)[1]], suite.get("description", ""))
    return results
