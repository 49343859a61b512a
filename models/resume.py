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

Which configurations this mirrors exactly is `supports_resume(cfg)`: the suffix attention below
re-implements `common.Attention`'s plain causal attention (no sliding or LM-Infinite windows,
soft-caps, custom query scales or post-norms); callers fall back to a full forward otherwise.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcirc.models.common import Block, _no_hook, apply_rope, rope_tables
from jaxcirc.models.config import ModelConfig
from jaxcirc.models.transformer import Params, bind

Array = jax.Array

# ModelConfig fields the resumed blocks handle; every other field must keep its default.
_MIRRORED_FIELDS = frozenset({
    "family", "n_layers", "d_model", "n_heads", "d_head", "d_mlp", "d_vocab", "n_ctx", "n_kv_heads",
    "norm", "norm_eps", "activation", "gated_mlp", "parallel_residual", "positional", "rope",
    "tied_embeddings", "qkv_bias", "o_bias", "mlp_bias", "unembed_bias", "dtype", "initializer_range",
    # Inside the modules reused as they are (Norm, MLP, unembed) or before the first block.
    "norm_offset", "final_softcap", "embed_norm", "embed_scale",
})


def supports_resume(cfg: ModelConfig) -> bool:
    """Whether `run_from_layer` reproduces `cfg`'s forward exactly: plain causal attention with
    learned or rotary positions, and every switch outside `_MIRRORED_FIELDS` at its default."""
    if cfg.positional not in ("learned", "rotary") or (cfg.rope is not None and cfg.rope.interleaved):
        return False
    for field in dataclasses.fields(cfg):
        if field.name in _MIRRORED_FIELDS:
            continue
        default = field.default if field.default is not dataclasses.MISSING else None
        if getattr(cfg, field.name) != default:
            return False
    return True


def _attend(block: Block, q_in: Array, k_in: Array, v_in: Array, hook, rope, prefix_kv) -> Array:
    """`common.Attention` for queries at positions offset.. given keys/values of positions
    0..offset-1 (`prefix_kv`, each [batch, offset, kv_head, d_head], already rotated)."""
    attn, cfg = block.attn, block.cfg
    project = attn._project
    q = hook("attn.hook_q", project(q_in, attn.W_Q[...], None if attn.b_Q is None else attn.b_Q[...]))
    k = hook("attn.hook_k", project(k_in, attn.W_K[...], None if attn.b_K is None else attn.b_K[...]))
    v = hook("attn.hook_v", project(v_in, attn.W_V[...], None if attn.b_V is None else attn.b_V[...]))
    if rope is not None:
        q = hook("attn.hook_rot_q", apply_rope(q, *rope))
        k = hook("attn.hook_rot_k", apply_rope(k, *rope))
    k = jnp.concatenate([prefix_kv[0].astype(k.dtype), k], axis=1)
    v = jnp.concatenate([prefix_kv[1].astype(v.dtype), v], axis=1)
    batch, n_q = q.shape[:2]
    n_k = k.shape[1]
    qg = q.reshape(batch, n_q, cfg.n_kv_heads, cfg.group_size, cfg.d_head)
    scores = jnp.einsum("bqngd,bknd->bngqk", qg.astype(jnp.float32), k.astype(jnp.float32))
    scores = scores.reshape(batch, cfg.n_heads, n_q, n_k) / np.sqrt(cfg.d_head)
    # Query i of the suffix sits at absolute position offset + i.
    causal = jnp.arange(n_k)[None, :] <= jnp.arange(n_q)[:, None] + (n_k - n_q)
    scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min).astype(q.dtype)
    pattern = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(q.dtype)
    pg = pattern.reshape(batch, cfg.n_kv_heads, cfg.group_size, n_q, n_k)
    z = jnp.einsum("bngqk,bknd->bqngd", pg, v).reshape(batch, n_q, cfg.n_heads, cfg.d_head)
    z = hook("attn.hook_z", z)
    if hook is not _no_hook and hook.uses("attn.hook_result"):
        out = hook("attn.hook_result", jnp.einsum("bphd,hdm->bphm", z, attn.W_O[...])).sum(axis=2)
    else:
        out = jnp.einsum("bphd,hdm->bpm", z, attn.W_O[...])
    return out if attn.b_O is None else out + attn.b_O[...]


def _suffix_block(block: Block, x: Array, hook, rope, prefix_kv) -> Array:
    """`common.Block` over the suffix positions; the whole block when `prefix_kv` is None."""
    if prefix_kv is None:
        return block(x, hook, rope)
    resid_pre = hook("hook_resid_pre", x)
    attn_out = hook("hook_attn_out", _attend(block, *block._attention_inputs(resid_pre, hook), hook, rope, prefix_kv))
    if block.cfg.parallel_residual:
        mlp_in = hook("hook_mlp_in", resid_pre)
    else:
        resid_mid = hook("hook_resid_mid", resid_pre + attn_out)
        mlp_in = hook("hook_mlp_in", resid_mid)
    mlp_out = hook("hook_mlp_out", block.mlp(block.ln2(mlp_in, hook, "ln2"), hook))
    resid_post = (resid_pre + attn_out if block.cfg.parallel_residual else resid_mid) + mlp_out
    return hook("hook_resid_post", resid_post)


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
        raise ValueError("run_from_layer mirrors plain causal attention only; this configuration "
                         "(windows, soft-caps, post-norms, ...) needs a full forward.")
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

    def run(layer, x, hook):
        block = nnx.merge(block_def, at(block_state, layer))
        return _suffix_block(block, x, hook, rope, None if prefix_kv is None else at(prefix_kv, layer))

    start = jnp.asarray(start, jnp.int32)
    x = run(start, resid, hook)
    return jax.lax.fori_loop(start + 1, cfg.n_layers, lambda l, x: run(l, x, _no_hook), x)


def final_logits(cfg: ModelConfig, params: Params, resid: Array) -> Array:
    """Residual after the last block [..., d_model] -> logits [..., d_vocab] (ln_final, unembed)."""
    model = bind(cfg, params)
    return model.unembed(model.ln_final(resid))
