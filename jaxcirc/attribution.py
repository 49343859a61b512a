"""Attribution patching (AtP) and AtP* as one compiled program per batch of minimal pairs.

AtP (Nanda 2022; Kramár et al. 2024) estimates the effect of patching one activation n from the
corrupted run into the clean run by a first-order Taylor expansion around the clean run:

    AtP(n) = (n_corrupt - n_clean) . dM/dn |_clean          (summed over n's elements)

so a score estimates `M(clean run with n patched from corrupt) - M(clean run)`, averaged over
pairs (the sign convention of experiments.md A.5: negative = patching n hurts a logit-difference).
With metric "kl" the gradient at the clean run is zero (the clean run is KL's minimum), so AtP
and EAP scores vanish; use EAP-IG or another metric there.
The gradient comes from zero `add` deltas at the hook points: one clean forward + one backward
gives the gradient for every site at once, and one corrupted forward caches the patch values.

Sites (`SITES`; all layers at once):
  resid_pre, resid_mid, resid_post   [layer, pos]               blocks.{l}.hook_resid_*
  attn_out, mlp_out                  [layer] or [layer, pos]    blocks.{l}.hook_attn_out / hook_mlp_out
  head                               [layer, head] or [layer, head, pos]   attn.hook_z
  neuron                             [layer, neuron] or [layer, pos, neuron]  mlp.hook_post

AtP* options (Kramár et al. 2024, "AtP*: An efficient and scalable method for localizing LLM
behaviour to components"):
  * `qk_fix`: a head's effect is split into query, key and value patches. For queries and keys
    the attention softmax is recomputed exactly with the corrupted query/key (instead of
    linearising through the saturating softmax); only the map from the pattern change to the
    metric stays linear: effect = sum (A_patched - A_clean) * dM/dA. Values enter linearly
    (z = A v), so their AtP is exact up to the same downstream linearisation.
    Head-level scores patch all positions of the head's queries (keys) at once; per-position
    scores patch one query position s (one key position t) of the head, so with `per_position`
    `pos` is the position of the patched activation (query position for head_q and head_atp,
    key/value position for head_k and head_v). Under grouped-query
    attention the key/value of kv head j is patched only inside query head h's computation, so
    the decomposition stays per query head. `head` = head_q + head_k + head_v (q/k/v
    interaction terms are dropped, as in the paper's per-q/k/v nodes); the three parts are
    returned as `head_q`, `head_k`, `head_v`, and plain AtP of the head output as `head_atp`.
  * `grad_drop`: for each layer l, the backward pass is rerun with the gradient through layer
    l's contribution to the residual stream (its attention and MLP outputs) set to zero — the
    forward values are unchanged, the layer is just held constant in the backward pass — giving
    AtP_GD_l(n). The score is  GD(n) = 1/(L-1) * sum_l |AtP_GD_l(n)|  (the term for n's own layer
    is 0 for heads, neurons and the layer outputs, hence L-1). The |.| is applied to the mean over
    the pairs of one call (the paper's estimate of the expected effect), or per pair with
    `per_pair=True`. Scores are then magnitudes (>= 0). For residual-stream sites no term
    vanishes; the same 1/(L-1) normalisation is used. The L extra backward passes run inside the
    same program (`lax.map` over the dropped layer).

    attr = atp(model.config, model.params, pairs, sites=("head", "mlp_out"), metric="logit_diff")
    attr["head"]              # [layer, head]
    attr.arrays()             # {name: (array, dims)} for jaxcirc.rundir.write_run
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcirc.hooks import Hooks, Intervention, add
from jaxcirc.memory import batch_for_budget, device_bytes, grad_sequence_bytes
from jaxcirc.metrics import Metric, answer_foil_columns, get_metric, metric_name
from jaxcirc.models import hook_points
from jaxcirc.models.common import alibi_bias, causal_mask
from jaxcirc.models.config import ModelConfig
from jaxcirc.models.transformer import Run, make_joint_forward
from jaxcirc.pairs import MinimalPairs
from jaxcirc.sharding import shard_along_batch, shard_params, to_host

Array = jax.Array

SITES: dict[str, str] = {**hook_points.STREAM_SITES, "head": "attn.hook_z", "neuron": "mlp.hook_post"}
_RESID = ("resid_pre", "resid_mid", "resid_post")
_LAYER_OUTPUTS = ("hook_attn_out", "hook_mlp_out")  # a layer's contribution to the residual stream

SIGN_CONVENTION = ("score ~ metric(clean run with the component patched from the corrupted run) "
                   "- metric(clean run), mean over pairs")


@dataclasses.dataclass(frozen=True)
class Attribution:
    """Attribution scores by site with named dims, plus metadata (method, metric, pairs, options)."""

    scores: Mapping[str, Array]
    dims: Mapping[str, tuple[str, ...]]
    metadata: Mapping[str, Any]

    def __getitem__(self, site: str) -> Array:
        return self.scores[site]

    def arrays(self, prefix: str = "attribution") -> dict[str, tuple[np.ndarray, tuple[str, ...]]]:
        """`{prefix_site: (array, dims)}`, the form `jaxcirc.rundir.write_run` takes."""
        return {f"{prefix}_{site}": (np.asarray(v), tuple(self.dims[site])) for site, v in self.scores.items()}


# ----------------------------------------------------------------------------------------------
# Shared helpers (also used by jaxcirc.eap)


def resolve_metric(metric: str | Metric) -> Metric:
    return get_metric(metric)


def pair_chunks(pairs: MinimalPairs, batch_size: int | None,
                hooks: dict[str, Intervention] | None = None
                ) -> Iterator[tuple[MinimalPairs, Array, int, dict[str, Intervention]]]:
    """Chunks of `batch_size` pairs (the last padded by repeating its final pair) with a float
    weight [batch_size] (1 real, 0 padding), the number of real pairs, and the user interventions
    cut to the chunk (hook arrays are batch-first: a leading dim equal to the number of pairs is
    per pair and is chunked, a leading 1 broadcasts). One chunk shape = one compilation."""
    n = int(pairs.clean.shape[0])
    if n == 0:
        raise ValueError("No pairs given.")
    size = n if batch_size is None else int(batch_size)
    if size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    size = min(size, n)
    hooks = hooks or {}
    for start in range(0, n, size):
        real = min(size, n - start)
        idx = np.minimum(np.arange(start, start + size), n - 1)
        chunk = jax.tree.map(lambda a: jnp.asarray(a)[idx], pairs)
        weight = jnp.asarray((np.arange(size) < real).astype(np.float32))
        per_pair = lambda a: jnp.asarray(a)[idx] if (np.ndim(a) and np.shape(a)[0] == n and size < n) else a
        yield chunk, weight, real, jax.tree.map(per_pair, hooks)


def budget_batch_size(cfg: ModelConfig, params: Any, pairs: MinimalPairs, memory_budget_bytes: int,
                      mesh: Any = None, copies: int = 1) -> int:
    """Pairs per chunk for a gradient pass (AtP, EAP; `copies` sequences per pair, e.g. EAP-IG's
    step_chunk) within `memory_budget_bytes` per device, the chunk split over the mesh's `data`
    axis; MemoryBudgetError (with the bytes needed) when one pair does not fit."""
    data = 1 if mesh is None else int(dict(mesh.shape).get("data", 1))
    per_pair = copies * 2 * grad_sequence_bytes(cfg, int(pairs.clean.shape[1]))  # clean + corrupted
    return batch_for_budget(int(pairs.clean.shape[0]), per_pair, memory_budget_bytes,
                            fixed_bytes=device_bytes(params), data=data,
                            hint="Pass a larger memory budget, a shorter sequence, or a mesh with more "
                                 "devices on data or model.")


def base_interventions(hooks: Hooks | Mapping[str, Intervention] | None) -> dict[str, Intervention]:
    """User interventions applied to every forward of an attribution (e.g. a frozen LayerNorm scale)."""
    if hooks is None:
        return {}
    if isinstance(hooks, Hooks):
        if hooks.cache or getattr(hooks, "edges", None) is not None:
            raise ValueError("Attribution `hooks` may only hold interventions (no cache names or edge patches); "
                             "the attribution decides what to cache.")
        return dict(hooks.interventions)
    return dict(hooks)


def with_add(interventions: dict[str, Intervention], name: str, delta: Array) -> None:
    """Add the differentiated zero `delta` at `name`, on top of any user intervention there."""
    prev = interventions.get(name)
    if prev is None:
        interventions[name] = add(delta)
    else:
        interventions[name] = Intervention(prev.replace, prev.mask,
                                           delta if prev.add is None else prev.add + delta)


def zeros_for(cfg: ModelConfig, template: str, batch: int, pos: int, dtype) -> Array:
    """Zero deltas [layer, *activation shape] for a block hook template."""
    sizes = hook_points.dim_sizes(cfg, batch, pos)
    shape = tuple(sizes[d] for d in hook_points.block_points(cfg)[template])
    return jnp.zeros((cfg.n_layers,) + shape, dtype)


def check_pairs(cfg: ModelConfig, pairs: MinimalPairs) -> None:
    for field in ("clean", "corrupt", "answer", "foil", "position", "mask"):
        if not hasattr(pairs, field):
            raise TypeError(f"pairs must be a jaxcirc.pairs.MinimalPairs (missing `{field}`); build it with "
                            "jaxcirc.pairs.from_tokens or from_jsonl.")
    if pairs.clean.shape != pairs.corrupt.shape:
        raise ValueError(f"clean {pairs.clean.shape} and corrupt {pairs.corrupt.shape} tokens differ in shape.")
    if pairs.clean.shape[1] > cfg.n_ctx:
        raise ValueError(f"Pairs have {pairs.clean.shape[1]} positions but the model's context is {cfg.n_ctx}.")


# ----------------------------------------------------------------------------------------------
# QK-fix


def _rotated_names(cfg: ModelConfig) -> tuple[str, str]:
    """The query/key hook templates the attention scores are computed from."""
    return ("attn.hook_rot_q", "attn.hook_rot_k") if cfg.positional == "rotary" else ("attn.hook_q", "attn.hook_k")


def _scores(cfg: ModelConfig, q: Array, k: Array) -> Array:
    """Attention scores as the model computes them (scale, soft cap, ALiBi at positions 0..pos-1,
    each layer's mask): q [layer,b,s,H,dh], k [layer,b,t,H,dh] -> [layer,b,H,s,t], -inf where masked."""
    if cfg.attention_window is not None and cfg.attention_window.max_distance is not None:
        raise ValueError("AtP*'s QK-fix does not model attention_window.max_distance (capped rotary distances).")
    s = jnp.einsum("...shd,...thd->...hst", q.astype(jnp.float32), k.astype(jnp.float32))
    s = s / np.sqrt(cfg.d_head) if cfg.query_scale is None else s * np.float32(cfg.query_scale)
    if cfg.attn_softcap is not None:
        s = cfg.attn_softcap * jnp.tanh(s / cfg.attn_softcap)
    pos = q.shape[-3]
    if cfg.positional == "alibi":
        s = s + alibi_bias(cfg.n_heads, jnp.arange(pos)[None])[0]
    windows = cfg.layer_windows or (0,) * q.shape[0]
    allowed = jnp.stack([causal_mask(cfg, pos, jnp.int32(w)) for w in windows])  # [layer, s, t]
    return jnp.where(allowed[:, None, None], s, -jnp.inf)


def qk_fix_effects(cfg: ModelConfig, q: Array, k: Array, v: Array, q_x: Array, k_x: Array, v_x: Array,
                   grad_pattern: Array, grad_z: Array, mask: Array, per_position: bool
                   ) -> tuple[Array, Array, Array]:
    """Query, key and value patch effects per query head (AtP* QK-fix), per example.

    q, q_x: clean / corrupted (rotated) queries [layer, batch, pos, head, d_head];
    k, v, k_x, v_x: keys/values [layer, batch, pos, kv_head, d_head];
    grad_pattern: dM/dA [layer, batch, head, q_pos, k_pos]; grad_z: dM/dz [layer, batch, pos, head, d_head];
    mask: [batch, pos] real tokens. Returns three arrays [batch, layer, head] (or [..., pos] per position).
    """
    g = cfg.group_size
    k, v, k_x, v_x = (jnp.repeat(a, g, axis=3) for a in (k, v, k_x, v_x))  # kv head j -> query heads j*g..
    gp = grad_pattern.astype(jnp.float32)
    s_clean = _scores(cfg, q, k)
    log_z = jax.scipy.special.logsumexp(s_clean, axis=-1, keepdims=True)
    a_clean = jnp.exp(s_clean - log_z)
    row_sum = (a_clean * gp).sum(-1, keepdims=True)                                    # [l,b,h,s,1]
    m = mask.astype(jnp.float32)

    # Queries: rows of the pattern are independent, so per-position and all-position patches agree.
    a_q = jax.nn.softmax(_scores(cfg, q_x, k), axis=-1)
    q_eff = ((a_q * gp).sum(-1, keepdims=True) - row_sum)[..., 0] * m[None, :, None, :]  # [l,b,h,s]

    s_kx = _scores(cfg, q, k_x)
    if per_position:
        # One key position t replaced: only entry (s, t) of each row changes, so the new row is the
        # old one renormalised by D = 1 - A_st + exp(s'_st - logZ_s), with entry t rescored.
        e_new = jnp.exp(s_kx - log_z)
        denom = 1.0 - a_clean + e_new
        new_sum = (row_sum - a_clean * gp + e_new * gp) / denom
        causal = jnp.tril(jnp.ones(s_kx.shape[-2:], bool))
        k_eff = jnp.where(causal, new_sum - row_sum, 0.0).sum(-2) * m[None, :, None, :]  # [l,b,h,t]
    else:
        a_k = jax.nn.softmax(s_kx, axis=-1)
        k_eff = ((a_k - a_clean) * gp).sum(-1)                                            # [l,b,h,s]

    # Values: z_s = sum_t A_st v_t is linear in v.
    dv = (v_x - v).astype(jnp.float32) * m[None, :, :, None, None]
    v_eff = jnp.einsum("lbhst,lbthd,lbshd->lbht", a_clean, dv, grad_z.astype(jnp.float32))

    def finish(x: Array) -> Array:  # [l,b,h,pos] -> [b,l,h(,pos)]
        x = jnp.moveaxis(x, 1, 0)
        return x if per_position else x.sum(-1)

    return finish(q_eff), finish(k_eff), finish(v_eff)


# ----------------------------------------------------------------------------------------------
# The compiled program


def _site_scores(site: str, clean: Array, corrupt: Array, grad: Array, mask: Array, per_position: bool) -> Array:
    """Per-example AtP of one site in one layer from [batch, pos, ...] activations -> [batch, ...]."""
    diff = (corrupt - clean).astype(jnp.float32)
    diff = diff * mask.reshape(mask.shape + (1,) * (diff.ndim - 2)).astype(jnp.float32)
    prod = diff * grad.astype(jnp.float32)
    if site in _RESID or site in ("attn_out", "mlp_out"):
        s = prod.sum(-1)                                           # [b, p]
        return s if (site in _RESID or per_position) else s.sum(-1)
    if site == "head":
        s = prod.sum(-1)                                           # [b, p, h]
        return jnp.moveaxis(s, 1, 2) if per_position else s.sum(1)
    return prod if per_position else prod.sum(1)                   # neuron: [b, p, m]


def _atp_chunk_impl(params, pairs: MinimalPairs, weight: Array, base: dict[str, Intervention], *,
                    cfg: ModelConfig, sites: tuple[str, ...], per_position: bool, qk_fix: bool,
                    grad_drop: bool, metric: Metric, per_pair: bool) -> tuple[dict, dict]:
    joint = make_joint_forward(cfg, jit=False)
    L = cfg.n_layers
    batch, pos = pairs.clean.shape
    rot_q, rot_k = _rotated_names(cfg)
    site_templates = [SITES[s] for s in sites]
    grad_templates = list(dict.fromkeys(site_templates + (["attn.hook_z", "attn.hook_pattern"] if qk_fix else [])))
    act_templates = list(dict.fromkeys(site_templates + ([rot_q, rot_k, "attn.hook_v"] if qk_fix else [])))
    clean_templates = act_templates + (["attn.hook_pattern"] if qk_fix else []) + (list(_LAYER_OUTPUTS) if grad_drop else [])
    names = lambda templates: tuple(f"blocks.*.{t}" for t in dict.fromkeys(templates))

    dtype = jnp.dtype(cfg.dtype)
    # Per layer, not stacked: a stacked delta's gradient and stacked caches would be copied
    # (hundreds of MB at batch 32) before the scores read them once.
    zeros = {t: list(zeros_for(cfg, t, batch, pos, dtype)) for t in grad_templates}
    columns, metric_pairs = answer_foil_columns(metric, pairs)  # logit_diff: unembed two columns only
    corrupt_run = Run(pairs.corrupt, Hooks(base, cache=names(act_templates)), logits_at=pairs.position,
                      logits_columns=columns)

    def gradients(drop_layer=None, held=None, cache_names=(), with_corrupt=False):
        """(gradients, (clean cache, corrupt cache or None)). With `with_corrupt` the corrupted run
        shares the clean run's layer scan (each layer's weights read once for both); the gradient
        does not reach it, so it runs in the forward pass only."""
        def metric_sum(deltas):
            interventions = dict(base)
            for t, d in deltas.items():
                for l in range(L):
                    with_add(interventions, f"blocks.{l}.{t}", d[l])
            if drop_layer is not None:
                for t in _LAYER_OUTPUTS:
                    for l in range(L):
                        name = f"blocks.{l}.{t}"
                        prev = interventions.get(name)
                        if prev is not None and prev.replace is not None:
                            raise ValueError(f"grad_drop holds {name} constant and cannot combine with a "
                                             "user replace intervention there.")
                        # Same value as the clean forward, but constant: the backward pass stops here.
                        interventions[name] = Intervention(held[t][l], jnp.reshape(drop_layer == l, (1, 1, 1)),
                                                           None if prev is None else prev.add)
            clean_run = Run(pairs.clean, Hooks(interventions, cache=cache_names), logits_at=pairs.position,
                            logits_columns=columns)
            (logits, cache), *corrupt = joint(params, [clean_run] + ([corrupt_run] if with_corrupt else []))
            caches = (cache, corrupt[0][1] if corrupt else None)
            return metric(logits, metric_pairs, jax.lax.stop_gradient(logits)).sum(), caches
        return jax.grad(metric_sum, has_aux=True)(zeros)

    grads, (clean_cache, corrupt_cache) = gradients(cache_names=names(clean_templates), with_corrupt=True)
    clean = {t: [clean_cache[f"blocks.{l}.{t}"] for l in range(L)] for t in clean_templates}
    corrupt = {t: [corrupt_cache[f"blocks.{l}.{t}"] for l in range(L)] for t in act_templates}

    def scores_from(grads: dict[str, Array]) -> dict[str, Array]:
        out = {}
        for site in sites:
            t = SITES[site]
            out[site] = jnp.stack([_site_scores(site, clean[t][l], corrupt[t][l], grads[t][l], pairs.mask, per_position)
                                   for l in range(L)], axis=1)                         # [b, l, ...]
        if qk_fix:
            q_eff, k_eff, v_eff = qk_fix_effects(
                cfg, *(jnp.stack(a) for a in (clean[rot_q], clean[rot_k], clean["attn.hook_v"], corrupt[rot_q],
                                              corrupt[rot_k], corrupt["attn.hook_v"], grads["attn.hook_pattern"],
                                              grads["attn.hook_z"])), pairs.mask, per_position)
            out.update(head_atp=out["head"], head=q_eff + k_eff + v_eff, head_q=q_eff, head_k=k_eff, head_v=v_eff)
        return out

    def reduce(per_example: dict[str, Array]) -> dict[str, Array]:
        if per_pair:
            return per_example
        return {k: jnp.tensordot(weight, v, axes=1) for k, v in per_example.items()}

    main = reduce(scores_from(grads))
    if not grad_drop:
        return main, {}

    held = {t: clean[t] for t in _LAYER_OUTPUTS}

    def dropped(drop_layer):
        g, _ = gradients(drop_layer, held)
        s = scores_from(g)
        for site in ("attn_out", "mlp_out"):
            if site in s:  # the delta sits after the held value; the layer's own output is held too
                keep = (jnp.arange(L) != drop_layer).astype(jnp.float32)
                s[site] = s[site] * keep.reshape((1, L) + (1,) * (s[site].ndim - 2))
        return reduce(s)

    per_layer = jax.lax.map(dropped, jnp.arange(L, dtype=jnp.int32))   # site -> [drop_layer, ...]
    return main, per_layer


_STATIC = ("cfg", "sites", "per_position", "qk_fix", "grad_drop", "metric", "per_pair")
atp_chunk = jax.jit(_atp_chunk_impl, static_argnames=_STATIC)
atp_chunk.__doc__ = """Jitted AtP of one chunk: (params, pairs, weight [batch], base interventions, **static)
-> (scores, grad-drop scores per dropped layer). Weighted sums over the chunk unless per_pair."""


def _dims(site: str, per_position: bool) -> tuple[str, ...]:
    if site in _RESID:
        return ("layer", "pos")
    if site in ("attn_out", "mlp_out"):
        return ("layer", "pos") if per_position else ("layer",)
    if site.startswith("head"):
        return ("layer", "head", "pos") if per_position else ("layer", "head")
    return ("layer", "pos", "neuron") if per_position else ("layer", "neuron")


def atp(cfg: ModelConfig, params: Any, pairs: MinimalPairs, *, metric: str | Metric = "logit_diff",
        sites: Sequence[str] = ("head",), per_position: bool = False, qk_fix: bool = False,
        grad_drop: bool = False, per_pair: bool = False, batch_size: int | None = None,
        hooks: Hooks | Mapping[str, Intervention] | None = None, mesh: Any = None,
        memory_budget_bytes: int | None = None) -> Attribution:
    """Attribution patching of `sites` (see `SITES`) over minimal pairs, mean over pairs.

    Each score estimates metric(clean run with that component patched from the corrupted run)
    minus metric(clean run). `qk_fix` / `grad_drop` switch on the AtP* options (module docstring;
    `qk_fix` needs the "head" site). `per_pair` keeps a leading batch dim instead of the mean.
    `batch_size` chunks the pairs (one compilation for all chunks). `hooks` are interventions
    applied to every forward (e.g. freezing a LayerNorm scale; arrays whose leading dim is the
    number of pairs are chunked with them). `mesh` (`jaxcirc.sharding.make_mesh`): each chunk's
    pairs over `data` (the chunk size must divide it), large weights over `model`; the scores equal
    the unsharded ones. `memory_budget_bytes` (per device; only without `batch_size`): the chunk
    size that fits it (`budget_batch_size`), or MemoryBudgetError when one pair does not fit.
    Returns an `Attribution`:
    scores [layer, ...] by site with dims and metadata.
    """
    check_pairs(cfg, pairs)
    sites = tuple(dict.fromkeys(sites))
    unknown = [s for s in sites if s not in SITES]
    if unknown or not sites:
        raise ValueError(f"Unknown attribution sites {unknown or list(sites)}; choose from {list(SITES)}.")
    if "resid_mid" in sites and cfg.parallel_residual:
        raise ValueError("resid_mid does not exist in a parallel-residual (GPT-NeoX/Pythia) block; "
                         "use resid_pre or resid_post.")
    if qk_fix and "head" not in sites:
        raise ValueError("qk_fix refines attention-head scores; include 'head' in sites.")
    if grad_drop and cfg.n_layers < 2:
        raise ValueError("grad_drop averages over the other layers (1/(L-1)); it needs at least 2 layers.")
    metric_fn = resolve_metric(metric)
    base = base_interventions(hooks)
    static = dict(cfg=cfg, sites=sites, per_position=per_position, qk_fix=qk_fix, grad_drop=grad_drop,
                  metric=metric_fn, per_pair=per_pair)

    n = int(pairs.clean.shape[0])
    totals: dict[str, Any] = {}
    drops: dict[str, Any] = {}
    if mesh is not None:
        params, pairs = shard_params(params, mesh, cfg), to_host(pairs)  # chunks are cut on the host
    if batch_size is None and memory_budget_bytes is not None:
        batch_size = budget_batch_size(cfg, params, pairs, memory_budget_bytes, mesh)
    for chunk, weight, real, chunk_base in pair_chunks(pairs, batch_size, base):
        if mesh is not None:
            chunk, weight, chunk_base = shard_along_batch((chunk, weight, chunk_base), mesh, len(weight))
        main, per_layer = atp_chunk(params, chunk, weight, chunk_base, **static)
        if per_pair:
            main = {k: v[:real] for k, v in main.items()}
            per_layer = {k: jnp.moveaxis(v, 0, 1)[:real] for k, v in per_layer.items()}  # [b, drop, ...]
            for store, new in ((totals, main), (drops, per_layer)):
                for k, v in new.items():
                    store.setdefault(k, []).append(v)
        else:
            for store, new in ((totals, main), (drops, per_layer)):
                for k, v in new.items():
                    store[k] = v if k not in store else store[k] + v
    if per_pair:
        totals = {k: jnp.concatenate(v) for k, v in totals.items()}
        drops = {k: jnp.concatenate(v) for k, v in drops.items()}
    else:
        totals = {k: v / n for k, v in totals.items()}
        drops = {k: v / n for k, v in drops.items()}

    if grad_drop:
        layer_axis = 1 if per_pair else 0
        scores = {k: jnp.abs(v).sum(layer_axis) / (cfg.n_layers - 1) for k, v in drops.items()}
    else:
        scores = totals
    lead = ("batch",) if per_pair else ()
    dims = {k: lead + _dims(k, per_position) for k in scores}
    method = "atp*" if (qk_fix and grad_drop) else "atp+qk_fix" if qk_fix else "atp+grad_drop" if grad_drop else "atp"
    metadata = {
        "method": method, "metric": metric_name(metric), "n_pairs": n, "sites": list(sites),
        "per_position": per_position, "qk_fix": qk_fix, "grad_drop": grad_drop, "per_pair": per_pair,
        "sign": SIGN_CONVENTION if not grad_drop else "grad_drop scores are magnitudes: "
                "1/(L-1) sum_l |AtP with layer l held constant in the backward pass|",
        "positions": "head_q: query position; head_k/head_v: key position" if (qk_fix and per_position) else "",
    }
    if grad_drop:
        metadata["grad_drop_signed"] = {k: np.asarray(v) for k, v in drops.items()}
        metadata["atp_without_grad_drop"] = {k: np.asarray(v) for k, v in totals.items()}
    return Attribution(scores, dims, metadata)
