"""Exact activation patching: a whole sweep over patch locations as ONE compiled program.

    result = patch_sweep(model, pairs, site="resid_pre", by=("layer", "pos"))
    result.patch_effect        # [layer, pos] metric after patching, mean over pairs
    result.normalised          # [layer, pos] corrupted = 0, clean = 1

Directions: "noising" runs the clean prompts and patches in activations from the source;
"denoising" runs the corrupted prompts and patches in activations from the source. Sources:
  "resample"  the other run's activation at the same place (corrupt when noising, clean when
              denoising): classic activation patching;
  "zero"      zeros;
  "mean"      the other run's activation averaged over pairs and real positions;
  "pos_mean"  the other run's activation averaged over pairs, per position (real tokens only).
(For `pattern`, whose positional dims are query/key pairs, "mean" and "pos_mean" both average
over pairs only.)

How it runs: a patch is a set of indices, one per `by` dim (e.g. layer 3, pos 5). Inside the
program each patch becomes a stack of boolean masks, one per layer (all false except at the
patched layer, selecting the patched position/head), handed to the forward as
`replace(source, mask)` interventions at `blocks.{l}.{hook}` for every layer l, and the forward is
`jax.vmap`-ed over patches. Patches are split into equal chunks (the last one padded with
no-op patches) and `jax.lax.map` runs the chunks, so the number of chunks never changes the
program; the clean and corrupted baselines run in the same program. Chunk size comes from
`max_patches_per_chunk` or from `memory_budget_bytes` and `estimate_patch_bytes`.
With `prefix_reuse` (the default) a patch at layer l starts from the unpatched run's residual
before layer l instead of running layers < l again, and a patch at position p recomputes only
positions >= p, reading earlier keys/values from the unpatched run; the suffixes from p and from
pos - 1 - p share one row (`models/resume.py`), and chunks share a start layer.

Padding: a patch at a position beyond a pair's real length patches nothing for that pair and is
not counted: per-pair values there are NaN and the mean is over the pairs that have the position
(NaN when none does). When `by` has no position dim, only real positions are patched (padding
cannot reach the metric position anyway: it comes after it and attention is causal).

The default direction, denoising with "resample", is what TransformerLens' `patching.get_act_patch_*`
functions compute (they run the corrupted tokens and patch in the clean cache).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxcirc.hook_plan import HookContext, make_plan
from jaxcirc.hooks import Hooks, replace
from jaxcirc.memory import device_budget, device_bytes, plan_chunks
from jaxcirc.metrics import Metric, answer_foil_columns, get_metric, metric_name, normalise
from jaxcirc.models import hook_points
from jaxcirc.models.config import ModelConfig
from jaxcirc.models.resume import (final_logits, packed_pair, pair_slots, partner_position, run_from_layer, suffix,
                                   supports_resume)
from jaxcirc.models.transformer import make_forward
from jaxcirc.pairs import MinimalPairs
from jaxcirc.sharding import DATA, place, to_host

Array = jax.Array
Direction = Literal["noising", "denoising"]
Source = Literal["resample", "zero", "mean", "pos_mean"]

SITES: dict[str, str] = {
    **hook_points.STREAM_SITES,
    "z": "attn.hook_z",
    "head_out": "attn.hook_z",
    "q": "attn.hook_q",
    "k": "attn.hook_k",
    "v": "attn.hook_v",
    "pattern": "attn.hook_pattern",
}
DIRECTIONS = ("noising", "denoising")
SOURCES = ("resample", "zero", "mean", "pos_mean")
DEFAULT_MEMORY_BUDGET = 1 << 30

# Dims that index token positions: masked by the pairs' padding.
_POSITIONAL = ("pos", "q_pos", "k_pos")
# Dims a patch never selects within: the batch and the feature dims.
_NOT_PATCHABLE = ("batch", "d_model", "d_head", "one")


@dataclasses.dataclass(frozen=True)
class PatchResult:
    """An activation patching sweep with named dims.

    patch_effect: [*dims] the metric after patching, mean over the pairs the patch applies to.
    per_pair:     [*dims, pair] the metric per pair (NaN where the patch lies in the pair's padding).
    normalised:   [*dims] (patch_effect - corrupt) / (clean - corrupt), the baselines averaged
                  over the same pairs (NaN where clean == corrupt).
    clean_metric, corrupt_metric: [pair] the unpatched runs' metric.
    """

    patch_effect: np.ndarray
    per_pair: np.ndarray
    normalised: np.ndarray
    clean_metric: np.ndarray
    corrupt_metric: np.ndarray
    dims: tuple[str, ...]
    site: str
    hook: str
    by: tuple[str, ...]
    metric: str
    direction: str
    source: str
    n_patches: int
    chunk_size: int  # patched forwards per chunk (with prefix reuse: rows, up to two patches each)
    n_chunks: int

    @property
    def baseline(self) -> np.ndarray:
        """[pair] metric of the unpatched run that is patched (clean when noising)."""
        return self.clean_metric if self.direction == "noising" else self.corrupt_metric

    @property
    def change(self) -> np.ndarray:
        """[*dims] per-pair (patched - unpatched run) averaged like patch_effect."""
        return _masked_mean(self.per_pair - self.baseline, ~np.isnan(self.per_pair))

    def arrays(self) -> dict[str, tuple[np.ndarray, tuple[str, ...]]]:
        """name -> (array, dims), the form `jaxcirc.rundir.write_run` takes."""
        return {
            "patch_effect": (self.patch_effect, self.dims),
            "patch_effect_normalised": (self.normalised, self.dims),
            "patch_effect_per_pair": (self.per_pair, self.dims + ("pair",)),
            "clean_metric": (self.clean_metric, ("pair",)),
            "corrupt_metric": (self.corrupt_metric, ("pair",)),
        }

    def metadata(self) -> dict[str, Any]:
        return {
            "site": self.site, "hook": self.hook, "by": list(self.by), "dims": list(self.dims),
            "metric": self.metric, "direction": self.direction, "source": self.source,
            "n_patches": self.n_patches, "chunk_size": self.chunk_size, "n_chunks": self.n_chunks,
            "clean_metric_mean": float(np.mean(self.clean_metric)),
            "corrupt_metric_mean": float(np.mean(self.corrupt_metric)),
        }


@dataclasses.dataclass(frozen=True)
class SiteSpec:
    """A resolved patch site: the block hook template, its dims and the dims patched by."""

    template: str
    dims: tuple[str, ...]  # the activation's dims, batch first
    by: tuple[str, ...]    # "layer" and dims of `dims`


def resolve_site(cfg: ModelConfig, site: str, by: str | Sequence[str]) -> SiteSpec:
    """Check `site` and `by` against the model and return the block template and dims.

    `site` is a short name (SITES) or a block hook template (`attn.hook_z`, `mlp.hook_post`);
    `by` lists "layer" and any of the activation's dims (`pos`, `head`, ...). For k/v, "head"
    means the kv head (`kv_head` under grouped-query attention); for `pattern`, "pos" means the
    query position.
    """
    points = hook_points.block_points(cfg)
    template = SITES.get(site, site)
    if template.startswith("blocks."):
        template = hook_points.split_name(template.replace("*", "0"))[1]
    if template not in points:
        if site == "resid_mid" and cfg.parallel_residual:
            raise ValueError("resid_mid does not exist in a parallel-residual model (attention and MLP "
                             "both read resid_pre); patch resid_pre, attn_out or mlp_out instead.")
        raise ValueError(f"Unknown patch site {site!r}; choose one of {sorted(SITES)} or a block hook "
                         f"template such as {list(points)[:4]}.")
    dims = points[template]
    by = tuple(d.strip() for d in by.split(",")) if isinstance(by, str) else tuple(by)
    if "layer" not in by:
        raise ValueError(f"`by` must include 'layer' (got {by}); e.g. by=('layer', 'pos').")
    resolved = []
    for d in by:
        if d == "head" and "head" not in dims and "kv_head" in dims:
            d = "kv_head"
        if d == "pos" and "pos" not in dims and "q_pos" in dims:
            d = "q_pos"
        if d != "layer" and (d not in dims or d in _NOT_PATCHABLE):
            options = ["layer"] + [x for x in dims if x not in _NOT_PATCHABLE]
            raise ValueError(f"Site {site!r} ({template}, dims {list(dims)}) cannot be patched by {d!r}; "
                             f"choose `by` from {options}.")
        resolved.append(d)
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"`by` repeats a dim: {by}.")
    return SiteSpec(template, dims, tuple(resolved))


def dim_sizes(cfg: ModelConfig, spec: SiteSpec, batch: int, pos: int) -> tuple[int, ...]:
    """Size of each `by` dim."""
    sizes = hook_points.dim_sizes(cfg, batch, pos)
    return tuple(cfg.n_layers if d == "layer" else sizes[d] for d in spec.by)


def estimate_patch_bytes(cfg: ModelConfig, batch: int, pos: int) -> int:
    """Rough peak bytes one patched forward holds (one block live, the scan keeps no per-layer
    activations; float32 attention scores and pattern; logits only at the metric position)."""
    per_token = (8 * cfg.d_model + 4 * cfg.n_heads * cfg.d_head + 3 * cfg.d_mlp + 3 * cfg.n_heads * pos)
    return int(4 * batch * (pos * per_token + 3 * cfg.d_vocab))


def chunking(n_patches: int, per_patch_bytes: int, max_patches_per_chunk: int | None = None,
             memory_budget_bytes: int | None = None, fixed_bytes: int = 0) -> tuple[int, int]:
    """(chunk_size, n_chunks): the most patches per chunk that fit, then evened out so the padded
    last chunk wastes as little as possible. The budget defaults to `memory.device_budget()`;
    raises `memory.MemoryBudgetError` (with the bytes needed) when not even one patch fits."""
    budget = device_budget() if memory_budget_bytes is None else memory_budget_bytes
    return plan_chunks(n_patches, per_patch_bytes, budget, fixed_bytes=fixed_bytes,
                       max_per_chunk=max_patches_per_chunk, unit="patch",
                       hint="Pass max_patches_per_chunk=1 (CLI: --chunk 1) to force it, a larger "
                            "memory_budget_bytes (CLI: --budget 8GiB), fewer pairs per call (pairs.batches(n)), or a mesh with "
                            "more devices on its data axis.")


def _along(vector: Array, axis: int, ndim: int) -> Array:
    """Reshape a 1-D array so it lies along `axis` of an ndim-dimensional array."""
    shape = [1] * ndim
    shape[axis] = vector.shape[0]
    return vector.reshape(shape)


def _real_positions(dims: tuple[str, ...], mask: Array) -> Array:
    """bool, broadcastable to the activation: True where every positional dim is a real token."""
    ndim, b_axis = len(dims), dims.index("batch")
    out = jnp.ones((1,) * ndim, bool)
    for axis, d in enumerate(dims):
        if d in _POSITIONAL:
            shape = [1] * ndim
            shape[b_axis], shape[axis] = mask.shape
            out = out & mask.reshape(shape)
    return out


def _source_values(spec: SiteSpec, source: str, acts: Array, mask: Array) -> Array:
    """Patch values [layer, *activation or broadcastable] from the source run's activations
    acts [layer, *activation]; means are taken over real tokens only."""
    if source == "resample":
        return acts
    if source == "zero":
        return jnp.zeros((acts.shape[0],) + (1,) * (acts.ndim - 1), acts.dtype)
    weights = _real_positions(spec.dims, mask)[None].astype(jnp.float32)
    axes = [1 + spec.dims.index("batch")]
    if source == "mean" and "pos" in spec.dims:
        axes.append(1 + spec.dims.index("pos"))
    axes = tuple(axes)
    total = (acts.astype(jnp.float32) * weights).sum(axes, keepdims=True)
    count = jnp.broadcast_to(weights, acts.shape[:1] + weights.shape[1:]).sum(axes, keepdims=True)
    return (total / jnp.maximum(count, 1.0)).astype(acts.dtype)


def _sweep_program(params: Any, pairs: MinimalPairs, indices: Array, *, cfg: ModelConfig,
                   spec: SiteSpec, metric: Metric, direction: str, source: str):
    """The whole sweep. indices: int32 [n_chunks, chunk, len(by)] (-1 = patch nothing in that dim).

    Returns (clean_metric [pair], corrupt_metric [pair], patched [n_chunks, chunk, pair]).
    """
    forward = make_forward(cfg, jit=False)
    layers = cfg.n_layers
    batch, pos = pairs.clean.shape
    names = [f"blocks.{l}.{spec.template}" for l in range(layers)]
    need_source = source != "zero"
    # Clean and corrupted baselines in one forward over the stacked batch: one copy of the model
    # in the program instead of two (XLA compile time grows with every copy).
    both = jnp.concatenate([pairs.clean, pairs.corrupt])
    twice = jnp.concatenate([pairs.position, pairs.position])
    cache_hooks = Hooks(cache=(f"blocks.*.{spec.template}",)) if need_source else None
    both_logits, both_cache = forward(params, both, cache_hooks, logits_at=twice)
    clean_logits, corrupt_logits = both_logits[:batch], both_logits[batch:]
    clean_metric = metric(clean_logits, pairs, clean_logits)
    corrupt_metric = metric(corrupt_logits, pairs, clean_logits)
    from_run = slice(batch, None) if direction == "noising" else slice(0, batch)
    cache = {n: both_cache[n][from_run] for n in names} if need_source else {}

    base_tokens = pairs.clean if direction == "noising" else pairs.corrupt
    act_shape = tuple(hook_points.dim_sizes(cfg, batch, pos)[d] for d in spec.dims)
    if need_source:
        acts = jnp.stack([cache[n] for n in names])
    else:
        acts = jnp.zeros((layers,) + act_shape, jnp.dtype(cfg.dtype))  # only its shape/dtype is used
    values = _source_values(spec, source, acts, pairs.mask)
    ndim = len(spec.dims)
    real = _real_positions(spec.dims, pairs.mask)

    def patched_metric(idx: Array) -> Array:
        select = real
        for j, d in enumerate(spec.by):
            if d != "layer":
                axis = spec.dims.index(d)
                select = select & _along(jnp.arange(act_shape[axis]) == idx[j], axis, ndim)
        at_layer = jnp.arange(layers) == idx[spec.by.index("layer")]
        masks = _along(at_layer, 0, ndim + 1) & select[None]
        hooks = Hooks({names[l]: replace(values[l], masks[l]) for l in range(layers)})
        logits, _ = forward(params, base_tokens, hooks, logits_at=pairs.position)
        return metric(logits, pairs, clean_logits)

    patched = jax.lax.map(jax.vmap(patched_metric), indices)
    return clean_metric, corrupt_metric, patched


_compiled_sweep = jax.jit(_sweep_program, static_argnames=("cfg", "spec", "metric", "direction", "source"))


# ---------------------------------------------------------------------------- prefix reuse
# A patch at layer l, position p changes nothing before layer l, nor (causal attention) at
# positions < p. The resumed program starts each patch from the unpatched run's residual before
# layer l and, when the sweep is by position, recomputes only positions >= p, reading the
# keys/values of earlier positions from the unpatched run. The suffixes from p and a partner
# position together fill one row (`models.resume.packed_pair`, `pair_slots`), so every row has the
# same length and no slot is wasted. A chunk of rows shares its start layer (a traced
# scalar: one program serves every layer). When every pair's clean and corrupted prompts share
# their first s tokens (`MinimalPairs.shared_prefix`), the two runs' activations are equal there,
# so a resampled patch changes nothing at positions < s: rows hold only positions >= s and
# patches that select only positions < s are not run (their metric is the unpatched run's).
# Exact: the tests compare it with the full forwards.


# On CPU a chunk of more than a few thousand tokens per layer spills out of the caches: measured on
# 2 cores (GPT-2-small shape, batch 8 x 64 tokens), 4 rows of 8 x 65 tokens ran 1.2x faster than
# the 11 the memory budget allowed, and 4 rows of 32 x 17 1.2x faster than 5 at batch 32 x 16.
# Accelerators keep the budget's (larger) chunks.
CPU_CHUNK_TOKENS = 2560


def after_heads(cfg: ModelConfig, spec: SiteSpec) -> bool:
    """Whether the site comes at or after attn.hook_z in its block: a patch there leaves the start
    block's heads as they were, so the resumed run takes their outputs from the unpatched run."""
    order = list(hook_points.block_points(cfg))
    return order.index(spec.template) >= order.index("attn.hook_z")


def packs_positions(spec: SiteSpec) -> bool:
    """Whether the resumed sweep packs position suffixes (the patches select one position each)."""
    return "pos" in spec.by and "pos" in spec.dims


def resume_schedule(table: np.ndarray, spec: SiteSpec, n_layers: int, pos: int, limit: int, shared: int = 0
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Arrange patches (rows of `table` [n, len(by)]) in rows of the resumed program, grouped in
    chunks of at most `limit` rows that share a start layer.

    With position packing a row holds the patch at position p (first segment) and one at its
    partner (`partner_position`, second segment), either missing when the table has none; otherwise a
    row is one patch. Patches at a position < `shared` (where both runs agree) are left out.
    Returns (starts [n_chunks] start layer, firsts [n_chunks, rows] each row's p,
    indices [n_chunks, rows, segments, len(by)], slots [n_chunks, rows, segments] the table row
    of each segment, -1 for none). Empty segments select nothing (layer -1); a patch that
    selects no layer runs from the last layer with nothing patched: the unpatched run.
    """
    layer_j = spec.by.index("layer")
    start = np.where(table[:, layer_j] >= 0, table[:, layer_j], n_layers - 1)
    rows: dict[int, list[tuple[int, list[int]]]] = {s: [] for s in range(n_layers)}
    if packs_positions(spec):
        requested = table[:, spec.by.index("pos")]
        at = np.where(requested >= 0, requested, shared)  # -1 selects no position: any row will do
        first = np.minimum(at, partner_position(pos, at, shared))   # never equal: pair_slots is odd
        for s in range(n_layers):
            for p in np.unique(first[(start == s) & (at >= shared)]):
                here = (start == s) & (first == p)
                lists = [np.flatnonzero(here & (at == p)), np.flatnonzero(here & (at != p))]
                for k in range(max(len(lists[0]), len(lists[1]))):
                    rows[s].append((int(p), [int(x[k]) if k < len(x) else -1 for x in lists]))
    else:
        for i, s in enumerate(start):
            rows[int(s)].append((shared, [i]))
    segments = 2 if packs_positions(spec) else 1
    if not any(rows.values()):  # every patch lies in the shared prefix: one no-op row still runs the baselines
        rows[n_layers - 1].append((shared, [-1] * segments))
    most = max(len(r) for r in rows.values())
    chunk = -(-most // -(-most // limit))  # evened out: 8 rows at a limit of 5 run as 4 + 4, not 5 + 3 (+2 padding)
    starts, firsts, indices, slots = [], [], [], []
    for s, members in rows.items():
        for i in range(0, len(members), chunk):
            part = members[i:i + chunk]
            part += [(shared, [-1] * segments)] * (chunk - len(part))
            starts.append(s)
            firsts.append([p for p, _ in part])
            slot = np.asarray([members for _, members in part], np.int64)
            slots.append(slot)
            indices.append(np.where(slot[..., None] >= 0, table[np.maximum(slot, 0)], -1))
    return (np.asarray(starts, np.int32), np.asarray(firsts, np.int32), np.stack(indices).astype(np.int32),
            np.stack(slots))


def _resumed_sweep_program(params: Any, pairs: MinimalPairs, starts: Array, firsts: Array, indices: Array, *,
                           cfg: ModelConfig, spec: SiteSpec, metric: Metric, direction: str, source: str,
                           shared: int):
    """The sweep with prefix reuse: starts int32 [n_chunks] (each chunk's start layer), firsts
    int32 [n_chunks, rows], indices int32 [n_chunks, rows, segments, len(by)] (see resume_schedule);
    rows hold positions >= shared only (0 unless the patches resample and the pairs share a prefix).

    Returns (clean_metric [pair], corrupt_metric [pair], patched [n_chunks, rows, segments, pair]).
    """
    forward = make_forward(cfg, jit=False)
    layers = cfg.n_layers
    batch, pos = pairs.clean.shape
    packed = packs_positions(spec)
    need_source = source != "zero"
    k_template = "attn.hook_rot_k" if cfg.positional == "rotary" else "attn.hook_k"
    templates = ["hook_resid_pre"] + ([spec.template] if need_source else [])
    with_prefix = packed or shared > 0
    if with_prefix:
        templates += [k_template, "attn.hook_v"]
    from_z = after_heads(cfg, spec)
    if from_z:
        templates.append("attn.hook_z")
    both = jnp.concatenate([pairs.clean, pairs.corrupt])
    twice = jnp.concatenate([pairs.position, pairs.position])
    hooks = Hooks(cache=tuple(f"blocks.*.{t}" for t in dict.fromkeys(templates)))
    both_logits, both_cache = forward(params, both, hooks, logits_at=twice)
    clean_logits, corrupt_logits = both_logits[:batch], both_logits[batch:]
    clean_metric = metric(clean_logits, pairs, clean_logits)
    corrupt_metric = metric(corrupt_logits, pairs, clean_logits)
    noising = direction == "noising"
    from_run, base_run = (slice(batch, None), slice(0, batch)) if noising else (slice(0, batch), slice(batch, None))
    columns, metric_pairs = answer_foil_columns(metric, pairs)
    if columns is not None:  # patched runs unembed only the columns the metric reads
        clean_logits, corrupt_logits = (jnp.take_along_axis(x, columns, axis=1) for x in (clean_logits, corrupt_logits))
    base_logits = clean_logits if noising else corrupt_logits

    def stacked(template: str, part: slice) -> Array:
        return jnp.stack([both_cache[f"blocks.{l}.{template}"][part] for l in range(layers)])

    act_shape = tuple(hook_points.dim_sizes(cfg, batch, pos)[d] for d in spec.dims)
    acts = (stacked(spec.template, from_run) if need_source
            else jnp.zeros((layers,) + act_shape, jnp.dtype(cfg.dtype)))  # only its shape/dtype is used
    values = _source_values(spec, source, acts, pairs.mask)
    base_resid = stacked("hook_resid_pre", base_run)  # [layer, batch, pos, d_model]
    # Unpacked rows start at `shared` and read no key after it.
    n_prefix = pos if packed else shared
    prefix_kv = (tuple(stacked(t, base_run)[:, :, :n_prefix] for t in (k_template, "attn.hook_v"))
                 if with_prefix else None)
    base_z = stacked("attn.hook_z", base_run) if from_z else None  # [layer, batch, pos, head, d_head]
    ndim = len(spec.dims)
    real = _real_positions(spec.dims, pairs.mask)
    pos_axis = spec.dims.index("pos") if "pos" in spec.dims else None
    layer_j = spec.by.index("layer")
    at = pairs.position
    n = pair_slots(pos, shared) if packed else pos - shared

    def to_slots(a: Array, positions: Array) -> Array:
        if pos_axis is None or a.shape[pos_axis] == 1:
            return a
        return jnp.take(a, positions, axis=pos_axis)

    def run_chunk(xs):
        start, chunk_firsts, chunk = xs
        resid_all = jax.lax.dynamic_index_in_dim(base_resid, start, 0, keepdims=False)
        value_all = jax.lax.dynamic_index_in_dim(values, start, 0, keepdims=False)
        z_all = None if base_z is None else jax.lax.dynamic_index_in_dim(base_z, start, 0, keepdims=False)

        def patched_metrics(first: Array, idx: Array) -> Array:
            packing = packed_pair(pos, first, shared) if packed else suffix(pos, shared)
            slots = packing.positions
            select = jnp.zeros((1,) * ndim, bool)
            for seg in range(idx.shape[0]):
                hit = to_slots(real, slots) & (idx[seg, layer_j] >= 0)
                for j, d in enumerate(spec.by):
                    if d == "pos":
                        hit = hit & _along((slots == idx[seg, j]) & (packing.segment == seg), pos_axis, ndim)
                    elif d != "layer":
                        axis = spec.dims.index(d)
                        hit = hit & _along(jnp.arange(act_shape[axis]) == idx[seg, j], axis, ndim)
                select = select | hit
            iv = replace(to_slots(value_all, slots), select)
            plan = make_plan(cfg, Hooks({f"blocks.0.{spec.template}": iv}), batch, n)
            hook = HookContext(plan, start, {}, {spec.template: iv})
            # Each segment reads the metric at its slot of the metric position (packed_pair's layout).
            partner = partner_position(pos, first, shared)
            seg_first, seg_slot = (([first, partner], [at - first, at - pos + n]) if packed
                                   else ([shared], [at - shared]))
            query_at = jnp.clip(jnp.stack(seg_slot, axis=1), 0, n - 1)
            x = run_from_layer(cfg, params, resid_all[:, slots], start, hook, packing=packing, prefix_kv=prefix_kv,
                               query_at=query_at, start_z=None if z_all is None else z_all[:, slots])
            out = []
            for seg, seg_start in enumerate(seg_first):
                logits = final_logits(cfg, params, x[:, seg], columns)
                # A metric position before the segment's suffix is not affected by its patch.
                logits = jnp.where((at >= seg_start)[:, None], logits, base_logits)
                out.append(metric(logits, metric_pairs, clean_logits))
            return jnp.stack(out)

        return jax.vmap(patched_metrics)(chunk_firsts, chunk)

    return clean_metric, corrupt_metric, jax.lax.map(run_chunk, (starts, firsts, indices))


_compiled_resumed_sweep = jax.jit(_resumed_sweep_program,
                                  static_argnames=("cfg", "spec", "metric", "direction", "source", "shared"))


def dim_sizes_all(cfg: ModelConfig, spec: SiteSpec, pos: int) -> tuple[int, ...]:
    """Sizes of the site's activation dims other than batch (for memory estimates)."""
    sizes = hook_points.dim_sizes(cfg, 1, pos)
    return tuple(sizes[d] for d in spec.dims if d != "batch")


def sweep_memory(cfg: ModelConfig, params: Any, spec: SiteSpec, batch: int, pos: int,
                 mesh: Any = None, resumed: bool = False) -> tuple[int, int]:
    """(fixed, per patch) bytes one device holds in a sweep: the pairs are split over the mesh's
    `data` axis; fixed = its share of the weights + the two baseline forwards + the cached site
    activations of every layer (clean and corrupted), plus, with prefix reuse (`resumed`), the
    cached residuals, keys and values of every layer; per patch = one patched forward (with
    prefix reuse by position: one row of pos + 1 packed slots, which holds two patches)."""
    local = -(-batch // (dict(mesh.shape).get(DATA, 1) if mesh is not None else 1))
    itemsize = jnp.dtype(cfg.dtype).itemsize
    site = cfg.n_layers * local * math.prod(dim_sizes_all(cfg, spec, pos)) * itemsize
    fixed = device_bytes(params) + 2 * estimate_patch_bytes(cfg, local, pos) + 2 * site
    if resumed:
        fixed += 2 * cfg.n_layers * local * pos * (cfg.d_model + 2 * cfg.n_kv_heads * cfg.d_head) * itemsize
    return int(fixed), estimate_patch_bytes(cfg, local, pos + 1 if resumed and packs_positions(spec) else pos)


def _masked_mean(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Mean over the last axis of the valid entries (NaN where none is valid)."""
    count = valid.sum(-1)
    total = np.where(valid, values, 0.0).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _model_parts(model: Any, params: Any) -> tuple[ModelConfig, Any]:
    cfg = getattr(model, "config", model)
    if not isinstance(cfg, ModelConfig):
        raise TypeError("`model` must be a jaxcirc Model (or a ModelConfig with params=...).")
    params = getattr(model, "params", None) if params is None else params
    if params is None:
        raise ValueError("No parameters: pass a Model, or params=... with a ModelConfig.")
    return cfg, params


def patch_sweep(model: Any, pairs: MinimalPairs, site: str, by: str | Sequence[str] = ("layer", "pos"), *,
                metric: str | Metric = "logit_diff", direction: Direction = "denoising",
                source: Source = "resample", indices: Any = None, max_patches_per_chunk: int | None = None,
                memory_budget_bytes: int | None = None, params: Any = None, mesh: Any = None,
                prefix_reuse: bool = True) -> PatchResult:
    """Exact activation patching of `site` at every combination of the `by` dims, as one program.

    model: a `jaxcirc.Model` (or a `ModelConfig` together with `params=`).
    site: resid_pre | resid_mid | resid_post | attn_out | mlp_out (by layer, pos), z / head_out
      (by layer, head[, pos]), q | k | v | pattern (by layer, head), or a block hook template.
    metric: a name in `jaxcirc.metrics.METRICS` or a function (logits [batch, vocab], pairs,
      clean_logits) -> [batch]; pass the same function object to reuse the compiled program.
    indices: optional int [n, len(by)] list of patches to run instead of the full grid (-1 in a
      dim selects nothing there, so [-1, ...] patches nothing); the result's dims are then ("patch",).
    max_patches_per_chunk / memory_budget_bytes: how many patched forwards run at once (vmapped);
      the first wins; by default the budget is 1 GiB over `estimate_patch_bytes`. All pairs run
      in every patched forward, so for very many pairs call this per `pairs.batches(n)`.
      The budget is per device; a sweep that cannot fit one patch raises MemoryBudgetError.
    mesh: a `jaxcirc.sharding.make_mesh` mesh: pairs over `data` (their number must divide it),
      large weights over `model`; the results equal the unsharded ones. Multi-host: every host
      calls this with the same arguments and gets the whole result.
    prefix_reuse: start each patch from the unpatched run's residual at its layer and, when `by`
      has "pos", recompute only the positions from the patched one on (two such suffixes per
      row); the last layer runs only where the metric reads, and `logit_diff` unembeds only the
      answer and foil. With source="resample", positions every pair's prompts share
      (`pairs.shared_prefix()`) are not recomputed and patches only there are not run (one
      compiled program per shared-prefix length); patches at z or later reuse the start block's
      unpatched head outputs. Same results, fewer FLOPs. Falls back to full forwards where
      `models.resume.supports_resume(cfg)` is False. False: one full forward per patch.
    Returns a PatchResult with `patch_effect` [*by] (see the module docstring for padding).
    """
    cfg, params = _model_parts(model, params)
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}.")
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}.")
    if not isinstance(pairs, MinimalPairs):
        raise TypeError("`pairs` must be MinimalPairs (see jaxcirc.pairs.from_tokens / from_texts).")
    spec = resolve_site(cfg, site, by)
    metric_fn = get_metric(metric)
    batch, pos = pairs.clean.shape
    sizes = dim_sizes(cfg, spec, batch, pos)
    if indices is None:
        table = np.indices(sizes).reshape(len(sizes), -1).T.astype(np.int32)
        out_dims = spec.by
        out_shape = sizes
    else:
        table = np.asarray(indices, dtype=np.int32).reshape(-1, len(spec.by))
        bad = (table >= np.array(sizes)) | (table < -1)
        if bad.any():
            row = int(np.argwhere(bad)[0][0])
            raise ValueError(f"Patch {table[row].tolist()} is out of range for {dict(zip(spec.by, sizes))} "
                             "(-1 selects nothing in a dim).")
        out_dims, out_shape = ("patch",), (len(table),)
    n_patches = len(table)
    if n_patches == 0:
        raise ValueError("No patches to run.")
    # Both runs' activations agree on the shared prefix only for sites indexed by token position
    # (not pattern's query/key grid) and only when the patch writes the other run's values.
    shared = min(pairs.shared_prefix(), pos - 1) if source == "resample" and "pos" in spec.dims else 0
    params, pairs = place(params, pairs, mesh, cfg)
    fixed, per_patch_bytes = sweep_memory(cfg, params, spec, batch, pos, mesh,
                                          resumed=prefix_reuse and supports_resume(cfg))
    chunk, n_chunks = chunking(n_patches, per_patch_bytes, max_patches_per_chunk, memory_budget_bytes,
                               fixed_bytes=fixed)
    if prefix_reuse and supports_resume(cfg):
        if max_patches_per_chunk is None and jax.default_backend() == "cpu":
            tokens_per_row = -(-batch // (dict(mesh.shape).get(DATA, 1) if mesh is not None else 1)) * (
                pair_slots(pos, shared) if packs_positions(spec) else pos - shared)
            chunk = min(chunk, max(1, CPU_CHUNK_TOKENS // tokens_per_row))
        starts, firsts, groups, slots = resume_schedule(table, spec, cfg.n_layers, pos, chunk, shared)
        chunk, n_chunks = groups.shape[1], len(starts)
        clean_m, corrupt_m, patched = _compiled_resumed_sweep(
            params, pairs, starts, firsts, groups, cfg=cfg, spec=spec, metric=metric_fn, direction=direction,
            source=source, shared=shared)
        clean_m, corrupt_m, patched, mask = to_host((clean_m, corrupt_m, patched, pairs.mask))
        patched = np.asarray(patched, np.float64).reshape(-1, batch)
        slots = slots.reshape(-1)
        # Patches the schedule left out patch only the shared prefix: the unpatched run's metric.
        per_patch = np.tile(np.asarray(corrupt_m if direction == "denoising" else clean_m, np.float64),
                            (n_patches, 1))
        per_patch[slots[slots >= 0]] = patched[slots >= 0]
    else:
        padded = np.full((n_chunks * chunk, len(spec.by)), -1, np.int32)  # padding patches select nothing
        padded[:n_patches] = table
        clean_m, corrupt_m, patched = _compiled_sweep(
            params, pairs, padded.reshape(n_chunks, chunk, len(spec.by)),
            cfg=cfg, spec=spec, metric=metric_fn, direction=direction, source=source)
        clean_m, corrupt_m, patched, mask = to_host((clean_m, corrupt_m, patched, pairs.mask))
        per_patch = np.asarray(patched, np.float64).reshape(n_chunks * chunk, batch)[:n_patches]
    clean_m, corrupt_m = np.asarray(clean_m, np.float64), np.asarray(corrupt_m, np.float64)
    valid = np.ones((n_patches, batch), bool)
    for j, d in enumerate(spec.by):
        if d in _POSITIONAL:
            at = table[:, j]
            valid &= np.where(at[:, None] >= 0, mask[:, np.clip(at, 0, None)].T, True)
    per_patch = np.where(valid, per_patch, np.nan)
    effect = _masked_mean(per_patch, valid)
    clean_cell = _masked_mean(np.broadcast_to(clean_m, per_patch.shape), valid)
    corrupt_cell = _masked_mean(np.broadcast_to(corrupt_m, per_patch.shape), valid)
    normalised = np.asarray(normalise(effect, clean_cell, corrupt_cell), np.float64)
    return PatchResult(
        patch_effect=effect.reshape(out_shape),
        per_pair=per_patch.reshape(out_shape + (batch,)),
        normalised=normalised.reshape(out_shape),
        clean_metric=clean_m, corrupt_metric=corrupt_m,
        dims=tuple(out_dims), site=site, hook=spec.template, by=spec.by, metric=metric_name(metric),
        direction=direction, source=source, n_patches=n_patches, chunk_size=chunk, n_chunks=n_chunks,
    )


@contextlib.contextmanager
def compile_log() -> Iterator[list[str]]:
    """Record the names of the XLA programs compiled inside the `with` block.

        with compile_log() as compiled:
            patch_sweep(...)
        assert compiled == ["jit(_resumed_sweep_program)"]
    """
    compiled: list[str] = []

    def listener(event: str, duration: float, **kwargs: Any) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(str(kwargs.get("fun_name", "?")))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield compiled
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
