"""Faithfulness of circuits, measured by exact edge patching (not by attribution).

    result = faithfulness(model, pairs, circuit, ablation="corrupt", metric="logit_diff")
    result.faithfulness, result.necessity
    curve = faithfulness_curve(model, pairs, scores)      # top-k circuits of increasing size
    curve.area

All runs use the clean prompts. A circuit keeps its own edges clean and patches every other edge
from an ablation source (`jaxcirc.edge_patch`), so with m(.) the batch-mean metric:

    full     = m(no edge patched)                    the model itself
    null     = m(every edge patched)                 the empty circuit
    faithfulness (sufficiency) = (m(only circuit kept) - null) / (full - null)
    ablated                    = (m(circuit edges patched) - null) / (full - null)
    necessity                  = 1 - ablated         (how much is lost without the circuit)

Sources a patched edge carries:
  "corrupt": the node outputs of the corrupted prompt of the same pair (null = corrupted run);
  "mean":    per position, the mean over all pairs' corrupted prompts (real tokens only);
  "zero":    zeros (the edge is removed).
An explicit array [n_src, batch, pos, d_model] may also be passed (then `batch_size` must be None).

Every set of circuits is one vmapped program over edge masks, run in chunks of `chunk` masks (pad
the last chunk so the program compiles once) and, optionally, over batches of `batch_size` pairs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxcirc.circuit import Circuit, edge_ranks
from jaxcirc.edge_patch import EdgeLayout, EdgePatch, node_output_cache_names, node_outputs
from jaxcirc.hooks import Hooks
from jaxcirc.metrics import Metric, get_metric, metric_name, pair_logits
from jaxcirc.pairs import MinimalPairs

Array = jax.Array
Ablation = Literal["corrupt", "mean", "zero"]


@partial(jax.jit, static_argnames=("forward", "metric", "layout"))
def _patched_metric_sums(params: Any, pairs: MinimalPairs, source: Array, clean_logits: Array,
                         weights: Array, masks: Array, *, forward: Callable, metric: Metric,
                         layout: EdgeLayout) -> Array:
    """[n_masks] sum over the batch of weights * metric, for each patch mask [n_masks, n_src, n_dst]."""

    def one(mask: Array) -> Array:
        hooks = Hooks(edges=EdgePatch(mask, source, layout))
        logits, _ = forward(params, pairs.clean, hooks, logits_at=pairs.position)
        return jnp.sum(metric(logits, pairs, clean_logits) * weights)

    return jax.vmap(one)(masks)


@partial(jax.jit, static_argnames=("forward", "names", "layout", "config"))
def _corrupt_node_outputs(params: Any, pairs: MinimalPairs, *, forward: Callable, names: tuple[str, ...],
                          layout: EdgeLayout, config: Any) -> Array:
    """[n_src, batch, pos, d_model] node outputs of the corrupted prompts."""
    _, cache = forward(params, pairs.corrupt, Hooks(cache=names), logits_at=pairs.position)
    return node_outputs(config, cache, layout)


def _batches(pairs: MinimalPairs, batch_size: int | None):
    """(batch, weights) with the last batch padded by repeats of pair 0 at weight 0, so every batch
    has the same shape and the program compiles once."""
    size = len(pairs) if batch_size is None else int(batch_size)
    if size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    for start in range(0, len(pairs), size):
        idx = np.arange(start, min(start + size, len(pairs)))
        weights = np.ones(size, np.float32)
        weights[len(idx):] = 0
        idx = np.concatenate([idx, np.zeros(size - len(idx), idx.dtype)])
        yield pairs.take(idx), jnp.asarray(weights)


def _mean_source(model: Any, pairs: MinimalPairs, layout: EdgeLayout, batch_size: int | None) -> Array:
    """[n_src, pos, d_model] per-position mean of corrupted node outputs over real tokens."""
    names = node_output_cache_names(model.config)
    total, count = None, None
    for batch, weights in _batches(pairs, batch_size):
        out = _corrupt_node_outputs(model.params, batch, forward=model.forward, names=names, layout=layout,
                                    config=model.config)
        w = weights[:, None] * batch.mask.astype(jnp.float32)  # [batch, pos]
        s, c = jnp.einsum("ubpd,bp->upd", out, w), w.sum(0)
        total, count = (s, c) if total is None else (total + s, count + c)
    return total / jnp.maximum(count, 1.0)[None, :, None]


def chunk_for_budget(model: Any, layout: EdgeLayout, batch: int, n_pos: int, memory_budget: int) -> int:
    """Masks per vmapped chunk that fit `memory_budget` bytes, by a rough per-mask estimate: the
    edge-patching buffers (source, running outputs and their difference, 3 x [n_src, batch, pos,
    d_model]) plus one layer's activations, in float32."""
    cfg = model.config
    per_mask = 4 * batch * n_pos * (3 * layout.n_src * cfg.d_model + 2 * cfg.d_mlp + 4 * cfg.d_model)
    return max(1, int(memory_budget // per_mask))


def patched_metric(model: Any, pairs: MinimalPairs, make_masks: Callable[[int, int], Any] | Any,
                   n_masks: int | None = None, *, ablation: Ablation | Array = "corrupt",
                   metric: str | Metric = "logit_diff", layout: EdgeLayout | None = None,
                   chunk: int = 8, batch_size: int | None = None, memory_budget: int | None = None) -> np.ndarray:
    """[n_masks] batch-mean metric of the clean run with the edges of each mask patched.

    make_masks: patch masks [n_masks, n_src, n_dst] (1 = the edge carries the ablation source), or a
    function (start, stop) -> masks[start:stop] with n_masks given, so large sweeps never hold every
    mask at once. `model` needs .config, .params and .forward (a `jaxcirc.Model`). Memory grows with
    chunk x batch_size; `memory_budget` (bytes) sets chunk from a rough estimate instead.
    """
    layout = layout or EdgeLayout.canonical(model.config)
    if memory_budget is not None:
        batch = len(pairs) if batch_size is None else min(int(batch_size), len(pairs))
        chunk = chunk_for_budget(model, layout, batch, pairs.n_pos, memory_budget)
    metric_fn = get_metric(metric)
    if not callable(make_masks):
        masks_all = np.asarray(make_masks)
        if masks_all.ndim != 3 or masks_all.shape[1:] != (layout.n_src, layout.n_dst):
            raise ValueError(f"Patch masks have shape {masks_all.shape}; expected [n_masks, {layout.n_src}, "
                             f"{layout.n_dst}] for this model's graph.")
        n_masks = masks_all.shape[0]
        make_masks = lambda a, b: masks_all[a:b]  # noqa: E731
    elif n_masks is None:
        raise ValueError("Give n_masks when make_masks is a function.")
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}.")
    if len(pairs) == 0:
        raise ValueError("No pairs to evaluate.")
    chunk = min(chunk, n_masks)
    explicit = not isinstance(ablation, str)
    if explicit and batch_size is not None:
        raise ValueError("An explicit source array covers all pairs at once; leave batch_size as None.")
    if not explicit and ablation not in ("corrupt", "mean", "zero"):
        raise ValueError(f"ablation must be 'corrupt', 'mean', 'zero' or a source array, got {ablation!r}.")
    mean = _mean_source(model, pairs, layout, batch_size) if not explicit and ablation == "mean" else None
    names = node_output_cache_names(model.config)
    sums = np.zeros(n_masks)
    for batch, weights in _batches(pairs, batch_size):
        if explicit:
            source = jnp.asarray(ablation)
        elif ablation == "corrupt":
            source = _corrupt_node_outputs(model.params, batch, forward=model.forward, names=names,
                                           layout=layout, config=model.config)
        else:
            shape = (layout.n_src, len(batch), batch.n_pos, model.config.d_model)
            source = jnp.zeros(shape) if ablation == "zero" else jnp.broadcast_to(mean[:, None], shape)
        clean_logits = pair_logits(model.forward, model.params, batch, which="clean")
        for start in range(0, n_masks, chunk):
            stop = min(start + chunk, n_masks)
            masks = np.asarray(make_masks(start, stop), dtype=np.float32)
            if masks.shape != (stop - start, layout.n_src, layout.n_dst):
                raise ValueError(f"make_masks({start}, {stop}) gave shape {masks.shape}; expected "
                                 f"[{stop - start}, {layout.n_src}, {layout.n_dst}].")
            if stop - start < chunk:  # pad with copies so every chunk has one shape
                masks = np.concatenate([masks, np.repeat(masks[-1:], chunk - (stop - start), 0)])
            out = _patched_metric_sums(model.params, batch, source, clean_logits, weights, jnp.asarray(masks),
                                       forward=model.forward, metric=metric_fn, layout=layout)
            sums[start:stop] += np.asarray(out, dtype=np.float64)[:stop - start]
    return sums / len(pairs)


def _normalise(value: Any, full: float, null: float) -> Any:
    span = full - null
    if span == 0:
        return np.full(np.shape(value), np.nan) if np.ndim(value) else float("nan")
    return (np.asarray(value, np.float64) - null) / span


def _circuit_mask(circuit: Circuit | Any, layout: EdgeLayout) -> np.ndarray:
    if isinstance(circuit, Circuit):
        return circuit.edge_mask(layout)
    mask = np.asarray(circuit, dtype=bool)
    if mask.shape != (layout.n_src, layout.n_dst):
        raise ValueError(f"Circuit mask has shape {mask.shape}; expected [{layout.n_src}, {layout.n_dst}].")
    return mask & layout.valid()


@dataclasses.dataclass(frozen=True)
class Faithfulness:
    """Faithfulness of one circuit (definitions in the module docstring). *_metric are raw batch means."""

    faithfulness: float
    ablated: float
    necessity: float
    full_metric: float
    null_metric: float
    circuit_metric: float
    ablated_metric: float
    n_edges: int
    n_valid: int
    ablation: str
    metric: str
    n_pairs: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def faithfulness(model: Any, pairs: MinimalPairs, circuit: Circuit | Any, *, ablation: Ablation | Array = "corrupt",
                 metric: str | Metric = "logit_diff", layout: EdgeLayout | None = None, chunk: int = 4,
                 batch_size: int | None = None, memory_budget: int | None = None) -> Faithfulness:
    """Faithfulness, sufficiency and necessity of a circuit (a Circuit or a bool mask [n_src, n_dst]).
    Full graph -> faithfulness 1, empty graph -> 0 (all four runs share one vmapped program)."""
    layout = layout or EdgeLayout.canonical(model.config)
    keep = _circuit_mask(circuit, layout)
    valid = layout.valid()
    masks = np.stack([np.zeros_like(valid), valid, valid & ~keep, keep])
    full, null, kept, ablated = patched_metric(model, pairs, masks, ablation=ablation, metric=metric,
                                               layout=layout, chunk=chunk, batch_size=batch_size,
                                               memory_budget=memory_budget)
    f, a = _normalise(kept, full, null), _normalise(ablated, full, null)
    return Faithfulness(float(f), float(a), float(1 - a), float(full), float(null), float(kept), float(ablated),
                        int(keep.sum()), int(valid.sum()), ablation if isinstance(ablation, str) else "explicit",
                        metric_name(metric), len(pairs))


def curve_area(fraction: Any, values: Any) -> float:
    """Trapezoid area under values [m] over fraction [m] (sorted ascending)."""
    x, y = np.asarray(fraction, np.float64), np.asarray(values, np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"fraction and values must be 1-D of equal length, got {x.shape} and {y.shape}.")
    if np.any(np.diff(x) < 0):
        raise ValueError("fraction must be sorted ascending.")
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))


@dataclasses.dataclass(frozen=True)
class FaithfulnessCurve:
    """Faithfulness of top-k circuits: n_edges [m] (k), fraction [m] = k / n_valid, faithfulness [m],
    metric [m] raw batch means; area: trapezoid over fraction (1 for a perfect circuit at every size
    over [0, 1]; the points given bound the range)."""

    n_edges: np.ndarray
    fraction: np.ndarray
    faithfulness: np.ndarray
    metric_values: np.ndarray
    area: float
    full_metric: float
    null_metric: float
    n_valid: int
    ablation: str
    metric: str

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in out.items()}


def faithfulness_curve(model: Any, pairs: MinimalPairs, scores: Any, *, edge_counts: Any = None,
                       n_points: int = 21, ablation: Ablation | Array = "corrupt",
                       metric: str | Metric = "logit_diff", layout: EdgeLayout | None = None,
                       chunk: int = 8, batch_size: int | None = None,
                       memory_budget: int | None = None) -> FaithfulnessCurve:
    """Faithfulness of the top-k-by-|score| circuit of `scores` [n_src, n_dst] for each k in
    edge_counts (default: n_points evenly spaced from 0 to all valid edges), plus its area."""
    layout = layout or EdgeLayout.canonical(model.config)
    ranks = edge_ranks(scores, layout)
    valid = layout.valid()
    n_valid = int(valid.sum())
    if edge_counts is None:
        if n_points < 2:
            raise ValueError(f"n_points must be at least 2, got {n_points}.")
        edge_counts = np.unique(np.round(np.linspace(0, n_valid, n_points)).astype(np.int64))
    counts = np.asarray(edge_counts, np.int64).reshape(-1)
    if counts.size == 0 or counts.min() < 0 or counts.max() > n_valid or np.any(np.diff(counts) <= 0):
        raise ValueError(f"edge_counts must be increasing integers in [0, {n_valid}] (the valid edges), "
                         f"got {counts.tolist()[:10]}.")
    # Mask 0: nothing patched (full); mask 1: everything patched (null); then the circuits.
    def make_masks(start: int, stop: int) -> np.ndarray:
        out = []
        for i in range(start, stop):
            if i == 0:
                out.append(np.zeros_like(valid))
            elif i == 1:
                out.append(valid)
            else:
                out.append(valid & (ranks >= counts[i - 2]))
        return np.stack(out)

    values = patched_metric(model, pairs, make_masks, len(counts) + 2, ablation=ablation, metric=metric,
                            layout=layout, chunk=chunk, batch_size=batch_size, memory_budget=memory_budget)
    full, null, values = float(values[0]), float(values[1]), values[2:]
    fraction = counts / n_valid
    faith = _normalise(values, full, null)
    return FaithfulnessCurve(counts, fraction, faith, values, curve_area(fraction, faith), full, null, n_valid,
                             ablation if isinstance(ablation, str) else "explicit", metric_name(metric))


def plot_faithfulness_curve(curve: FaithfulnessCurve, path: str | Path, mark: int | None = 200,
                            title: str | None = None) -> Path:
    """PNG of faithfulness vs number of edges kept (log x axis; `mark` draws a vertical line)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.8))
    ax = fig.add_subplot()
    x = np.maximum(curve.n_edges, 1)
    ax.plot(x, curve.faithfulness, marker=".")
    ax.set_xscale("log")
    ax.axhline(1, color="0.6", linewidth=0.7)
    ax.axhline(0, color="0.6", linewidth=0.7)
    if mark:
        ax.axvline(mark, color="tab:red", linewidth=0.7, linestyle="--")
    ax.set_xlabel(f"edges kept (of {curve.n_valid}; 0 plotted at 1)")
    ax.set_ylabel("normalised faithfulness")
    ax.grid(linewidth=0.3, alpha=0.5)
    ax.set_title(title or f"Faithfulness ({curve.metric}, {curve.ablation} ablation; area {curve.area:.3f})",
                 fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path
