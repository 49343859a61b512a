"""Temporal emergence of circuits over a checkpoint series (experiments.md A.8).

Per checkpoint t of one model and one role (the same filtered pairs at every checkpoint):
  * the circuit: top-k edges by |mean EAP-IG score| (k = 200), as a node set N_t;
  * behavioural accuracy: fraction of pairs with logit(target) > logit(foil) after the clean prompt
    (and the mean log p(target));
  * node Jaccard |N_t & N_ref| / |N_t | N_ref| against the previous checkpoint and the final one;
  * consolidation time: the first step t with Jaccard >= 0.6 at t and at the next checkpoint
    (`hold` = 2 consecutive checkpoints, both inside the series), for each reference; None if never;
  * a change-point fit of the structural trajectory (Jaccard vs final) and the functional one
    (accuracy) over x = log(1 + step), with a bootstrap CI over pairs.

Change-point model: two straight lines over x split between consecutive checkpoints (each side at
least `min_segment` = 3 checkpoints), the split chosen by grid search over every admissible split
(least squares). The breakpoint is the midpoint (in x) between the two checkpoints around the
split; the jump is right line minus left line at the breakpoint. A linear trend gives a jump near 0
and an ill-determined breakpoint; a step gives a large jump at a well-determined breakpoint.

Bootstrap over pairs: B resamples of the pairs with replacement (the same resamples at every
checkpoint, for both trajectories); each resample's trajectories are recomputed from its mean edge
scores and its accuracies and refitted. The CI is the 2.5-97.5 percentile range of the breakpoints.

Classification rule (fixed before looking at any result; A.8 calls wide CIs "gradual" while noting
they cannot exclude a transition):
  * "too few checkpoints" when fewer than 2 * min_segment checkpoints;
  * "flat" when the trajectory's range R = max - min is below 0.05 (nothing to classify);
  * "phase transition" when |jump| >= 0.5 R AND the CI spans at most 25 % of the x range;
  * "gradual refinement" otherwise.

Per-pair edge scores come from `jaxcirc.eap.eap_chunk` vmapped over single pairs (the same program
`eap_ig` runs, with the pair sum left undone), so bootstrapping needs no extra forward passes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcirc.circuit import graph_names
from jaxcirc.edge_patch import EdgeLayout
from jaxcirc.eap import eap_chunk, ig_alphas
from jaxcirc.graph import Graph
from jaxcirc.metrics import Metric, get_metric
from jaxcirc.models.config import ModelConfig
from jaxcirc.pairs import MinimalPairs

Array = jax.Array

THRESHOLD = 0.6
FLAT_RANGE = 0.05
JUMP_SHARE = 0.5
CI_WIDTH = 0.25
RULE = ("phase transition iff |jump| >= 0.5 x (max - min of the trajectory) and the 95 % bootstrap CI of the "
        "breakpoint spans <= 25 % of the log(1 + step) range; 'flat' if max - min < 0.05; otherwise gradual "
        "refinement")


# ----------------------------------------------------------------------------- per-pair EAP-IG


@partial(jax.jit, static_argnames=("cfg", "metric"))
def _per_pair_chunk(params: Any, pairs: MinimalPairs, alphas: Array | None, *, cfg: ModelConfig,
                    metric: Metric) -> Array:
    """[batch, n_src, n_dst] edge scores of each pair of the chunk (one pair per vmapped instance)."""
    single = jax.tree.map(lambda a: a[:, None], pairs)

    def one(p: MinimalPairs) -> Array:
        return eap_chunk(params, p, jnp.ones((1,), jnp.float32), {}, alphas, cfg=cfg, metric=metric, step_chunk=1)

    return jax.vmap(one)(single)


def chunk_size(n: int, batch_size: int) -> int:
    """Rows per padded chunk: batch_size, or the next power of two >= n when n is smaller, so that
    groups of different sizes share a few compiled shapes."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    return int(batch_size) if n >= batch_size else 1 << max(0, (int(n) - 1).bit_length())


def per_pair_edge_scores(cfg: ModelConfig, params: Any, pairs: MinimalPairs, *, steps: int = 5,
                         metric: str | Metric = "logprob", batch_size: int | None = None) -> np.ndarray:
    """[n_pairs, n_src, n_dst] float32 EAP-IG scores of every pair (`eap_ig(...).scores` is their mean;
    invalid edges are 0). Chunks of exactly `batch_size` pairs (default `chunk_size(n, 16)`), the last
    padded by repeats: pass one size for all calls so every role and checkpoint of a config share one
    compilation."""
    n = len(pairs)
    if n == 0:
        raise ValueError("No pairs to attribute.")
    if steps < 1:
        raise ValueError(f"EAP-IG needs steps >= 1, got {steps}.")
    valid = Graph.from_config(cfg).valid
    alphas = jnp.asarray(ig_alphas(int(steps)))
    size = chunk_size(n, 16) if batch_size is None else int(batch_size)
    if size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    out = np.zeros((n,) + valid.shape, np.float32)
    for start in range(0, n, size):
        idx = np.minimum(np.arange(start, start + size), n - 1)
        chunk = pairs.take(idx)
        scores = _per_pair_chunk(params, chunk, alphas, cfg=cfg, metric=get_metric(metric))
        real = min(size, n - start)
        out[start:start + real] = np.asarray(scores)[:real]
    out[:, ~valid] = 0.0
    return out


# ----------------------------------------------------------------------------- node sets


@dataclasses.dataclass(frozen=True)
class NodeIndex:
    """Node-level view of an edge layout (names as in `jaxcirc.circuit`): node names [n_nodes] and the
    node of every source row [n_src] and destination column [n_dst]."""

    names: tuple[str, ...]
    src_node: np.ndarray
    dst_node: np.ndarray
    valid: np.ndarray

    @classmethod
    def from_layout(cls, layout: EdgeLayout) -> "NodeIndex":
        gn = graph_names(layout)
        nodes = {n.name: n for n in gn.sources}
        nodes.update({n.name: n for n, _ in gn.destinations})
        ordered = sorted(nodes.values(), key=lambda n: n.sort_key)
        index = {n.name: i for i, n in enumerate(ordered)}
        src = np.array([index[n.name] for n in gn.sources])
        dst = np.array([index[n.name] for n, _ in gn.destinations])
        return cls(tuple(n.name for n in ordered), src, dst, layout.valid())

    @property
    def n_valid(self) -> int:
        return int(self.valid.sum())


def top_k_nodes(scores: Any, index: NodeIndex, k: int) -> np.ndarray:
    """bool [..., n_nodes]: nodes touched by the k valid edges of largest |score| in scores [..., n_src, n_dst]
    (the node set of `Circuit.from_scores(scores, layout, top_k=k)`, up to exact ties)."""
    scores = np.asarray(scores)
    lead = scores.shape[:-2]
    flat_valid = np.flatnonzero(index.valid)
    magnitude = np.abs(scores.reshape(lead + (-1,))[..., flat_valid])
    k = min(int(k), flat_valid.size)
    if k < 1:
        return np.zeros(lead + (len(index.names),), bool)
    picked = np.argpartition(-magnitude, k - 1, axis=-1)[..., :k]
    edges = flat_valid[picked]
    rows, cols = np.divmod(edges, index.valid.shape[1])
    presence = np.zeros(lead + (len(index.names),), bool)
    lead_idx = np.indices(lead + (k,))[:-1] if lead else ()
    presence[(*lead_idx, index.src_node[rows])] = True
    presence[(*lead_idx, index.dst_node[cols])] = True
    return presence


def top_k_edges(scores: Any, index: NodeIndex, k: int) -> np.ndarray:
    """bool [..., n_valid]: the k valid edges of largest |score| (valid edges in flat order)."""
    scores = np.asarray(scores)
    lead = scores.shape[:-2]
    magnitude = np.abs(scores.reshape(lead + (-1,))[..., np.flatnonzero(index.valid)])
    k = min(int(k), magnitude.shape[-1])
    out = np.zeros(magnitude.shape, bool)
    if k >= 1:
        np.put_along_axis(out, np.argpartition(-magnitude, k - 1, axis=-1)[..., :k], True, axis=-1)
    return out


def jaccard_rows(a: Any, b: Any) -> np.ndarray:
    """Jaccard of bool node-presence vectors [..., N] (NaN where both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    union = (a | b).sum(-1)
    inter = (a & b).sum(-1)
    return np.where(union > 0, inter / np.maximum(union, 1), np.nan)


def jaccard_trajectories(presence: Any) -> tuple[np.ndarray, np.ndarray]:
    """(vs previous [T] with NaN at 0, vs final [T]) for node presence [T, ..., N] (extra dims kept)."""
    presence = np.asarray(presence, bool)
    prev = np.full(presence.shape[:-1], np.nan)
    prev[1:] = jaccard_rows(presence[1:], presence[:-1])
    final = jaccard_rows(presence, presence[-1:])
    return prev, final


def chance_jaccard(index: NodeIndex, k: int, n_draws: int = 64, seed: int = 0) -> tuple[float, float]:
    """(node, edge) Jaccard between two circuits of k edges drawn uniformly at random from the valid
    edges, averaged over `n_draws` pairs of draws: the chance level of the Jaccard trajectories."""
    rng = np.random.default_rng(seed)
    scores = rng.random((2, n_draws) + index.valid.shape)
    nodes, edges = top_k_nodes(scores, index, k), top_k_edges(scores, index, k)
    return float(np.nanmean(jaccard_rows(nodes[0], nodes[1]))), float(np.nanmean(jaccard_rows(edges[0], edges[1])))


def consolidation_time(steps: Sequence[int], jaccard: Any, threshold: float = THRESHOLD, hold: int = 2) -> int | None:
    """The first step whose Jaccard and the next `hold - 1` checkpoints' are all >= threshold (the whole
    window inside the series; NaN fails); None if there is none."""
    values = np.asarray(jaccard, np.float64)
    if len(steps) != len(values):
        raise ValueError(f"{len(steps)} steps but {len(values)} Jaccard values.")
    if hold < 1:
        raise ValueError(f"hold must be at least 1, got {hold}.")
    ok = np.nan_to_num(values, nan=-np.inf) >= threshold
    for i in range(len(values) - hold + 1):
        if ok[i:i + hold].all():
            return int(steps[i])
    return None


# ----------------------------------------------------------------------------- change points


def log_step(steps: Sequence[int]) -> np.ndarray:
    return np.log1p(np.asarray(steps, np.float64))


@dataclasses.dataclass(frozen=True)
class ChangePoint:
    """Two-segment fit of y over x. split: index of the first right-hand point; breakpoint: x midway
    between points split-1 and split; jump: right minus left line at the breakpoint; slopes, the fit's
    SSE and the SSE of one straight line."""

    split: int
    breakpoint: float
    jump: float
    slope_left: float
    slope_right: float
    sse: float
    sse_linear: float


def _line_sse(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least-squares line per row: (intercept, slope, SSE) for x [n], y [..., n]."""
    xm = x.mean()
    ym = y.mean(-1, keepdims=True)
    sxx = ((x - xm) ** 2).sum()
    slope = ((x - xm) * (y - ym)).sum(-1) / sxx if sxx > 0 else np.zeros(y.shape[:-1])
    intercept = ym[..., 0] - slope * xm
    resid = y - (intercept[..., None] + slope[..., None] * x)
    return intercept, slope, (resid ** 2).sum(-1)


def fit_change_points(x: Any, y: Any, min_segment: int = 3) -> dict[str, np.ndarray]:
    """Vectorised two-segment fits of y [..., T] over x [T] (grid search over every split with at least
    `min_segment` points on each side). Arrays per row: split, breakpoint, jump, slope_left,
    slope_right, sse, sse_linear."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    T = x.shape[0]
    if y.shape[-1] != T:
        raise ValueError(f"y has {y.shape[-1]} points but x has {T}.")
    if T < 2 * min_segment:
        raise ValueError(f"A two-segment fit needs at least {2 * min_segment} points, got {T}.")
    if np.any(np.diff(x) <= 0):
        raise ValueError("x must be strictly increasing.")
    best = None
    for split in range(min_segment, T - min_segment + 1):
        a_l, b_l, s_l = _line_sse(x[:split], y[..., :split])
        a_r, b_r, s_r = _line_sse(x[split:], y[..., split:])
        bp = 0.5 * (x[split - 1] + x[split])
        cand = {"split": np.full(y.shape[:-1], split), "breakpoint": np.full(y.shape[:-1], bp),
                "jump": (a_r + b_r * bp) - (a_l + b_l * bp), "slope_left": b_l, "slope_right": b_r,
                "sse": s_l + s_r}
        if best is None:
            best = cand
        else:
            better = cand["sse"] < best["sse"] - 1e-12  # ties keep the earlier split
            best = {k: np.where(better, cand[k], best[k]) for k in best}
    best["sse_linear"] = _line_sse(x, y)[2]
    return best


def fit_change_point(x: Any, y: Any, min_segment: int = 3) -> ChangePoint:
    """The two-segment fit of one trajectory y [T] over x [T]."""
    fit = fit_change_points(x, np.asarray(y, np.float64)[None], min_segment)
    return ChangePoint(int(fit["split"][0]), float(fit["breakpoint"][0]), float(fit["jump"][0]),
                       float(fit["slope_left"][0]), float(fit["slope_right"][0]), float(fit["sse"][0]),
                       float(fit["sse_linear"][0]))


@dataclasses.dataclass(frozen=True)
class TrajectoryFit:
    """Change-point fit of one trajectory with its bootstrap CI and classification (module docstring).

    breakpoint / ci in x = log(1 + step); breakpoint_step / ci_steps back in steps; relative_ci_width =
    CI width / x range; jump_share = |jump| / (max - min of y)."""

    classification: str
    fit: ChangePoint | None
    breakpoint_step: float | None
    ci: tuple[float, float] | None
    ci_steps: tuple[float, float] | None
    relative_ci_width: float | None
    jump_share: float | None
    y_range: float
    n_boot: int
    rule: str = RULE

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        return out


def classify_trajectory(steps: Sequence[int], y: Any, boot_y: Any | None = None, min_segment: int = 3) -> TrajectoryFit:
    """Fit y [T] over log(1 + step), bootstrap the breakpoint over boot_y [B, T] (resampled
    trajectories) and classify it by the module's rule."""
    x = log_step(steps)
    y = np.asarray(y, np.float64)
    y_range = float(np.nanmax(y) - np.nanmin(y)) if np.isfinite(y).any() else 0.0
    n_boot = 0 if boot_y is None else int(np.shape(boot_y)[0])
    if len(x) < 2 * min_segment or not np.isfinite(y).all():
        return TrajectoryFit("too few checkpoints", None, None, None, None, None, None, y_range, n_boot)
    fit = fit_change_point(x, y, min_segment)
    ci = ci_steps = width = None
    if n_boot:
        boot = np.asarray(boot_y, np.float64)
        boot = boot[np.isfinite(boot).all(-1)]
        if len(boot):
            bps = fit_change_points(x, boot, min_segment)["breakpoint"]
            lo, hi = np.percentile(bps, [2.5, 97.5])
            ci, ci_steps = (float(lo), float(hi)), (float(np.expm1(lo)), float(np.expm1(hi)))
            width = float((hi - lo) / (x[-1] - x[0]))
    share = abs(fit.jump) / y_range if y_range > 0 else None
    if y_range < FLAT_RANGE:
        label = "flat"
    elif share is not None and share >= JUMP_SHARE and width is not None and width <= CI_WIDTH:
        label = "phase transition"
    else:
        label = "gradual refinement"
    return TrajectoryFit(label, fit, float(np.expm1(fit.breakpoint)), ci, ci_steps, width, share, y_range, n_boot)


# ----------------------------------------------------------------------------- per role


def bootstrap_counts(n: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n] how often each pair is drawn in each resample (with replacement)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float32)


def checkpoint_nodes(scores: Any, counts: np.ndarray, index: NodeIndex, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For per-pair scores [n, n_src, n_dst] of one checkpoint: (mean scores [n_src, n_dst], node
    presence [N] of the top-k circuit, presence [B, N] of each bootstrap resample's circuit); the
    circuit's edges are `top_k_edges(mean, index, k)`."""
    scores = np.asarray(scores, np.float32)
    n = scores.shape[0]
    mean = scores.mean(0)
    flat = scores.reshape(n, -1)
    boot_mean = (counts @ flat / n).reshape((counts.shape[0],) + mean.shape)
    return mean, top_k_nodes(mean, index, k), top_k_nodes(boot_mean, index, k)


@dataclasses.dataclass(frozen=True)
class RoleEmergence:
    """Emergence of one role's circuit in one model (arrays [T] over checkpoints). whole_graph: top_k covers
    every valid edge; spans_all_nodes: every checkpoint's circuit touches every node (Jaccard is then 1)."""

    steps: tuple[int, ...]
    accuracy: np.ndarray
    logprob: np.ndarray
    n_nodes: np.ndarray
    jaccard_prev: np.ndarray
    jaccard_final: np.ndarray
    t_cons_prev: int | None
    t_cons_final: int | None
    structural: TrajectoryFit
    functional: TrajectoryFit
    n_pairs: int
    whole_graph: bool
    spans_all_nodes: bool
    edge_jaccard_final: np.ndarray | None = None
    t_cons_edges: int | None = None

    def summary(self) -> dict[str, Any]:
        return {"steps": list(self.steps), "accuracy": self.accuracy.tolist(), "logprob": self.logprob.tolist(),
                "n_nodes": self.n_nodes.tolist(), "jaccard_prev": self.jaccard_prev.tolist(),
                "jaccard_final": self.jaccard_final.tolist(), "t_cons_prev": self.t_cons_prev,
                "t_cons_final": self.t_cons_final, "structural": self.structural.to_dict(),
                "functional": self.functional.to_dict(), "n_pairs": self.n_pairs, "whole_graph": self.whole_graph,
                "spans_all_nodes": self.spans_all_nodes,
                "edge_jaccard_final": None if self.edge_jaccard_final is None else self.edge_jaccard_final.tolist(),
                "t_cons_edges": self.t_cons_edges}


def analyse_role(steps: Sequence[int], presence: Any, boot_presence: Any, correct: Any, logprob: Any,
                 counts: np.ndarray, *, n_valid: int, top_k: int, threshold: float = THRESHOLD, hold: int = 2,
                 min_segment: int = 3, edge_presence: Any | None = None) -> RoleEmergence:
    """Emergence of one role from per-checkpoint node presence [T, N], bootstrap presence [T, B, N],
    per-pair clean-context correctness [T, n] and log p(target) [T, n], and the resample counts [B, n].
    edge_presence [T, n_valid] (optional): the circuits' edges, for the supplementary edge Jaccard vs
    final and its consolidation time (same threshold and hold; no change-point fit)."""
    presence = np.asarray(presence, bool)
    boot_presence = np.asarray(boot_presence, bool)
    correct = np.asarray(correct, np.float64)
    n = correct.shape[1]
    prev, final = jaccard_trajectories(presence)
    _, boot_final = jaccard_trajectories(boot_presence)            # [T, B]
    accuracy = correct.mean(1)
    boot_accuracy = (np.asarray(counts, np.float64) @ correct.T / n)  # [B, T]
    edge_final = t_edges = None
    if edge_presence is not None:
        _, edge_final = jaccard_trajectories(edge_presence)
        t_edges = consolidation_time(steps, edge_final, threshold, hold)
    return RoleEmergence(
        tuple(int(s) for s in steps), accuracy, np.asarray(logprob, np.float64).mean(1), presence.sum(-1),
        prev, final, consolidation_time(steps, prev, threshold, hold), consolidation_time(steps, final, threshold, hold),
        classify_trajectory(steps, final, boot_final.T, min_segment),
        classify_trajectory(steps, accuracy, boot_accuracy, min_segment), n, top_k >= n_valid, bool(presence.all()),
        edge_final, t_edges)


# ----------------------------------------------------------------------------- figure


def emergence_figure(results: Mapping[str, Mapping[str, RoleEmergence]]):
    """A matplotlib Figure: per model (rows) accuracy and Jaccard vs final / previous per role over steps."""
    from matplotlib.figure import Figure

    models = list(results)
    fig = Figure(figsize=(17, 3.0 * max(1, len(models))))
    axes = fig.subplots(max(1, len(models)), 4, squeeze=False)
    for row, model in enumerate(models):
        for role, em in results[model].items():
            x = np.asarray(em.steps, np.float64) + 1
            axes[row, 0].plot(x, em.accuracy, marker=".", markersize=3, label=role)
            axes[row, 1].plot(x, em.jaccard_final, marker=".", markersize=3, label=role)
            axes[row, 2].plot(x, em.jaccard_prev, marker=".", markersize=3, label=role)
            if em.edge_jaccard_final is not None:
                axes[row, 3].plot(x, em.edge_jaccard_final, marker=".", markersize=3, label=role)
        for col, title in enumerate(("accuracy (target > foil, clean)", "node Jaccard vs final",
                                     "node Jaccard vs previous", "edge Jaccard vs final")):
            ax = axes[row, col]
            ax.set_xscale("log")
            ax.set_ylim(-0.02, 1.02)
            ax.set_title(f"{model}: {title}", fontsize=8)
            ax.set_xlabel("step + 1")
            ax.grid(linewidth=0.3, alpha=0.5)
            if col:
                ax.axhline(THRESHOLD, color="0.5", linewidth=0.7, linestyle="--")
        axes[row, 0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return fig


def save_emergence_figure(results: Mapping[str, Mapping[str, RoleEmergence]], path: str | Path) -> Path:
    fig = emergence_figure(results)
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path
