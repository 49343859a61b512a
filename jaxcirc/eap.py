"""Edge attribution patching: EAP and EAP-IG (inputs variant), one compiled program per batch.

The graph (`jaxcirc.graph`): nodes input / a{l}.h{h} / m{l} write to the residual stream;
destinations a{l}.h{h}<q>, <k>, <v> (per kv head under GQA), m{l} and logits read it. Because a
destination's input is the sum of its upstream nodes' outputs, patching edge u -> v (u's
corrupted output into v's input only) changes v's input by  z'_u - z_u, and

    s(u -> v) = mean_pairs  sum_pos  (z'_u - z_u) . dM/d(input_v)

(experiments.md A.5, hannamw/EAP-IG): ' is the corrupted run, z_u is u's output in the clean run
(input = hook_embed + hook_pos_embed, head = attn.hook_result[:, :, h] without b_O, MLP =
hook_mlp_out). Sign convention Δ = corrupted - clean: a score estimates M(clean run with that edge
patched to its corrupted value) - M(clean run); with logit difference, edges that carry the
behaviour score negative. dM/d(input_v) comes from zero `add` deltas at blocks.{l}.hook_mlp_in and
blocks.{L-1}.hook_resid_post (the logits), and for a head's q/k/v input (blocks.{l}.hook_q_input,
...) from the deltas at attn.hook_q/k/v mapped back through the projection and ln1
(`backward_statistics`), which equals differentiating at the per-head inputs without running ln1
and the projections once per head.

* EAP: the gradient in the clean run.
* EAP-IG ("inputs" variant): the gradient averaged over m forwards on the clean tokens whose input
  embeddings are interpolated, x_k = emb' + (k/m)(emb - emb'), k = 0..m-1 (`endpoint="left"`,
  experiments.md A.5 and the hannamw/EAP-IG version it cites; m = 5 by default). The interpolation
  steps run inside the one program, `step_chunk` of them at a time as one batch of
  step_chunk x batch sequences (a `lax.scan` over the chunks; by default as many as bring a pass
  near STEP_CHUNK_TOKENS tokens, `default_step_chunk`).
  `endpoint="right"` uses k = 1..m (later hannamw/EAP-IG releases), so m = 1 is plain EAP.

Scores are `einsum('bpnd,bpmd->nm', z' - z, grad)` over pairs and positions, divided by the number
of pairs and zeroed on invalid edges.

    result = eap_ig(model.config, model.params, pairs, steps=5)
    result.scores            # [n_src, n_dst]; result.graph.node_names / dst_names
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxcirc.attribution import (base_interventions, budget_batch_size, check_pairs, pair_chunks,
                                 resolve_metric, with_add, zeros_for)
from jaxcirc.graph import Graph
from jaxcirc.hooks import Hooks, Intervention, replace
from jaxcirc.metrics import Metric, metric_name
from jaxcirc.models.config import ModelConfig
from jaxcirc.models.transformer import Run, make_joint_forward
from jaxcirc.pairs import MinimalPairs
from jaxcirc.sharding import shard_along_batch, shard_params, to_host

Array = jax.Array
Endpoint = Literal["left", "right"]

# Where the backward pass is read: a head's q/k/v input gradient is ln1's VJP (at hook_resid_pre)
# of dM/dq_h @ W_Q[h]^T (k, v alike). Reading it at the per-head inputs themselves would run ln1
# and the projections once per head (gradient passes 2-3.4x slower on the GPT-2-small shape).
_GRAD_TEMPLATES = ("attn.hook_q", "attn.hook_k", "attn.hook_v", "hook_mlp_in")
_PROJECTIONS = (("attn.hook_q", "hook_q_input", "W_Q"), ("attn.hook_k", "hook_k_input", "W_K"),
                ("attn.hook_v", "hook_v_input", "W_V"))
# What `backward_statistics` reads from the gradient pass's cache.
STATISTICS_CACHE = ("blocks.*.hook_resid_pre", "blocks.*.attn.hook_q", "blocks.*.attn.hook_k", "blocks.*.attn.hook_v")


@dataclasses.dataclass(frozen=True)
class EdgeScores:
    """Edge scores [n_src, n_dst] in `graph` order, with how they were computed."""

    scores: Array
    graph: Graph
    method: str
    steps: int
    metric: str
    n_pairs: int
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    dims: tuple[str, str] = ("src_node", "dst")

    def node_scores(self) -> np.ndarray:
        """[n_src] sum of each node's outgoing edge scores (≈ the node's AtP)."""
        return self.graph.node_totals(np.asarray(self.scores))

    def top(self, k: int = 20) -> list[tuple[str, float]]:
        """The k edges with the largest |score|, as ("src->dst", score)."""
        return self.graph.top_edges(np.asarray(self.scores), k)

    def arrays(self) -> dict[str, tuple[np.ndarray, tuple[str, ...]]]:
        """`{"edge_scores": (array, dims)}` for `jaxcirc.rundir.write_run`."""
        return {"edge_scores": (np.asarray(self.scores), self.dims)}

    def describe(self) -> dict[str, Any]:
        """JSON-able metadata: method, steps, metric, pairs, node and destination names."""
        return {"method": self.method, "steps": self.steps, "metric": self.metric, "n_pairs": self.n_pairs,
                "node_names": list(self.graph.node_names), "dst_names": list(self.graph.dst_names),
                **dict(self.metadata)}


def node_output_names(cfg: ModelConfig) -> tuple[str, ...]:
    names = ["hook_embed", "blocks.*.attn.hook_result", "blocks.*.hook_mlp_out"]
    if cfg.positional == "learned":
        names.insert(1, "hook_pos_embed")
    return tuple(names)


def stack_node_outputs(cfg: ModelConfig, cache: Mapping[str, Array]) -> Array:
    """Node outputs [batch, pos, n_src, d_model] in graph order (input, then per layer heads, MLP)."""
    embed = cache["hook_embed"] + cache.get("hook_pos_embed", 0)
    parts = [embed[:, :, None]]
    for l in range(cfg.n_layers):
        parts += [cache[f"blocks.{l}.attn.hook_result"], cache[f"blocks.{l}.hook_mlp_out"][:, :, None]]
    return jnp.concatenate(parts, axis=2)


def stack_destination_grads(cfg: ModelConfig, grads: Mapping[str, Any]) -> Array:
    """Destination gradients [batch, pos, n_dst, d_model] in graph order (per layer q, k, v, MLP;
    logits) from per-layer lists of [batch, pos, (head,) d_model] by template, and "logits"."""
    parts = []
    for l in range(cfg.n_layers):
        parts += [grads["hook_q_input"][l], grads["hook_k_input"][l], grads["hook_v_input"][l],
                  grads["hook_mlp_in"][l][:, :, None]]
    return jnp.concatenate(parts + [grads["logits"][:, :, None]], axis=2)


def _folded_weights(cfg: ModelConfig, params: Any, layer: int, weight: str) -> Array:
    """ln1's scale folded into a q/k/v projection: [d_model, head, d_head] float32."""
    w = params["blocks"]["ln1"]["w"][layer].astype(jnp.float32)
    scale = w if cfg.norm_offset == 0 else cfg.norm_offset + w
    return scale[:, None, None] * params["blocks"]["attn"][weight][layer].astype(jnp.float32)


def _projection_offset(cfg: ModelConfig, params: Any, layer: int, weight: str) -> Array:
    """What a q/k/v activation adds to x^ W (W with ln1's scale folded in): ln1's bias projected,
    plus the projection's bias; [head, d_head] float32."""
    offset = 0.0
    ln_bias = params["blocks"]["ln1"].get("b")
    if ln_bias is not None:
        offset = jnp.einsum("d,dnk->nk", ln_bias[layer].astype(jnp.float32),
                            params["blocks"]["attn"][weight][layer].astype(jnp.float32))
    bias = params["blocks"]["attn"].get("b" + weight[1:])
    return offset if bias is None else offset + bias[layer].astype(jnp.float32)


def backward_statistics(cfg: ModelConfig, params: Any, grads: Mapping[str, Any], cache: Mapping[str, Array]
                        ) -> tuple[dict[str, Any], dict[str, Any]]:
    """What one backward pass contributes to the destination gradients, in pieces that add over
    EAP-IG's steps without building [batch, pos, head, d_model] per step.

    ln1's VJP at x (s its rms, centred for LayerNorm; x^ = x / s) maps a head's cotangent g W^T
    (W the projection with ln1's scale folded in) to (g W^T - mean_d(g W^T) - x^ mean_d(g W^T x^)) / s,
    the mean term for LayerNorm only. So with a = g / s, b = mean_d(g W^T) / s, c = g . (x^ W) / d_model
    and x = x^ / s, the q/k/v input gradient is a W^T - b - x c (`destination_grads`). x^ W is the
    cached hook_q/k/v less the biases (`STATISTICS_CACHE`), not a second projection.
    Returns (sums: "hook_mlp_in", "logits" and per template "a", "b"; outer: "x" and per template "c"),
    per-layer lists of [batch, pos, ...] float32."""
    sums: dict[str, Any] = {"hook_mlp_in": grads["hook_mlp_in"], "logits": grads["logits"]}
    outer: dict[str, Any] = {"x": []}
    for template, _, _ in _PROJECTIONS:
        sums[template] = {"a": [], "b": []}
        outer[template] = []
    for l in range(cfg.n_layers):
        x = cache[f"blocks.{l}.hook_resid_pre"].astype(jnp.float32)
        if cfg.norm == "layernorm":
            x = x - x.mean(-1, keepdims=True)
        rms = jnp.sqrt((x * x).mean(-1, keepdims=True) + cfg.norm_eps)           # [b, p, 1]
        x_hat = x / rms
        outer["x"].append(x_hat / rms)
        for template, _, weight in _PROJECTIONS:
            g = grads[template][l].astype(jnp.float32)                         # [b, p, n, k]
            sums[template]["a"].append(g / rms[..., None])
            b = (jnp.einsum("bpnk,nk->bpn", g, _folded_weights(cfg, params, l, weight).mean(0)) / rms
                 if cfg.norm == "layernorm" else jnp.zeros(g.shape[:3], jnp.float32))
            sums[template]["b"].append(b)
            projected = cache[f"blocks.{l}.{template}"].astype(jnp.float32) - _projection_offset(cfg, params, l, weight)
            outer[template].append(jnp.einsum("bpnk,bpnk->bpn", g, projected) / cfg.d_model)
    return sums, outer


def destination_grads(cfg: ModelConfig, params: Any, sums: Mapping[str, Any], outer: Mapping[str, Any]
                      ) -> dict[str, Any]:
    """dM/d(destination inputs) at hook_q_input, hook_k_input, hook_v_input, hook_mlp_in (per-layer
    lists of [batch, pos, (head,) d_model]) and "logits", from `backward_statistics` (the outer
    pieces stacked over steps: x [step, b, p, d], c [step, b, p, n], step weights folded into c)."""
    out: dict[str, Any] = {"hook_mlp_in": sums["hook_mlp_in"], "logits": sums["logits"]}
    for template, dst, weight in _PROJECTIONS:
        out[dst] = [jnp.einsum("bpnk,dnk->bpnd", sums[template]["a"][l], _folded_weights(cfg, params, l, weight))
                    - sums[template]["b"][l][..., None]
                    - jnp.einsum("tbpd,tbpn->bpnd", outer["x"][l], outer[template][l])
                    for l in range(cfg.n_layers)]
    return out


def _tile_batch(tree: Any, copies: int, batch: int) -> Any:
    """Repeat every batch-first array `copies` times along the batch: [b, ...] -> [copies * b, ...]
    (copy c of example i at c * b + i); arrays with a leading 1 (broadcast) or scalars stay."""
    def tile(a):
        a = jnp.asarray(a)
        if a.ndim and a.shape[0] == batch and copies > 1:
            return jnp.concatenate([a] * copies, axis=0)
        return a
    return jax.tree.map(tile, tree)


def _eap_chunk_impl(params, pairs: MinimalPairs, weight: Array, base: dict[str, Intervention],
                    alphas: Array | None, *, cfg: ModelConfig, metric: Metric, step_chunk: int) -> Array:
    joint = make_joint_forward(cfg, jit=False)
    L = cfg.n_layers
    batch, pos = pairs.clean.shape
    outputs = node_output_names(cfg)
    dtype = jnp.dtype(cfg.dtype)
    corrupt_run = Run(pairs.corrupt, Hooks(base, cache=outputs), logits_at=pairs.position)

    def gradients(run_pairs: MinimalPairs, run_base: dict[str, Intervention], clean_logits: Array | None,
                  embed: Array | None, cache_names=(), with_corrupt=False):
        """`backward_statistics` of dM/d(destinations) for the clean tokens of `run_pairs` (embeddings
        replaced by `embed`), and (the cache, the corrupted run's cache or None): with
        `with_corrupt` that run shares the layer scan, in the forward pass only."""
        n = run_pairs.clean.shape[0]
        # Per layer, not stacked: a stacked delta's gradient would be copied on every step.
        zeros = {t: list(zeros_for(cfg, t, n, pos, dtype)) for t in _GRAD_TEMPLATES}
        zeros["logits"] = jnp.zeros((n, pos, cfg.d_model), dtype)

        def metric_sum(deltas):
            interventions = dict(run_base)
            for t in _GRAD_TEMPLATES:
                for l in range(L):
                    with_add(interventions, f"blocks.{l}.{t}", deltas[t][l])
            with_add(interventions, f"blocks.{L - 1}.hook_resid_post", deltas["logits"])
            if embed is not None:
                if "hook_embed" in interventions:
                    raise ValueError("EAP-IG interpolates hook_embed; remove the user intervention there.")
                interventions["hook_embed"] = replace(embed)
            clean_run = Run(run_pairs.clean, Hooks(interventions, cache=cache_names + STATISTICS_CACHE),
                            logits_at=run_pairs.position)
            (logits, cache), *corrupt = joint(params, [clean_run] + ([corrupt_run] if with_corrupt else []))
            reference = jax.lax.stop_gradient(logits) if clean_logits is None else clean_logits
            return metric(logits, run_pairs, reference).sum(), (cache, corrupt[0][1] if corrupt else None)
        grads, caches = jax.grad(metric_sum, has_aux=True)(zeros)
        return backward_statistics(cfg, params, grads, caches[0]), caches

    if alphas is None:
        (sums, outer), (clean_cache, corrupt_cache) = gradients(pairs, base, None, None, outputs, with_corrupt=True)
        outer = jax.tree.map(lambda a: a[None], outer)
    else:
        (clean_logits, clean_cache), (_, corrupt_cache) = joint(
            params, [Run(pairs.clean, Hooks(base, cache=outputs), logits_at=pairs.position), corrupt_run])
        emb, emb_x = clean_cache["hook_embed"], corrupt_cache["hook_embed"]
        # The interpolation steps of a chunk run as one batch of chunk * batch sequences (vmapping the
        # gradient of the layer scan instead costs memory quadratic in the depth on XLA), and a scan
        # over the chunks accumulates their sum.
        n_steps = alphas.shape[0]
        chunk = min(step_chunk, n_steps)
        n_chunks = -(-n_steps // chunk)
        pad = n_chunks * chunk - n_steps
        chunk_alphas = jnp.concatenate([alphas, jnp.zeros(pad, alphas.dtype)]).reshape(n_chunks, chunk)
        chunk_weights = (jnp.arange(n_chunks * chunk) < n_steps).astype(jnp.float32).reshape(n_chunks, chunk)
        run_pairs, run_base = _tile_batch(pairs, chunk, batch), _tile_batch(base, chunk, batch)
        run_logits = _tile_batch(clean_logits, chunk, batch)
        by_step = lambda a: a.reshape((chunk, batch) + a.shape[1:])           # [chunk * batch, ...] -> [chunk, batch, ...]

        def step(total, xs):
            alpha, w = xs                                                       # [chunk]
            w = w / n_steps                                                     # the mean over steps
            embed = emb_x[None] + alpha.astype(emb.dtype)[:, None, None, None] * (emb - emb_x)[None]
            (sums, outer), _ = gradients(run_pairs, run_base, run_logits,
                                         embed.reshape((chunk * batch,) + emb.shape[1:]))
            total = jax.tree.map(lambda acc, a: acc + jnp.tensordot(w, by_step(a), axes=1), total, sums)
            # The outer pieces are kept per step ([chunk, batch, ...]), the step weight folded into c.
            return total, {k: [by_step(a) if k == "x" else w[:, None, None, None] * by_step(a) for a in v]
                           for k, v in outer.items()}

        (sums_shape, _), _ = jax.eval_shape(lambda: gradients(pairs, base, None, None))
        zero = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), sums_shape)
        sums, per_step = jax.lax.scan(step, zero, (chunk_alphas, chunk_weights))
        outer = jax.tree.map(lambda a: a.reshape((n_chunks * chunk,) + a.shape[2:]), per_step)   # [step, b, ...]
    grads = destination_grads(cfg, params, sums, outer)

    diff = stack_node_outputs(cfg, corrupt_cache) - stack_node_outputs(cfg, clean_cache)
    row_weight = weight[:, None] * pairs.mask.astype(jnp.float32)               # [b, p]
    diff = diff.astype(jnp.float32) * row_weight[:, :, None, None]
    dst_grads = stack_destination_grads(cfg, grads).astype(jnp.float32)
    return jnp.einsum("bpnd,bpmd->nm", diff, dst_grads, precision=jax.lax.Precision.HIGHEST)


eap_chunk = jax.jit(_eap_chunk_impl, static_argnames=("cfg", "metric", "step_chunk"))
eap_chunk.__doc__ = """Jitted EAP / EAP-IG of one chunk: (params, pairs, weight [batch], base interventions,
alphas [steps] or None for EAP, **static) -> weighted sum over the chunk's pairs of the edge scores
[n_src, n_dst] (invalid edges not zeroed). The interpolation coefficients are data, so both endpoint
conventions share one compilation per number of steps."""


def ig_alphas(steps: int, endpoint: Endpoint = "left") -> np.ndarray:
    """[steps] interpolation coefficients k/m: k = 0..m-1 ("left") or 1..m ("right")."""
    first = 0 if endpoint == "left" else 1
    return (np.arange(first, first + steps) / steps).astype(np.float32)


# Tokens per gradient pass below which EAP-IG runs several interpolation steps as one batch: on 2
# CPU cores, 5 steps of 1 x 16 tokens ran 2.1x faster together than one at a time, of 8 x 16 1.13x.
STEP_CHUNK_TOKENS = 512


def default_step_chunk(steps: int, tokens: int) -> int:
    """IG steps per pass for `tokens` per step: enough to near STEP_CHUNK_TOKENS, evened out over
    the passes (5 steps wanting 2 per pass run as 3 + 2 (+1 padding), wanting 4 as one pass of 5)."""
    want = max(1, -(-STEP_CHUNK_TOKENS // max(tokens, 1)))
    passes = max(1, round(steps / want))
    return -(-steps // passes)


def eap(cfg: ModelConfig, params: Any, pairs: MinimalPairs, *, metric: str | Metric = "logit_diff",
        method: Literal["eap", "eap-ig"] = "eap", steps: int = 5, endpoint: Endpoint = "left",
        batch_size: int | None = None, step_chunk: int | None = None,
        hooks: Hooks | Mapping[str, Intervention] | None = None, mesh: Any = None,
        memory_budget_bytes: int | None = None) -> EdgeScores:
    """Edge attribution scores [n_src, n_dst] (graph order of `jaxcirc.graph`), mean over pairs.

    method "eap": gradient at the clean run; "eap-ig": averaged over `steps` input-embedding
    interpolations (k = 0..steps-1 with endpoint "left", 1..steps with "right"). Each score
    estimates M(clean with the edge patched to corrupted) - M(clean). `batch_size` chunks the pairs
    (one compilation for all chunks); `step_chunk` bounds how many IG steps run at once (memory;
    default `default_step_chunk`, or 1 with a memory budget and no `batch_size`).
    `hooks`: interventions applied to every forward (per-pair arrays are chunked with the pairs).
    `mesh` (`jaxcirc.sharding.make_mesh`): each chunk's pairs over `data` (the chunk size must
    divide it), large weights over `model`; the scores equal the unsharded ones.
    `memory_budget_bytes` (per device; only without `batch_size`): the pairs per chunk that fit it
    with `step_chunk` steps at once, or MemoryBudgetError when one pair does not fit.
    """
    check_pairs(cfg, pairs)
    if method not in ("eap", "eap-ig"):
        raise ValueError(f"Unknown method {method!r}; use 'eap' or 'eap-ig'.")
    if endpoint not in ("left", "right"):
        raise ValueError(f"endpoint must be 'left' (k = 0..m-1) or 'right' (k = 1..m), got {endpoint!r}.")
    integrated = method == "eap-ig"
    if integrated and (not isinstance(steps, (int, np.integer)) or steps < 1):
        raise ValueError(f"EAP-IG needs steps >= 1 (the semantic-role paper uses 5), got {steps!r}.")
    steps = int(steps) if integrated else 1
    metric_fn = resolve_metric(metric)
    base = base_interventions(hooks)
    # The q/k/v input gradients are derived from ln1 and the projection as the model computes them.
    on_path = sorted(name for name in base
                     if ".ln1." in name or name.endswith((".attn.hook_q", ".attn.hook_k", ".attn.hook_v")))
    if on_path:
        raise ValueError(f"EAP differentiates each head's query/key/value input through ln1 and the q/k/v "
                         f"projection, so it cannot take interventions there ({on_path}); intervene on "
                         "hook_resid_pre instead.")
    graph = Graph.from_config(cfg)
    n = int(pairs.clean.shape[0])
    if step_chunk is None:
        # With a memory budget the chunk of pairs is sized for one step at a time.
        rows = None if (batch_size is None and memory_budget_bytes is not None) else (batch_size or n)
        step_chunk = 1 if rows is None else default_step_chunk(steps, rows * pairs.n_pos)
    static = dict(cfg=cfg, metric=metric_fn, step_chunk=int(step_chunk))
    alphas = jnp.asarray(ig_alphas(steps, endpoint)) if integrated else None

    total = None
    if mesh is not None:
        params, pairs = shard_params(params, mesh, cfg), to_host(pairs)  # chunks are cut on the host
    if batch_size is None and memory_budget_bytes is not None:
        batch_size = budget_batch_size(cfg, params, pairs, memory_budget_bytes, mesh,
                                       copies=min(static["step_chunk"], steps))
    for chunk, weight, _, chunk_base in pair_chunks(pairs, batch_size, base):
        if mesh is not None:
            chunk, weight, chunk_base = shard_along_batch((chunk, weight, chunk_base), mesh, len(weight))
        part = eap_chunk(params, chunk, weight, chunk_base, alphas, **static)
        total = part if total is None else total + part
    scores = jnp.where(jnp.asarray(graph.valid), total / n, 0.0)
    metadata = {"sign": "score ~ M(clean run with the edge patched to its corrupted value) - M(clean run)",
                "endpoint": endpoint if integrated else None,
                "interpolated": "input embeddings (hook_embed)" if integrated else None}
    return EdgeScores(scores, graph, method, steps, metric_name(metric), n, metadata)


def eap_ig(cfg: ModelConfig, params: Any, pairs: MinimalPairs, *, steps: int = 5, **kwargs: Any) -> EdgeScores:
    """EAP-IG (inputs variant), `steps` interpolation steps (default 5); see `eap`."""
    return eap(cfg, params, pairs, method="eap-ig", steps=steps, **kwargs)
