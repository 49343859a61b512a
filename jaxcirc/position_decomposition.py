"""Additive decomposition of attention logits into distance, query and key terms (Han & Ji).

    dec = decompose(logits)            # logits [..., n, n] (e.g. [layer, batch, head, q, k])
    dec.r                              # [...] Pearson r of logit(i, j) with a(i-j) + b(i) + c(j)
    fit = two_axis_fit(m)              # m [..., distance, key] (dummy-distance table): f_d + g_j

The three-term ("ternary") model logit(i, j) ~ a(i - j) + b(i) + c(j) is fitted by least squares on
the causal triangle j <= i by backfitting: each term in turn is set to the mean, over its group
(a diagonal, a row, a column), of what the other two leave. A sweep only needs the group sums of
the logits and the group co-occurrence counts of the mask, so after one pass over the [n, n]
logits every sweep is three [n] x [n, n] products; it never forms the one-hot design matrix and
converges in 10-20 sweeps. Every entry point is vectorised over leading axes (layers, texts, heads).

Identifiability. Besides constants, the three terms share a linear trend: a(d) + alpha d,
b(i) - alpha i, c(j) + alpha j gives the same fitted values (the age-period-cohort problem), so the
split of a trend between the terms is a convention, not a measurement. Fitted values, r and the
unique variance shares below do not depend on it. The terms returned use this convention: the
query term b has no constant and no linear trend in i, the key term c has (count-weighted) mean
zero, and the distance term a carries the constant.

The attention-sink column j = 0 (keys at the first position, which many trained models attend to
heavily) dominates the variance of many heads; `sink` chooses whether it is fitted with the rest
("include"), dropped ("exclude", the default), or fitted "separate"ly: the terms are estimated
without it and the column then gets its own offset, and r is measured with it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Sink = Literal["include", "exclude", "separate"]
TERMS = ("distance", "query", "key")


def causal_mask(n: int, *, sink: Sink = "exclude") -> np.ndarray:
    """[n, n] bool: the causal triangle j <= i, without the column j = 0 unless sink="include"."""
    _check_sink(sink)
    mask = np.tril(np.ones((n, n), bool))
    if sink != "include":
        mask[:, 0] = False
    return mask


def _check_sink(sink: str) -> None:
    if sink not in ("include", "exclude", "separate"):
        raise ValueError(f"sink must be 'include', 'exclude' or 'separate', got {sink!r}.")


def _check_square(logits: Array, mask: np.ndarray) -> None:
    if logits.ndim < 2 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"logits must be [..., n, n] (query x key), got shape {tuple(logits.shape)}.")
    if mask.shape != logits.shape[-2:]:
        raise ValueError(f"mask has shape {mask.shape} but logits end in {tuple(logits.shape[-2:])}.")
    if (mask & ~np.tril(np.ones(mask.shape, bool))).any():
        raise ValueError("mask selects entries above the diagonal (key after query); the distance term "
                         "i - j is defined on the causal triangle only.")


@dataclasses.dataclass(frozen=True)
class _Groups:
    """Index tables for the three groupings of an [n, n] matrix: rows, columns and diagonals."""

    distance: np.ndarray  # [n, n] i - j (wrapped above the diagonal, where the mask is off)
    skew_rows: np.ndarray  # [n, n]: entry (d, t) of the skewed matrix is (t, t - d)
    skew_cols: np.ndarray

    @classmethod
    def of(cls, n: int) -> "_Groups":
        i, j = np.arange(n)[:, None], np.arange(n)[None, :]
        rows = np.broadcast_to(np.arange(n)[None, :], (n, n))
        return cls(distance=(i - j) % n, skew_rows=rows, skew_cols=(rows - np.arange(n)[:, None]) % n)


@dataclasses.dataclass(frozen=True)
class _Design:
    """Group counts of a fit mask: how many entries each diagonal, row and column holds, and how
    many each pair of groups shares. Backfitting only needs these and the group sums of the
    logits, so every sweep is three small matrix products instead of passes over [n, n]."""

    cnt_d: np.ndarray  # [n] entries on diagonal i - j = d
    cnt_r: np.ndarray  # [n] entries in row i
    cnt_c: np.ndarray  # [n] entries in column j
    dr: np.ndarray  # [n, n] dr[d, i] = 1 if (i, i - d) is in the mask
    dc: np.ndarray  # [n, n] dc[d, j] = 1 if (j + d, j) is in the mask
    rc: np.ndarray  # [n, n] the mask itself

    @classmethod
    def of(cls, mask: np.ndarray) -> "_Design":
        n = mask.shape[0]
        d, t = np.arange(n)[:, None], np.arange(n)[None, :]
        inside = t - d >= 0
        dr = np.where(inside, mask[t, np.clip(t - d, 0, n - 1)], False)
        inside = t + d < n
        dc = np.where(inside, mask[np.clip(t + d, 0, n - 1), t], False)
        f = np.float32
        return cls(dr.sum(1).astype(f), mask.sum(1).astype(f), mask.sum(0).astype(f), dr.astype(f), dc.astype(f),
                   mask.astype(f))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Stats:
    """Sufficient statistics of logits [batch, n, n] for additive fits on one mask: the masked
    mean, total sum of squares about it, and the group sums of the centred logits."""

    mean: Array  # [batch]
    tss: Array  # [batch]
    sum_d: Array  # [batch, n]
    sum_r: Array  # [batch, n]
    sum_c: Array  # [batch, n]


def _stats(w: Array, mask: np.ndarray) -> _Stats:
    n = w.shape[-1]
    groups = _Groups.of(n)
    m = jnp.asarray(mask, w.dtype)
    w = jnp.where(mask, w, 0.0)  # masked logits may hold float32 min, whose square overflows
    mean = (w * m).sum((-1, -2)) / mask.sum()
    wc = (w - mean[:, None, None]) * m
    return _Stats(mean=mean, tss=(wc * wc).sum((-1, -2)), sum_d=wc[:, groups.skew_rows, groups.skew_cols].sum(-1),
                  sum_r=wc.sum(-1), sum_c=wc.sum(-2))


def _backfit(stats: _Stats, mask: np.ndarray, use: tuple[bool, bool, bool], max_iter: int, tol: float):
    """Backfit a(i-j) + b(i) + c(j) (the terms switched on in `use`) to the centred logits whose
    statistics are `stats`, on `mask`.

    Returns the terms ([batch, n] each; the constant is left out: the logits were centred), R^2,
    the sweeps used and the last relative change [batch]."""
    design = _Design.of(mask)
    dr, dc, rc = (jnp.asarray(x) for x in (design.dr, design.dc, design.rc))
    scale = jnp.sqrt(stats.tss / mask.sum()) + 1e-30

    def mean(total, count):
        return jnp.where(count > 0, total / np.maximum(count, 1), 0.0)

    def sweep(state):
        a, b, c, it, _ = state
        old = (a, b, c)
        if use[0]:
            a = mean(stats.sum_d - b @ dr.T - c @ dc.T, design.cnt_d)
        if use[1]:
            b = mean(stats.sum_r - a @ dr - c @ rc.T, design.cnt_r)
        if use[2]:
            c = mean(stats.sum_c - a @ dc - b @ rc, design.cnt_c)
        change = jnp.max(jnp.stack([jnp.abs(new - prev).max(-1) for new, prev in zip((a, b, c), old)]), axis=0)
        return a, b, c, it + 1, change / scale

    def running(state):
        return (state[3] < max_iter) & jnp.any(state[4] > tol)

    zeros = jnp.zeros_like(stats.sum_r)
    a, b, c, iterations, change = jax.lax.while_loop(
        running, sweep, (zeros, zeros, zeros, jnp.int32(0), jnp.full(zeros.shape[:1], jnp.inf, zeros.dtype)))
    # At the least-squares optimum the explained sum of squares is theta . (group sums).
    explained = (a * stats.sum_d).sum(-1) + (b * stats.sum_r).sum(-1) + (c * stats.sum_c).sum(-1)
    r2 = jnp.clip(explained / jnp.maximum(stats.tss, 1e-30), 0.0, 1.0)
    return (a, b, c), r2, iterations, change


def _weighted_mean(x: Array, weights: Array) -> Array:
    return (x * weights).sum(-1, keepdims=True) / jnp.maximum(weights.sum(-1, keepdims=True), 1)


def normalize_terms(distance: Array, query: Array, key: Array, mask: np.ndarray) -> tuple[Array, Array, Array]:
    """Move the unidentifiable parts of a 3-term fit into the documented convention: query term
    without constant and linear trend, key term with count-weighted mean zero, constants in the
    distance term. Terms are [..., n]; groups with no entry in `mask` stay 0. Fitted values
    a(i-j) + b(i) + c(j) are unchanged on the mask."""
    n = mask.shape[0]
    groups = _Groups.of(n)
    cnt_d = jnp.asarray(mask[groups.skew_rows, groups.skew_cols].sum(-1), distance.dtype)
    cnt_r = jnp.asarray(mask.sum(-1), distance.dtype)
    cnt_c = jnp.asarray(mask.sum(-2), distance.dtype)
    idx = jnp.arange(n, dtype=distance.dtype)
    # Weighted least-squares line through the query term: its slope is the shared trend.
    i_mean = _weighted_mean(idx, cnt_r)
    b_mean = _weighted_mean(query, cnt_r)
    slope = (((idx - i_mean) * (query - b_mean) * cnt_r).sum(-1, keepdims=True)
             / jnp.maximum(((idx - i_mean) ** 2 * cnt_r).sum(-1, keepdims=True), 1e-30))
    query = query - b_mean - slope * (idx - i_mean)
    distance = distance + slope * idx + b_mean - slope * i_mean
    key = key + slope * idx
    c_mean = _weighted_mean(key, cnt_c)
    key, distance = key - c_mean, distance + c_mean
    return (jnp.where(cnt_d > 0, distance, 0.0), jnp.where(cnt_r > 0, query, 0.0), jnp.where(cnt_c > 0, key, 0.0))


def masked_pearson(x: Array, y: Array, mask: np.ndarray) -> Array:
    """Pearson correlation of x and y [..., n, n] over the entries where `mask` [n, n] is set -> [...]."""
    m = jnp.asarray(mask, jnp.float32)
    count = m.sum()
    # `where` first: the model fills masked logits with float32 min, whose square overflows.
    x, y = jnp.where(mask, x, 0.0), jnp.where(mask, y, 0.0)
    xc = x - (x * m).sum((-1, -2), keepdims=True) / count
    yc = y - (y * m).sum((-1, -2), keepdims=True) / count
    cov = (xc * yc * m).sum((-1, -2))
    return cov / jnp.sqrt((xc * xc * m).sum((-1, -2)) * (yc * yc * m).sum((-1, -2)) + 1e-30)


def _row_centered(x: Array, mask: np.ndarray) -> Array:
    m = jnp.asarray(mask, x.dtype)
    x = jnp.where(mask, x, 0.0)
    return x - (x * m).sum(-1, keepdims=True) / jnp.maximum(m.sum(-1, keepdims=True), 1)


@dataclasses.dataclass(frozen=True)
class AdditiveFit:
    """A least-squares fit of a(i-j) + b(i) + c(j) (absent terms are zero).

    distance, query, key: [..., n]; fitted: [..., n, n]; r, r2: [...] over the fit mask;
    iterations: backfitting sweeps used (the largest over the batch), converged: [...] bool."""

    distance: Array
    query: Array
    key: Array
    fitted: Array
    r: Array
    r2: Array
    iterations: Array
    converged: Array


def fit_additive(logits: Array, mask: np.ndarray, terms: tuple[str, ...] = TERMS, *,
                 max_iter: int = 500, tol: float = 1e-6) -> AdditiveFit:
    """Least-squares fit of logits [..., n, n] on `mask` [n, n] by a sum of the chosen `terms`
    ("distance" a(i-j), "query" b(i), "key" c(j)), by backfitting to a relative change < tol."""
    mask = np.asarray(mask, bool)
    logits = jnp.asarray(logits, jnp.float32)
    _check_square(logits, mask)
    unknown = set(terms) - set(TERMS)
    if unknown or not terms:
        raise ValueError(f"terms must be a non-empty subset of {TERMS}, got {terms}.")
    if not mask.any():
        raise ValueError("The fit mask selects no entries.")
    return _fit_additive(logits, mask, tuple(t in terms for t in TERMS), max_iter, tol)


def _fit_additive(logits: Array, mask: np.ndarray, use: tuple[bool, bool, bool], max_iter: int, tol: float,
                  stats: _Stats | None = None) -> AdditiveFit:
    lead, n = logits.shape[:-2], logits.shape[-1]
    flat = logits.reshape((-1, n, n))
    stats = _stats(flat, mask) if stats is None else stats
    (a, b, c), _, iterations, change = _backfit(stats, mask, use, max_iter, tol)
    # The logits were centred: give the mean back to the first term present.
    if use[0]:
        a = a + stats.mean[:, None]
    elif use[1]:
        b = b + stats.mean[:, None]
    else:
        c = c + stats.mean[:, None]
    if all(use):
        a, b, c = normalize_terms(a, b, c, mask)
    fitted = a[:, _Groups.of(n).distance] + b[:, :, None] + c[:, None, :]
    r = masked_pearson(flat, fitted, mask)
    unflat = lambda x: x.reshape(lead + x.shape[1:])
    return AdditiveFit(distance=unflat(a), query=unflat(b), key=unflat(c), fitted=unflat(fitted),
                       r=unflat(r), r2=unflat(r * r), iterations=iterations, converged=unflat(change <= tol))


@dataclasses.dataclass(frozen=True)
class Decomposition:
    """The three-term decomposition of logits [..., n, n] and the estimators that separate
    positional from content structure. All scalars are [...].

    r: Pearson r of the logits with a(i-j) + b(i) + c(j) (the paper's estimator).
    r_within_query: the same after removing each query's (row's) mean from both: how well
        distance + key explain what softmax sees (b(i) is softmax-invariant).
    distance_share, query_share, key_share: unique R^2 of each term (R^2 of the full model minus
        R^2 without that term), a share of the total variance that does not depend on how the
        shared trend is split.
    r_distance_only: Pearson r of the logits with a(i-j) alone.
    distance, query, key: [..., n] terms (conventions in the module docstring).
    sink_offset: the separate sink column's offset c(0) ("separate" only, else NaN).
    """

    r: Array
    r_within_query: Array
    distance_share: Array
    query_share: Array
    key_share: Array
    r_distance_only: Array
    distance: Array
    query: Array
    key: Array
    sink_offset: Array
    sink: str
    iterations: int


def decompose(logits: Array, *, sink: Sink = "exclude", max_iter: int = 500, tol: float = 1e-6,
              shares: bool = True) -> Decomposition:
    """Fit logit(i, j) ~ a(i-j) + b(i) + c(j) to logits [..., n, n] on the causal triangle.

    `sink`: "exclude" drops the key column j = 0, "include" fits it with the rest, "separate"
    fits the terms without it, then gives the column its own offset, and measures r with it.
    `shares=False` skips the three reduced fits behind the unique variance shares (NaN then).
    """
    _check_sink(sink)
    logits = jnp.asarray(logits, jnp.float32)
    n = logits.shape[-1]
    _check_square(logits, causal_mask(n, sink="include"))
    logits = jnp.where(causal_mask(n, sink="include"), logits, 0.0)  # the model's fill above the diagonal
    if n < 3:
        raise ValueError(f"Need at least 3 positions to separate distance, query and key terms, got {n}.")
    out = _decompose(logits, sink=sink, max_iter=max_iter, tol=tol, shares=shares)
    iterations = int(out.pop("iterations"))
    return Decomposition(**out, sink=sink, iterations=iterations)


@functools.partial(jax.jit, static_argnames=("sink", "max_iter", "tol", "shares"))
def _decompose(logits: Array, *, sink: str, max_iter: int, tol: float, shares: bool) -> dict[str, Array]:
    lead, n = logits.shape[:-2], logits.shape[-1]
    fit_mask = causal_mask(n, sink="include" if sink == "include" else "exclude")
    stats = _stats(logits.reshape((-1, n, n)), fit_mask)
    (a, b, c), r2_full, iterations, _ = _backfit(stats, fit_mask, (True, True, True), max_iter, tol)
    a = a + stats.mean[:, None]
    a, b, c = normalize_terms(a, b, c, fit_mask)
    unflat = lambda x: x.reshape(lead + x.shape[1:])
    sink_offset = jnp.full(lead, jnp.nan)
    if sink != "separate":
        # r and the within-query r from the same statistics: no [n, n] fitted map is needed.
        # The residual sum of squares is tss (1 - R^2); removing row means removes
        # sum_i (row sum_i)^2 / count_i of the (centred) total and nothing of the residual.
        counts = fit_mask.sum(1)
        within = stats.tss - (stats.sum_r ** 2 / np.maximum(counts, 1)).sum(-1)
        rss = stats.tss * (1.0 - r2_full)
        r = unflat(jnp.sqrt(r2_full))
        r_within = unflat(jnp.sqrt(jnp.clip(1.0 - rss / jnp.maximum(within, 1e-30), 0.0, 1.0)))
        a, b, c = unflat(a), unflat(b), unflat(c)
    else:
        a, b, c = unflat(a), unflat(b), unflat(c)
        groups = _Groups.of(n)
        fitted = a[..., groups.distance] + b[..., :, None] + c[..., None, :]
        # The sink column gets its own offset: its mean residual over rows 1..n-2. Row 0 holds only
        # the sink, and distance n-1 occurs only in the sink column, so neither row says anything
        # about the terms fitted without it.
        rows = (np.arange(n) >= 1) & (np.arange(n) <= n - 2)
        resid = logits[..., :, 0] - (a + b)  # the sink entry of row i sits at distance i
        sink_offset = (resid * rows).sum(-1) / rows.sum()
        fitted = fitted.at[..., :, 0].set(a + b + sink_offset[..., None])
        c = c.at[..., 0].set(sink_offset)
        eval_mask = causal_mask(n, sink="include")
        eval_mask[~rows, :] = False
        eval_mask[n - 1, 1:] = True
        r = masked_pearson(logits, fitted, eval_mask)
        r_within = masked_pearson(_row_centered(logits, eval_mask), _row_centered(fitted, eval_mask), eval_mask)
    nan = jnp.full(lead, jnp.nan)
    shares_out = [nan, nan, nan]
    if shares:
        # Unique shares from the same statistics, so both R^2 are computed the same way.
        for t, use in enumerate([(False, True, True), (True, False, True), (True, True, False)]):
            shares_out[t] = unflat(r2_full - _backfit(stats, fit_mask, use, max_iter, tol)[1])
    r_distance_only = unflat(jnp.sqrt(_backfit(stats, fit_mask, (True, False, False), 1, tol)[1]))
    return dict(r=r, r_within_query=r_within, distance_share=shares_out[0], query_share=shares_out[1],
                key_share=shares_out[2], r_distance_only=r_distance_only, distance=a, query=b, key=c,
                sink_offset=sink_offset, iterations=iterations)


def decomposition_terms(dec: Decomposition, n: int) -> tuple[Array, Array, Array]:
    """The three terms as [..., n, n] maps on the causal triangle (NaN above it), for heatmaps:
    (a(i-j), b(i), c(j))."""
    groups = _Groups.of(n)
    upper = ~np.tril(np.ones((n, n), bool))
    shape = dec.distance.shape[:-1] + (n, n)
    maps = (dec.distance[..., groups.distance], jnp.broadcast_to(dec.query[..., :, None], shape),
            jnp.broadcast_to(dec.key[..., None, :], shape))
    return tuple(jnp.where(upper, jnp.nan, x) for x in maps)


@dataclasses.dataclass(frozen=True)
class TwoAxisFit:
    """Additive fit M[d, j] ~ f_d + g_j of a balanced [..., D, J] table (row/column means).

    r: Pearson r of M with f + g; distance_share, key_share: ANOVA shares of the total variance
    (rows, columns; the rest is interaction); key_rank_invariance: mean over d of the Spearman
    correlation between the keys' ranking at distance d (M[d, :]) and g: 1 when the key ranking
    does not depend on the distance. f: [..., D] (carries the grand mean), g: [..., J] (mean zero)."""

    f: Array
    g: Array
    r: Array
    distance_share: Array
    key_share: Array
    key_rank_invariance: Array


def _ranks(x: Array) -> Array:
    return jnp.argsort(jnp.argsort(x, axis=-1), axis=-1).astype(jnp.float32)


def two_axis_fit(m: Array, *, rank_distances: int = 16) -> TwoAxisFit:
    """Fit M [..., D, J] (e.g. from `attention_logits.dummy_distance_logits`) by f_d + g_j.

    The key-ranking invariance is averaged over `rank_distances` evenly spaced rows (ranking every
    row costs a sort per distance; all rows when D is smaller)."""
    m = jnp.asarray(m, jnp.float32)
    if m.ndim < 2 or m.shape[-1] < 2 or m.shape[-2] < 2:
        raise ValueError(f"need a [..., distance, key] table with at least 2 of each, got {tuple(m.shape)}.")
    return TwoAxisFit(**_two_axis_fit(m, rank_distances))


@functools.partial(jax.jit, static_argnums=1)
def _two_axis_fit(m: Array, rank_distances: int) -> dict[str, Array]:
    grand = m.mean((-1, -2), keepdims=True)
    f = m.mean(-1)
    g = m.mean(-2) - grand[..., 0]
    fitted = f[..., :, None] + g[..., None, :]
    centered = m - grand
    total = (centered ** 2).sum((-1, -2)) + 1e-30
    dist_ss = ((f - grand[..., 0]) ** 2).sum(-1) * m.shape[-1]
    key_ss = (g ** 2).sum(-1) * m.shape[-2]
    fc = fitted - grand
    r = (centered * fc).sum((-1, -2)) / jnp.sqrt(total * ((fc ** 2).sum((-1, -2)) + 1e-30))
    rows = np.unique(np.linspace(0, m.shape[-2] - 1, min(rank_distances, m.shape[-2])).round().astype(int))
    rank_m, rank_g = _ranks(m[..., rows, :]), _ranks(g)[..., None, :]
    rm = rank_m - rank_m.mean(-1, keepdims=True)
    rg = rank_g - rank_g.mean(-1, keepdims=True)
    spearman = (rm * rg).sum(-1) / jnp.sqrt((rm ** 2).sum(-1) * (rg ** 2).sum(-1) + 1e-30)
    return dict(f=f, g=g, r=r, distance_share=dist_ss / total, key_share=key_ss / total,
                key_rank_invariance=spearman.mean(-1))


def summarize(values: Array) -> dict[str, float]:
    """mean, median, 10th/90th percentile and count of the finite entries of `values`."""
    v = np.asarray(values, np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"mean": float("nan"), "median": float("nan"), "p10": float("nan"), "p90": float("nan"), "n": 0}
    return {"mean": float(v.mean()), "median": float(np.median(v)), "p10": float(np.percentile(v, 10)),
            "p90": float(np.percentile(v, 90)), "n": int(v.size)}
