"""Word2Vec-style vector arithmetic in FFN outputs (Merullo, Eickhoff & Pavlick; experiments.md B).

Per task (`jaxcirc.arithmetic_tasks`), with the logit lens (`jaxcirc.logit_lens`):

1. **Stages** per example (`detect_stages`), from the rank of the argument (" Poland") and of the
   answer (" Warsaw") at every layer's pre-FFN residual and block output:
   * argument formation: first layer where the argument is top-1 (at either site: in uppercasing the
     argument can be top-1 only before an FFN, B.5);
   * function application: first layer whose FFN makes the answer top-1 (top-1 after the FFN, not
     top-1 at the FFN's input); `flip_from_argument` says the FFN's input had the argument on top;
   * saturation: first layer from which the answer stays top-1 up to the output.
2. **o-vectors**: the FFN output at the task's function-application layer l* (the most common layer
   of FFN flips), at the last token of a correctly answered prompt.
3. **Interventions** (hook builders below, all plain `Hooks` data):
   * `transplant_hooks`: replace every FFN output from a start layer on with o (broadcast over
     positions as in the authors' code, or at the last token only);
   * `residual_add_hooks`: add scale * o to chosen layers' block outputs at the last token;
   * `ablation_hooks`: zero- or mean-ablate every FFN from a start layer on.
   The same interventions in compact per-example form (`Interventions`: `transplant`, `ablate`,
   `residual_add`) run through one jitted program (`run_interventions`), so baseline and every
   condition share a batch and a compilation.
4. `analyse_task` runs all of it for one task and its extractive twin (late-FFN ablation: abstractive
   vs extractive); `jaxcirc.arithmetic_report` writes the run directory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxcirc import arithmetic_tasks as T
from jaxcirc.hooks import Hooks, add, replace
from jaxcirc.logit_lens import (LensResult, check_token_ids, chunk_indices, collect_chunks, lens_batch_axis,
                                lens_stats, pad_prompts, result_from_arrays)
from jaxcirc.models.config import ModelConfig

Positions = Literal["all", "last"]


# --------------------------------------------------------------------------- stages

@dataclasses.dataclass(frozen=True)
class Stages:
    """Stage layers per example ([batch] int, -1 where the stage never happens)."""

    argument_formation: np.ndarray
    function_application: np.ndarray
    flip_from_argument: np.ndarray  # [batch] bool
    saturation: np.ndarray

    def as_dict(self) -> dict[str, np.ndarray]:
        return dataclasses.asdict(self)


def _first_true(mask: np.ndarray) -> np.ndarray:
    """[batch, layer] bool -> [batch] index of the first True, -1 if none."""
    return np.where(mask.any(-1), mask.argmax(-1), -1)


def detect_stages(arg_rank_pre: Any, arg_rank_post: Any, ans_rank_pre: Any, ans_rank_post: Any) -> Stages:
    """Stage layers from rank trajectories [batch, layer] (rank 0 = top-1).

    *_pre are ranks at each layer's pre-FFN residual, *_post at its output. See the module doc.
    """
    arrays = [np.asarray(a) for a in (arg_rank_pre, arg_rank_post, ans_rank_pre, ans_rank_post)]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1 or arrays[0].ndim != 2:
        raise ValueError(f"Rank trajectories must all be [batch, layer]; got shapes {[a.shape for a in arrays]}.")
    arg_pre, arg_post, ans_pre, ans_post = (a == 0 for a in arrays)
    arg_formation = _first_true(arg_pre | arg_post)
    fn = _first_true(ans_post & ~ans_pre)
    rows = np.arange(fn.shape[0])
    flip = (fn >= 0) & arg_pre[rows, np.maximum(fn, 0)]
    # Saturation: the start of the final run of layers whose output has the answer on top.
    tail_ok = np.flip(np.cumprod(np.flip(ans_post, -1), axis=-1), -1).astype(bool)
    saturation = np.where(ans_post[:, -1], tail_ok.argmax(-1), -1)
    return Stages(arg_formation, fn, flip, saturation)


def stage_histogram(layers: np.ndarray, n_layers: int) -> np.ndarray:
    """[n_layers] counts of stage layers (entries -1 are left out)."""
    layers = np.asarray(layers)
    return np.bincount(layers[layers >= 0], minlength=n_layers)[:n_layers]


def mode_layer(layers: np.ndarray) -> int | None:
    """Most common non-negative layer (the smallest on ties); None if there is none."""
    layers = np.asarray(layers)
    layers = layers[layers >= 0]
    if layers.size == 0:
        return None
    return int(np.bincount(layers).argmax())


# --------------------------------------------------------------------------- o-vectors

def pick_sources(correct: np.ndarray, stages: Stages, layer: int) -> np.ndarray:
    """Indices of examples whose FFN at `layer` performs the flip (correct answer, FFN flip at that
    layer from the argument); falls back to every correct example with an FFN flip, then to every
    correct example."""
    correct = np.asarray(correct, bool)
    for mask in (correct & stages.flip_from_argument & (stages.function_application == layer),
                 correct & (stages.function_application >= 0), correct):
        if mask.any():
            return np.flatnonzero(mask)
    return np.zeros(0, np.int64)


def leave_one_out_means(o: np.ndarray, sources: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """For each target, the mean o-vector of the sources other than itself: [n_targets, d].

    o: [batch, d] FFN outputs of every example; sources/targets: example indices.
    """
    sources = np.asarray(sources)
    if sources.size == 0:
        raise ValueError("No source examples to average o-vectors over.")
    total = o[sources].sum(0)
    out = np.empty((len(targets), o.shape[-1]), o.dtype)
    for i, t in enumerate(targets):
        if t in sources and sources.size > 1:
            out[i] = (total - o[t]) / (sources.size - 1)
        else:
            out[i] = total / sources.size
    return out


def other_source(sources: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """For each target, one source example that is not the target itself (cycling through the
    sources), the paper's "o-vector from one other prompt" setting. [n_targets] indices."""
    sources = np.asarray(sources)
    if sources.size == 0:
        raise ValueError("No source examples to take o-vectors from.")
    picked = []
    for i, t in enumerate(targets):
        s = sources[i % sources.size]
        if s == t and sources.size > 1:
            s = sources[(i + 1) % sources.size]
        picked.append(int(s))
    return np.array(picked, np.int64)


# --------------------------------------------------------------------------- hooks

def _check_layer(cfg: ModelConfig, layer: int, what: str) -> None:
    if not 0 <= layer < cfg.n_layers:
        raise ValueError(f"{what} {layer} is outside the model's layers 0..{cfg.n_layers - 1}.")


def last_token_mask(read_pos: Any, pos: int) -> np.ndarray:
    """[batch, pos, 1] bool, True at each example's read position."""
    read_pos = np.asarray(read_pos)
    return (np.arange(pos)[None, :] == read_pos[:, None])[..., None]


def transplant_hooks(cfg: ModelConfig, o: Any, start_layer: int, *, positions: Positions = "all",
                     read_pos: Any = None, pos: int | None = None) -> Hooks:
    """Replace the FFN output of every layer >= start_layer with o.

    o: [d_model] or [batch, d_model]. positions="all" broadcasts o to every token (the authors'
    `mlp = lambda x: o`); "last" only replaces it at `read_pos` ([batch]) of a [batch, pos] input.
    """
    _check_layer(cfg, start_layer, "start_layer")
    o = jnp.asarray(o)
    o = o[None] if o.ndim == 1 else o
    if o.ndim != 2 or o.shape[-1] != cfg.d_model:
        raise ValueError(f"o must be [d_model] or [batch, d_model] with d_model={cfg.d_model}; got {o.shape}.")
    value = o[:, None, :]
    if positions == "all":
        mask = None
    elif positions == "last":
        if read_pos is None or pos is None:
            raise ValueError("positions='last' needs read_pos and pos.")
        mask = jnp.asarray(last_token_mask(read_pos, pos))
    else:
        raise ValueError(f"positions must be 'all' or 'last', got {positions!r}.")
    return Hooks({f"blocks.{l}.hook_mlp_out": replace(value, mask) for l in range(start_layer, cfg.n_layers)})


def ablation_hooks(cfg: ModelConfig, start_layer: int, mean: Any = None, end_layer: int | None = None) -> Hooks:
    """Ablate FFN outputs at layers start_layer..end_layer-1 (default: to the last layer), at every
    position: to zero, or (mean: [n_layers, d_model]) to each layer's mean output."""
    end_layer = cfg.n_layers if end_layer is None else end_layer
    _check_layer(cfg, start_layer, "start_layer")
    if not start_layer < end_layer <= cfg.n_layers:
        raise ValueError(f"end_layer must be in {start_layer + 1}..{cfg.n_layers}, got {end_layer}.")
    if mean is not None:
        mean = jnp.asarray(mean)
        if mean.shape != (cfg.n_layers, cfg.d_model):
            raise ValueError(f"mean must be [n_layers, d_model] = {(cfg.n_layers, cfg.d_model)}; got {mean.shape}.")
    hooks = {}
    for l in range(start_layer, end_layer):
        value = jnp.zeros((1, 1, cfg.d_model)) if mean is None else mean[l][None, None, :]
        hooks[f"blocks.{l}.hook_mlp_out"] = replace(value)
    return Hooks(hooks)


def residual_add_hooks(cfg: ModelConfig, delta: Any, layers: Sequence[int], scales: float | Sequence[float],
                       read_pos: Any, pos: int) -> Hooks:
    """Add scale_l * delta to the block output (`hook_resid_post`) of each of `layers` at the last
    token. delta: [d_model] or [batch, d_model]; scales: one per layer or one for all (negative
    subtracts); read_pos [batch] of a [batch, pos] input."""
    layers = list(layers)
    scales = [float(scales)] * len(layers) if np.ndim(scales) == 0 else [float(s) for s in scales]
    if len(scales) != len(layers):
        raise ValueError(f"Give one scale per layer ({len(layers)} layers) or a single scale; got {len(scales)}.")
    delta = np.asarray(delta, np.float32)
    delta = delta[None] if delta.ndim == 1 else delta
    if delta.shape[-1] != cfg.d_model:
        raise ValueError(f"delta must end in d_model={cfg.d_model}; got {delta.shape}.")
    placed = last_token_mask(read_pos, pos).astype(np.float32) * delta[:, None, :]  # [batch, pos, d]
    hooks = {}
    for layer, scale in zip(layers, scales):
        _check_layer(cfg, layer, "layer")
        hooks[f"blocks.{layer}.hook_resid_post"] = add(jnp.asarray(scale * placed))
    return Hooks(hooks)


# --------------------------------------------------------------------------- one program for all conditions

@dataclasses.dataclass(frozen=True)
class Interventions:
    """Per-example interventions, the compact form `arithmetic_program` turns into `Hooks`:

    mlp_value [layer, batch, d_model], mlp_mask [layer, batch, pos] float: the FFN output becomes
        out + mask * (value - out) (1 = replaced by value, 0 = untouched);
    add_vec [batch, d_model], add_scale [layer, batch]: each layer's block output at the read
        position gets add_scale * add_vec.
    Every experiment (baseline, transplant, ablation, residual add) is one of these, so examples
    of different conditions share a batch and every batch of one shape shares one compilation.
    """

    mlp_value: np.ndarray
    mlp_mask: np.ndarray
    add_vec: np.ndarray
    add_scale: np.ndarray

    @property
    def batch(self) -> int:
        return self.add_vec.shape[0]

    def take(self, idx: np.ndarray) -> "Interventions":
        return Interventions(self.mlp_value[:, idx], self.mlp_mask[:, idx], self.add_vec[idx], self.add_scale[:, idx])

    @staticmethod
    def concat(parts: Sequence["Interventions"]) -> "Interventions":
        return Interventions(np.concatenate([p.mlp_value for p in parts], 1), np.concatenate([p.mlp_mask for p in parts], 1),
                             np.concatenate([p.add_vec for p in parts], 0), np.concatenate([p.add_scale for p in parts], 1))


def no_intervention(cfg: ModelConfig, n: int, pos: int) -> Interventions:
    L, d = cfg.n_layers, cfg.d_model
    return Interventions(np.zeros((L, n, d), np.float32), np.zeros((L, n, pos), np.float32),
                         np.zeros((n, d), np.float32), np.zeros((L, n), np.float32))


def transplant(cfg: ModelConfig, o: np.ndarray, start_layer: int, read_pos: np.ndarray, pos: int,
               positions: Positions = "all") -> Interventions:
    """`transplant_hooks` in compact form: o [n, d_model] replaces FFN outputs from start_layer on."""
    _check_layer(cfg, start_layer, "start_layer")
    n = len(read_pos)
    iv = no_intervention(cfg, n, pos)
    where = np.ones((n, pos), np.float32) if positions == "all" else last_token_mask(read_pos, pos)[..., 0].astype(np.float32)
    iv.mlp_value[start_layer:] = np.asarray(o, np.float32)[None]
    iv.mlp_mask[start_layer:] = where[None]
    return iv


def ablate(cfg: ModelConfig, n: int, pos: int, start_layer: int, mean: np.ndarray | None = None,
           end_layer: int | None = None) -> Interventions:
    """`ablation_hooks` in compact form (zero, or mean [n_layers, d_model]), every position."""
    end_layer = cfg.n_layers if end_layer is None else end_layer
    _check_layer(cfg, start_layer, "start_layer")
    iv = no_intervention(cfg, n, pos)
    if mean is not None:
        iv.mlp_value[start_layer:end_layer] = np.asarray(mean, np.float32)[start_layer:end_layer, None, :]
    iv.mlp_mask[start_layer:end_layer] = 1.0
    return iv


def residual_add(cfg: ModelConfig, o: np.ndarray, layers: Sequence[int], scale: float, pos: int) -> Interventions:
    """`residual_add_hooks` in compact form: + scale * o [n, d_model] at the read position of `layers`."""
    o = np.asarray(o, np.float32)
    iv = no_intervention(cfg, o.shape[0], pos)
    for layer in layers:
        _check_layer(cfg, layer, "layer")
        iv.add_scale[layer] = scale
    return dataclasses.replace(iv, add_vec=o)


def _program(params: dict, tokens, read_pos, token_ids, mlp_value, mlp_mask, add_vec, add_scale, *,
             cfg: ModelConfig, top_k: int, sites: tuple[str, ...]) -> dict:
    """Forward with `Interventions`, the output and (for `sites`) the lens at the read position."""
    placed = (jnp.arange(tokens.shape[1])[None, :] == read_pos[:, None]).astype(add_vec.dtype)[:, :, None] * add_vec[:, None, :]
    interventions = {}
    for l in range(cfg.n_layers):
        interventions[f"blocks.{l}.hook_mlp_out"] = replace(mlp_value[l][:, None, :], mlp_mask[l][:, :, None])
        interventions[f"blocks.{l}.hook_resid_post"] = add(add_scale[l][:, None, None] * placed)
    return lens_stats(params, tokens, read_pos, token_ids, Hooks(interventions), cfg=cfg, sites=sites,
                      top_k=top_k, gather=("hook_mlp_out",))


LENS_SITES = ("pre_ffn", "resid_post")
arithmetic_program = jax.jit(_program, static_argnames=("cfg", "top_k", "sites"))


def run_interventions(model: Any, tokens: np.ndarray, read_pos: np.ndarray, token_ids: Any,
                      iv: Interventions | None = None, *, lens: bool = False, chunk_tokens: int = 2048,
                      top_k: int = 5, params: dict | None = None) -> LensResult:
    """Run padded prompts (tokens [batch, pos], read_pos [batch]) under per-example interventions.

    Returns the output stats, FFN outputs at the read position (`at/hook_mlp_out`) and summed over
    the prompt (`sum/hook_mlp_out`) and, with `lens`, the lens of the pre-FFN residual and the
    block output at every layer. Fixed-size chunks: one compilation per (pos, lens)."""
    cfg = model.config
    params = model.params if params is None else params
    n, pos = tokens.shape
    ids = check_token_ids(token_ids, n, cfg.d_vocab)
    iv = no_intervention(cfg, n, pos) if iv is None else iv
    if pos > cfg.n_ctx:
        raise ValueError(f"Prompts are padded to {pos} tokens; the model's context is {cfg.n_ctx}. Use fewer shots.")
    if iv.batch != n or iv.mlp_mask.shape[-1] != pos:
        raise ValueError(f"Interventions are for batch {iv.batch} x pos {iv.mlp_mask.shape[-1]}; tokens are {n} x {pos}.")
    sites = LENS_SITES if lens else ()
    pieces = []
    for idx in chunk_indices(n, pos, chunk_tokens, fixed=True):
        part = iv.take(idx)
        pieces.append(arithmetic_program(params, jnp.asarray(tokens[idx]), jnp.asarray(read_pos[idx]),
                                         jnp.asarray(ids[idx]), jnp.asarray(part.mlp_value), jnp.asarray(part.mlp_mask),
                                         jnp.asarray(part.add_vec), jnp.asarray(part.add_scale), cfg=cfg, top_k=top_k,
                                         sites=sites))
    return result_from_arrays(collect_chunks(pieces, n, lens_batch_axis), sites, ids, read_pos)


def ffn_effect(lens: LensResult, ans_col: int = 1) -> np.ndarray:
    """[batch, layer] how much each layer's FFN raises the answer's reciprocal rank at the read
    position (after the FFN minus before it). Bounded in [-1, 1], so the uncalibrated lens of
    early layers (huge logits, random ranks) cannot dominate an average."""
    pre, post = lens.site("pre_ffn"), lens.site("resid_post")
    return lens.rr[post, :, :, ans_col] - lens.rr[pre, :, :, ans_col]


# --------------------------------------------------------------------------- the experiment, per task

@dataclasses.dataclass(frozen=True)
class ArithmeticSettings:
    """Knobs of `analyse_task` (defaults follow experiments.md B; [I] marks our own choices).

    start_offset: interventions start at l* + start_offset (the authors' demo: o19 from layer 18).
    positions:    transplant o at every position (authors' code) or at the last token only; the
                  other choice is run too, on the mean o (`transplant_mean_last` / `_all`).
    add_scales:   scales of o (layer l*) added at layer l* + start_offset in copy contexts [I].
    sweep_layers, sweep_scale: also add sweep_scale * o(lambda) at lambda + start_offset for the
                  `sweep_layers` layers lambda below l* [I]. The best add on the copy contexts
                  (answer top-1 rate, then reciprocal rank) is the one tried zero-shot.
    subtract_scales: scales of -o (the example's own FFN output) added after layer l* [I].
    ablate_from:  first ablated FFN; default the late block from min(l*, L - L/10) [I].
    max_ablation_items: clean-correct items per task kind re-run under ablation.
    """

    n_examples: int = 24
    n_shots: int | None = None
    start_offset: int = -1
    positions: Positions = "all"
    add_scales: tuple[float, ...] = (1.0, 2.0)
    sweep_layers: int = 3
    sweep_scale: float = 2.0
    subtract_scales: tuple[float, ...] = (1.0,)
    ablate_from: int | None = None
    max_ablation_items: int = 10
    chunk_tokens: int = 2048
    top_k: int = 5
    pad_multiple: int = 8


@dataclasses.dataclass
class TaskAnalysis:
    """Everything measured on one task: scalars (JSON), arrays (name -> (array, dims)), labels of
    array coordinates, and a few readable examples."""

    task: str
    scalars: dict[str, Any]
    arrays: dict[str, tuple[np.ndarray, tuple[str, ...]]]
    labels: dict[str, list[str]]
    examples: list[dict[str, Any]]


def _tile(tokens: np.ndarray, read_pos: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([tokens] * k), np.concatenate([read_pos] * k)


def _split(values: np.ndarray, k: int, axis: int = 0) -> np.ndarray:
    """[k * m, ...] along `axis` -> [k, m, ...] with the condition axis first."""
    values = np.moveaxis(np.asarray(values), axis, 0)
    return values.reshape((k, -1) + values.shape[1:])


def default_ablation_start(n_layers: int, fn_layer: int | None) -> int:
    """The late FFN block: from the function-application layer, and at least the last tenth."""
    late = n_layers - max(1, round(n_layers / 10))
    return late if fn_layer is None else min(fn_layer, late)


def analyse_task(model: Any, task: str, settings: ArithmeticSettings = ArithmeticSettings(), seed: int = 0,
                 log: Callable[[str], None] = print) -> TaskAnalysis:
    """Few-shot accuracy (task and extractive twin), stages, o-vector interventions and late-FFN
    ablation for one abstractive task ("capitals", "uppercase", "past-tense")."""
    if task not in T.ABSTRACTIVE:
        raise ValueError(f"analyse_task takes an abstractive task ({', '.join(T.ABSTRACTIVE)}); its extractive "
                         f"twin is analysed alongside. Got {task!r}.")
    if model.tokenizer is None:
        raise ValueError("The arithmetic tasks need a model with a tokenizer.")
    cfg, tok, L, s = model.config, model.tokenizer, model.config.n_layers, settings
    run = dict(chunk_tokens=s.chunk_tokens, top_k=s.top_k)

    def encode(prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        return pad_prompts([tok.encode(p) for p in prompts], 0, s.pad_multiple)

    scalars: dict[str, Any] = {}
    arrays: dict[str, tuple[np.ndarray, tuple[str, ...]]] = {}
    labels: dict[str, list[str]] = {}

    # 1. Few-shot prompts of the task and its extractive twin (same queries and shots).
    abs_set = T.few_shot_prompts(task, s.n_examples, s.n_shots, seed)
    ext_set = T.few_shot_prompts(f"{task}-extractive", s.n_examples, s.n_shots, seed)
    arg = T.first_tokens(tok, [it.argument for it in abs_set.items])
    ans = T.first_tokens(tok, abs_set.answers())
    ans_ext = T.first_tokens(tok, ext_set.answers())
    valid = arg != ans  # the argument -> answer flip is only visible when first tokens differ
    a_tok, a_rp = encode(abs_set.prompts)
    e_tok, e_rp = encode(ext_set.prompts)
    log(f"[{task}] few-shot lens: {len(a_tok)} prompts x {a_tok.shape[1]} tokens (+ extractive twin x {e_tok.shape[1]})")
    lens_abs = run_interventions(model, a_tok, a_rp, np.stack([arg, ans], 1), lens=True, **run)
    lens_ext = run_interventions(model, e_tok, e_rp, np.stack([arg, ans_ext], 1), **run)
    correct = lens_abs.out_top1 == ans
    correct_ext = lens_ext.out_top1 == ans_ext
    good = correct & valid
    scalars.update(n_examples=len(arg), n_shots=len(abs_set.shots[0]), few_shot_accuracy=float(correct.mean()),
                   extractive_accuracy=float(correct_ext.mean()), n_argument_differs=int(valid.sum()),
                   n_correct_argument_differs=int(good.sum()))
    if task == "past-tense":
        for subset in ("regular", "irregular"):
            in_subset = np.array([it.subset == subset for it in abs_set.items])
            scalars[f"few_shot_accuracy_{subset}"] = float(correct[in_subset].mean()) if in_subset.any() else None

    # 2. Stages.
    pre, post = lens_abs.site("pre_ffn"), lens_abs.site("resid_post")
    stages = detect_stages(lens_abs.rank[pre, :, :, 0], lens_abs.rank[post, :, :, 0],
                           lens_abs.rank[pre, :, :, 1], lens_abs.rank[post, :, :, 1])
    fn = stages.function_application
    l_star = mode_layer(fn[good & stages.flip_from_argument])
    l_star = mode_layer(fn[good]) if l_star is None else l_star
    stage_names = ["argument_formation", "function_application", "saturation"]
    hist = np.stack([stage_histogram(getattr(stages, k)[good], L) for k in stage_names])
    for k in stage_names:
        v = getattr(stages, k)[good]
        v = v[v >= 0]
        scalars[f"{k}_layers"] = v.tolist()
        scalars[f"{k}_rate"] = float(len(v) / max(1, good.sum()))
        scalars[f"{k}_median"] = float(np.median(v)) if v.size else None
    scalars["flip_from_argument_rate"] = float(stages.flip_from_argument[good].mean()) if good.any() else None
    scalars["function_application_layer"] = l_star
    effect = ffn_effect(lens_abs)
    scalars["ffn_effect_peak_layer"] = int(effect[good].mean(0).argmax()) if good.any() else None
    arrays["lens_rr"] = (lens_abs.rr, ("site", "example", "layer", "token"))
    arrays["lens_prob"] = (lens_abs.prob, ("site", "example", "layer", "token"))
    arrays["stages"] = (np.stack([stages.argument_formation, fn, stages.flip_from_argument.astype(int),
                                  stages.saturation]), ("stage", "example"))
    arrays["stage_hist"] = (hist, ("stage", "layer"))
    arrays["correct"] = (np.stack([correct, correct_ext]).astype(np.int8), ("kind", "example"))
    arrays["argument_differs"] = (valid.astype(np.int8), ("example",))
    arrays["ffn_effect"] = (effect, ("example", "layer"))
    labels.update(site=list(lens_abs.sites), token=["argument", "answer"], kind=["abstractive", "extractive"],
                  stage=["argument_formation", "function_application", "flip_from_argument", "saturation"],
                  stage_hist=stage_names)

    examples = []
    for i in np.flatnonzero(good)[:2]:
        examples.append({"prompt": abs_set.prompts[i], "argument": abs_set.items[i].argument,
                         "answer": abs_set.answers()[i],
                         "stages": {k: int(getattr(stages, k)[i]) for k in ("argument_formation", "function_application", "saturation")},
                         "top1_pre_ffn": [model.token_str(int(t)) for t in lens_abs.top_ids[pre, i, :, 0]],
                         "top1_block_out": [model.token_str(int(t)) for t in lens_abs.top_ids[post, i, :, 0]]})

    # 3. o-vectors and interventions.
    targets = np.flatnonzero(valid)
    sources = pick_sources(good, stages, l_star) if l_star is not None else np.zeros(0, np.int64)
    if l_star is None or sources.size == 0 or targets.size == 0:
        scalars["o_vector_note"] = ("no correctly answered example with an FFN flip: o-vector experiments skipped"
                                    if targets.size else "no example whose argument and answer differ")
        log(f"[{task}] {scalars['o_vector_note']}")
    else:
        o_all = lens_abs.gathered["at/hook_mlp_out"][:, l_star]  # [n, d]
        o_single = o_all[other_source(sources, targets)]
        o_mean = leave_one_out_means(o_all, sources, targets)
        start = int(np.clip(l_star + s.start_offset, 0, L - 1))
        scalars.update(o_layer=l_star, intervention_start_layer=start, n_o_sources=int(sources.size),
                       n_targets=int(targets.size), transplant_positions=s.positions)
        arrays["o_vector_mean"] = (o_all[sources].mean(0), ("d_model",))
        t_arg, t_ans = arg[targets], ans[targets]
        ids = np.stack([t_arg, t_ans], 1)

        # 3a. Neutral copy contexts: the paper's transplant, residual adds, and adds of the FFN outputs
        # of the layers just before l* (on a small model the lens stages can bunch up at the top).
        other: Positions = "last" if s.positions == "all" else "all"
        c_tok, c_rp = encode(T.copy_contexts([abs_set.items[t] for t in targets], seed))
        c_pos = c_tok.shape[1]
        conditions = [("none", no_intervention(cfg, len(targets), c_pos)),
                      ("transplant_single", transplant(cfg, o_single, start, c_rp, c_pos, s.positions)),
                      ("transplant_mean", transplant(cfg, o_mean, start, c_rp, c_pos, s.positions)),
                      (f"transplant_mean_{other}", transplant(cfg, o_mean, start, c_rp, c_pos, other))]
        adds = [(l_star, g) for g in s.add_scales]
        adds += [(lam, s.sweep_scale) for lam in range(max(1, l_star - s.sweep_layers), l_star)]
        for lam, g in adds:
            o_lam = leave_one_out_means(lens_abs.gathered["at/hook_mlp_out"][:, lam], sources, targets)
            conditions.append((f"add_o{lam}_x{g:g}", residual_add(cfg, o_lam, [lam + s.start_offset], g, c_pos)))
        k = len(conditions)
        log(f"[{task}] copy contexts: {len(targets)} x {k} conditions x {c_pos} tokens (o from layer {l_star}, "
            f"{sources.size} sources)")
        lens_copy = run_interventions(model, *_tile(c_tok, c_rp, k), np.concatenate([ids] * k),
                                      Interventions.concat([iv for _, iv in conditions]), **run)
        top1 = _split(lens_copy.out_top1, k)
        out_rr = _split(lens_copy.out_rr, k)
        copies = top1[0] == t_arg
        scalars["copy_argument_top1_rate"] = float(copies.mean())
        copy = {}
        for c, (name, _) in enumerate(conditions):
            copy[name] = {"answer_top1_rate": float((top1[c] == t_ans).mean()),
                          "answer_top1_rate_where_copying": float((top1[c][copies] == t_ans[copies]).mean()) if copies.any() else None,
                          "argument_top1_rate": float((top1[c] == t_arg).mean()),
                          "answer_rr": float(out_rr[c, :, 1].mean()),
                          "answer_rr_change": float(out_rr[c, :, 1].mean() - out_rr[0, :, 1].mean()),
                          "answer_rr_raised_rate": float((out_rr[c, :, 1] > out_rr[0, :, 1]).mean())}
        scalars["copy"] = copy
        labels["copy_condition"] = [name for name, _ in conditions]
        arrays["copy_answer_rr"] = (out_rr[:, :, 1], ("copy_condition", "target"))
        arrays["copy_top1"] = (top1, ("copy_condition", "target"))
        first_add = k - len(adds)
        best = max(range(first_add, k), key=lambda c: (copy[conditions[c][0]]["answer_top1_rate"], copy[conditions[c][0]]["answer_rr"]))
        best_name, best_iv_layer = conditions[best][0], adds[best - first_add]
        scalars["best_add"] = best_name

        # 3b. Zero-shot prompts: transplant, and the add chosen on the copy contexts.
        z_tok, z_rp = encode(T.zero_shot_prompts(task, [abs_set.items[t] for t in targets]).prompts)
        z_pos = z_tok.shape[1]
        lam, g = best_iv_layer
        o_best = leave_one_out_means(lens_abs.gathered["at/hook_mlp_out"][:, lam], sources, targets)
        z_conditions = [("none", no_intervention(cfg, len(targets), z_pos)),
                        ("transplant_mean", transplant(cfg, o_mean, start, z_rp, z_pos, s.positions)),
                        (f"transplant_mean_{other}", transplant(cfg, o_mean, start, z_rp, z_pos, other)),
                        (best_name, residual_add(cfg, o_best, [lam + s.start_offset], g, z_pos))]
        k = len(z_conditions)
        log(f"[{task}] zero-shot: {len(targets)} x {k} conditions x {z_pos} tokens")
        lens_zero = run_interventions(model, *_tile(z_tok, z_rp, k), np.concatenate([ids] * k),
                                      Interventions.concat([iv for _, iv in z_conditions]), **run)
        z_correct = _split(lens_zero.out_top1, k) == t_ans[None]
        zero = {name: {"accuracy": float(z_correct[c].mean()), "gain": float(z_correct[c].mean() - z_correct[0].mean())}
                for c, (name, _) in enumerate(z_conditions)}
        scalars["zero_shot"] = zero
        labels["zero_shot_condition"] = [name for name, _ in z_conditions]
        arrays["zero_shot_correct"] = (z_correct.astype(np.int8), ("zero_shot_condition", "target"))

        # 3c. Subtract the example's own o after layer l* (correct few-shot prompts).
        rows = np.flatnonzero(good)
        parts = [residual_add(cfg, -o_all[rows], [l_star], g, a_tok.shape[1]) for g in s.subtract_scales]
        k = len(parts)
        log(f"[{task}] subtract o: {len(rows)} prompts x {k} scales")
        lens_sub = run_interventions(model, *_tile(a_tok[rows], a_rp[rows], k), np.concatenate([np.stack([arg, ans], 1)[rows]] * k),
                                     Interventions.concat(parts), **run)
        sub_top1 = _split(lens_sub.out_top1, k)
        subtract = np.stack([(sub_top1 == ans[rows][None]).mean(1), (sub_top1 == arg[rows][None]).mean(1)], 1)
        scalars["subtract"] = {f"x{g:g}": {"answer_top1_rate": float(subtract[i, 0]), "argument_top1_rate": float(subtract[i, 1])}
                               for i, g in enumerate(s.subtract_scales)}
        arrays["subtract"] = (subtract, ("scale", "measure"))
        labels["scale"] = [f"{g:g}" for g in s.subtract_scales]
        labels["measure"] = ["answer_top1_rate", "argument_top1_rate"]

    # 4. Late-FFN ablation, abstractive vs extractive, on clean-correct prompts.
    start_abl = default_ablation_start(L, l_star) if s.ablate_from is None else s.ablate_from
    _check_layer(cfg, start_abl, "ablate_from")
    scalars["ablate_from"] = start_abl
    retained = np.full((2, 2), np.nan)
    for j, (lens, tok_, rp_, ok, answer) in enumerate([(lens_abs, a_tok, a_rp, correct, ans),
                                                       (lens_ext, e_tok, e_rp, correct_ext, ans_ext)]):
        rows = np.flatnonzero(ok)[: s.max_ablation_items]
        if rows.size == 0:
            continue
        mean = lens.gathered["sum/hook_mlp_out"].sum(0) / float((rp_ + 1).sum())  # [L, d] token mean
        pos = tok_.shape[1]
        parts = [ablate(cfg, rows.size, pos, start_abl), ablate(cfg, rows.size, pos, start_abl, mean)]
        log(f"[{task}] ablate FFNs {start_abl}..{L - 1}: {labels['kind'][j]} {rows.size} prompts x zero/mean")
        res = run_interventions(model, *_tile(tok_[rows], rp_[rows], 2), np.concatenate([answer[rows]] * 2),
                                Interventions.concat(parts), **run)
        retained[:, j] = (_split(res.out_top1, 2) == answer[rows][None]).mean(1)
    acc = np.array([correct.mean(), correct_ext.mean()])
    scalars["ablation"] = {
        f"{ab}_{kind}": {"retained": None if np.isnan(retained[a, j]) else float(retained[a, j]),
                         "accuracy_after": None if np.isnan(retained[a, j]) else float(acc[j] * retained[a, j]),
                         "accuracy_drop": None if np.isnan(retained[a, j]) else float(acc[j] * (1 - retained[a, j]))}
        for a, ab in enumerate(("zero", "mean")) for j, kind in enumerate(("abstractive", "extractive"))}
    arrays["ablation_retained"] = (retained, ("ablation", "kind"))
    labels["ablation"] = ["zero", "mean"]
    return TaskAnalysis(task, scalars, arrays, labels, examples)
