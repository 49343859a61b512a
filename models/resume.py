"""Resuming a forward pass part-way: from a dynamic start layer, over a suffix of positions.

An intervention at layer l, position p leaves the residual before layer l unchanged and, with
causal attention, every position < p unchanged at every layer. So an intervened run can start
from the unintervened run's residual at layer l, recompute only positions >= `offset` (any
offset <= p), and read the keys/values of the earlier positions from the unintervened run:

    resid = run_from_layer(cfg, params, resid_pre[start][:, offset:], start, hook,
                           prefix_kv=(k[:, :, :offset], v[:, :, :offset]))
    logits = final_logits(cfg, params, resid_at_metric_position)

`start` is a traced int32 scalar (one compiled program serves every start layer): the remaining
layers run in a `fori_loop` that slices the stacked block parameters dynamically. Only the start
block sees `hook` (the intervention); the later blocks run unhooked.

The blocks are `common.Block` itself, given the earlier positions' keys and values; what it
cannot resume is `supports_resume(cfg)` False: ALiBi and LM-Infinite's distance cap need the
position ids of every key. Callers fall back to a full forward then.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcirc.models.common import _no_hook, rope_tables
from jaxcirc.models.config import ModelConfig
from jaxcirc.models.transformer import Params, bind

Array = jax.Array


def supports_resume(cfg: ModelConfig) -> bool:
    """Whether `run_from_layer` reproduces `cfg`'s forward exactly (index-based attention masks)."""
    window = cfg.attention_window
    return cfg.positional != "alibi" and (window is None or window.max_distance is None)


def run_from_layer(cfg: ModelConfig, params: Params, resid: Array, start: Array, hook=_no_hook, *,
                   prefix_kv: tuple[Array, Array] | None = None, offset: int = 0) -> Array:
    """Run blocks start..n_layers-1 on resid [batch, S, d_model], the residual before block
    `start` at positions offset..offset+S-1 (S = pos - offset). Returns the residual after the
    last block [batch, S, d_model] (before ln_final).

    start: int32 scalar, may be traced. hook: applied in block `start` only (a HookContext whose
    plan has the suffix's shapes). prefix_kv: the unintervened run's rotated keys and values at
    positions < offset for every layer, each [layer, batch, offset, kv_head, d_head] (None when
    offset is 0).
    """
    if not supports_resume(cfg):
        raise ValueError("run_from_layer cannot resume ALiBi or LM-Infinite's distance cap (they need "
                         "every key's position id); run a full forward.")
    if (prefix_kv is None) != (offset == 0):
        raise ValueError(f"prefix_kv must be given exactly when offset > 0 (offset={offset}).")
    model = bind(cfg, params)
    block_def, block_state = nnx.split(model.blocks)
    batch, n = resid.shape[:2]
    rope = None
    if cfg.positional == "rotary":
        ids = jnp.broadcast_to(jnp.arange(offset, offset + n, dtype=jnp.int32), (batch, n))
        rope = rope_tables(cfg.rope, ids)

    def at(tree, layer):
        return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, layer, 0, keepdims=False), tree)

    windows = None if cfg.layer_windows is None else jnp.asarray(cfg.layer_windows, jnp.int32)

    def run(layer, x, hook):
        block = nnx.merge(block_def, at(block_state, layer))
        window = None if windows is None else windows[layer]
        return block(x, hook, rope, None, window, None if prefix_kv is None else at(prefix_kv, layer))

    start = jnp.asarray(start, jnp.int32)
    x = run(start, resid, hook)
    return jax.lax.fori_loop(start + 1, cfg.n_layers, lambda l, x: run(l, x, _no_hook), x)


def final_logits(cfg: ModelConfig, params: Params, resid: Array) -> Array:
    """Residual after the last block [..., d_model] -> logits [..., d_vocab] (ln_final, unembed)."""
    model = bind(cfg, params)
    return model.unembed(model.ln_final(resid))
