"""Exact edge patching as data: the "destination input = sum of upstream outputs" rule.

Every destination (a head's q, k or v input, an MLP's input, the logits) reads the residual
stream, which is the sum of the outputs of the nodes upstream of it (the embedding, every earlier
head's `attn.hook_result`, every earlier MLP's `hook_mlp_out`, plus constant biases). Patching the
edge u -> v replaces u's contribution to v's input only:

    input_v = resid + sum_u mask[u, v] * (source_u - current_u)

where `current_u` is u's output in this (patched) run and `source_u` its output in the run the
patch comes from (corrupted, mean, zero). With a float mask this is differentiable: the gradient
at mask = 0 is EAP. `jax.vmap` over masks evaluates many circuits in one program.

Node and destination order is given by an `EdgeLayout` (static); `EdgeLayout.canonical(cfg)`:
  sources:       0 = input (embeddings), then per layer l: heads a{l}.h0..h{H-1}, then m{l}
  destinations:  per layer l: q of heads 0..H-1, k of kv heads 0..K-1, v of kv heads 0..K-1, m{l};
                 last: logits
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxcirc.models.config import ModelConfig

Array = jax.Array


def check_edge_decomposable(cfg: ModelConfig) -> None:
    """Raise unless the residual stream is the sum of the node outputs (heads' hook_result, MLPs'
    hook_mlp_out): Gemma 2's norm on the attention output mixes the heads non-linearly."""
    if cfg.post_norms:
        raise ValueError(
            f"Edge-level patching and EAP need each head's output to enter the residual stream as is; "
            f"{cfg.family} normalises the attention and MLP outputs first (post-norms), so head outputs "
            "do not add up to hook_attn_out. Use node-level patching or attribution (hook_z, "
            "hook_attn_out, hook_mlp_out) on this model.")


@dataclasses.dataclass(frozen=True)
class EdgeLayout:
    """Static map from model components to source rows and destination columns.

    Index tables are tuples (hashable): head_src/q_dst [layer][head], k_dst/v_dst
    [layer][kv_head], mlp_src/mlp_dst [layer].
    """

    n_src: int
    n_dst: int
    input_src: int
    head_src: tuple[tuple[int, ...], ...]
    mlp_src: tuple[int, ...]
    q_dst: tuple[tuple[int, ...], ...]
    k_dst: tuple[tuple[int, ...], ...]
    v_dst: tuple[tuple[int, ...], ...]
    mlp_dst: tuple[int, ...]
    logits_dst: int
    parallel_residual: bool

    @classmethod
    def canonical(cls, cfg: ModelConfig) -> "EdgeLayout":
        check_edge_decomposable(cfg)
        L, H, K = cfg.n_layers, cfg.n_heads, cfg.n_kv_heads
        head_src = tuple(tuple(1 + l * (H + 1) + h for h in range(H)) for l in range(L))
        mlp_src = tuple(1 + l * (H + 1) + H for l in range(L))
        per_layer = H + 2 * K + 1
        q_dst = tuple(tuple(l * per_layer + h for h in range(H)) for l in range(L))
        k_dst = tuple(tuple(l * per_layer + H + k for k in range(K)) for l in range(L))
        v_dst = tuple(tuple(l * per_layer + H + K + k for k in range(K)) for l in range(L))
        mlp_dst = tuple(l * per_layer + H + 2 * K for l in range(L))
        return cls(1 + L * (H + 1), L * per_layer + 1, 0, head_src, mlp_src, q_dst, k_dst, v_dst,
                   mlp_dst, L * per_layer, cfg.parallel_residual)

    def source_layer(self) -> np.ndarray:
        """[n_src] layer that writes each source (-1 for the input)."""
        layer = np.full(self.n_src, -1)
        for l, heads in enumerate(self.head_src):
            layer[list(heads)] = l
            layer[self.mlp_src[l]] = l
        return layer

    def valid(self) -> np.ndarray:
        """[n_src, n_dst] bool: which source feeds which destination through the residual."""
        src_layer = self.source_layer()
        is_mlp_src = np.zeros(self.n_src, bool)
        is_mlp_src[list(self.mlp_src)] = True
        valid = np.zeros((self.n_src, self.n_dst), bool)
        for l in range(len(self.mlp_src)):
            attn_dst = list(self.q_dst[l]) + list(self.k_dst[l]) + list(self.v_dst[l])
            valid[np.ix_(src_layer < l, attn_dst)] = True
            # The MLP of layer l also reads that layer's heads, unless attention and MLP run in parallel.
            feeds_mlp = src_layer < l
            if not self.parallel_residual:
                feeds_mlp = feeds_mlp | ((src_layer == l) & ~is_mlp_src)
            valid[feeds_mlp, self.mlp_dst[l]] = True
        valid[:, self.logits_dst] = True
        return valid


def _flatten(patch: "EdgePatch"):
    return (patch.mask, patch.source), patch.layout


def _unflatten(layout, children) -> "EdgePatch":
    return EdgePatch(*children, layout=layout)


@dataclasses.dataclass(frozen=True)
class EdgePatch:
    """Which edges to patch and with what.

    mask:   [n_src, n_dst] bool or float (1 = the edge carries `source`); invalid edges are ignored.
    source: [n_src, batch, pos, d_model] node outputs of the run the patch comes from.
    """

    mask: Array
    source: Array
    layout: EdgeLayout


jax.tree_util.register_pytree_node(EdgePatch, _flatten, _unflatten)


def node_output_cache_names(cfg: ModelConfig) -> tuple[str, ...]:
    """Hook points whose cached values make up the node outputs."""
    names = ["hook_embed", "blocks.*.attn.hook_result", "blocks.*.hook_mlp_out"]
    if cfg.positional == "learned":
        names.insert(1, "hook_pos_embed")
    return tuple(names)


def node_outputs(cfg: ModelConfig, cache: dict[str, Array], layout: EdgeLayout) -> Array:
    """Stack cached node outputs into [n_src, batch, pos, d_model] in `layout` order."""
    embed = cache["hook_embed"] + cache.get("hook_pos_embed", 0)
    rows: list[Array | None] = [None] * layout.n_src
    rows[layout.input_src] = embed
    for l in range(cfg.n_layers):
        result = cache[f"blocks.{l}.attn.hook_result"]
        for h, src in enumerate(layout.head_src[l]):
            rows[src] = result[:, :, h]
        rows[layout.mlp_src[l]] = cache[f"blocks.{l}.hook_mlp_out"]
    return jnp.stack(rows)


@dataclasses.dataclass
class EdgeState:
    """Per-forward edge-patching state: the valid mask, the source and the running node outputs."""

    patch: EdgePatch

    def __post_init__(self):
        layout = self.patch.layout
        mask = jnp.asarray(self.patch.mask)
        if mask.shape != (layout.n_src, layout.n_dst):
            raise ValueError(f"Edge mask has shape {mask.shape}; this model's graph needs "
                             f"[n_src={layout.n_src}, n_dst={layout.n_dst}].")
        self.mask = mask.astype(jnp.float32) * layout.valid()
        self.tables = {
            "q": jnp.asarray(layout.q_dst), "k": jnp.asarray(layout.k_dst),
            "v": jnp.asarray(layout.v_dst), "mlp": jnp.asarray(layout.mlp_dst)[:, None],
            "heads": jnp.asarray(layout.head_src), "mlp_src": jnp.asarray(layout.mlp_src)[:, None],
        }

    def initial_outputs(self, embedded: Array) -> Array:
        """[n_src, batch, pos, d_model] running outputs with the input node filled in."""
        current = jnp.zeros(self.patch.source.shape, embedded.dtype)
        return current.at[self.patch.layout.input_src].set(embedded)

    def correction(self, current: Array, dst: Array) -> Array:
        """sum_u mask[u, dst] (source_u - current_u) -> [batch, pos, len(dst), d_model]."""
        diff = self.patch.source.astype(current.dtype) - current
        return jnp.einsum("us,ubpd->bpsd", self.mask[:, dst].astype(current.dtype), diff)

    def logits_correction(self, current: Array) -> Array:
        return self.correction(current, jnp.array([self.patch.layout.logits_dst]))[:, :, 0]
