"""Resuming a forward pass part-way: from a dynamic start layer, over suffixes of positions.

An intervention at layer l, position p leaves the residual before layer l unchanged and, with
causal attention, every position < p unchanged at every layer. So an intervened run can start
from the unintervened run's residual at layer l, recompute only positions >= p, and read the
keys/values of the earlier positions from the unintervened run. Two such suffixes, from p and
from a partner position, fill one row exactly (`packed_pair`): n_pos + 1 slots pairing p with
n_pos - 1 - p when n_pos is even, n_pos slots pairing p with n_pos - p (position 0 alone) when it
is odd (`pair_slots`), so a sweep over positions recomputes what it must and nothing else, in rows
of equal length. When the intervened and unintervened inputs share their first `shared` tokens
and the intervention writes the other run's activations there (activation patching between
minimal pairs), positions < shared cannot change either: rows then hold only positions >= shared
(`suffix(n_pos, shared)`, or two suffixes in `pair_slots(n_pos, shared)` slots:
`packed_pair(n_pos, p, shared)`):

    packing = packed_pair(n_pos, p)
    x = run_from_layer(cfg, params, resid_pre[start][:, packing.positions], start, hook,
                       packing=packing, prefix_kv=(k, v), query_at=slots_of_metric_positions)
    logits = final_logits(cfg, params, x[:, segment])

`start` is a traced int32 scalar (one compiled program serves every start layer): the remaining
layers run in a `fori_loop` that slices the stacked block parameters dynamically. Only the start
block sees `hook` (the intervention); the later blocks run unhooked. With `query_at` the last
block computes keys and values everywhere but queries, attention and MLP only where a metric reads.

The blocks are `common.Block` itself, given the earlier positions' keys and values and a mask;
what it cannot resume is `supports_resume(cfg)` False: ALiBi and LM-Infinite's distance cap need
the position ids of every key. Callers fall back to a full forward then.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcirc.models.common import _no_hook, attention_mask, rope_tables
from jaxcirc.models.config import ModelConfig
from jaxcirc.models.transformer import Params, bind

Array = jax.Array


def supports_resume(cfg: ModelConfig) -> bool:
    """Whether `run_from_layer` reproduces `cfg`'s forward exactly (index-based attention masks)."""
    window = cfg.attention_window
    return cfg.positional != "alibi" and (window is None or window.max_distance is None)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Packing:
    """Which token position each slot of a resumed row holds, each [n_slots] int32.

    positions: the slot's token position; segment: which suffix it belongs to; segment_start: the
    first position of that suffix. A slot attends to the unintervened run's keys (`prefix_kv`) at
    positions before its segment's start and to its own segment's slots up to its position.
    """

    positions: Array
    segment: Array
    segment_start: Array


def suffix(n_pos: int, first: int = 0) -> Packing:
    """One segment: the positions first..n_pos-1 in order (n_pos - first slots; `first` static)."""
    positions = jnp.arange(first, n_pos, dtype=jnp.int32)
    return Packing(positions, jnp.zeros_like(positions), jnp.full_like(positions, first))


def pair_slots(n_pos: int, shared: int = 0) -> int:
    """Slots of a packed row: the n_pos - shared positions a row may recompute, rounded up to odd.
    The suffixes from p and from its partner fill them exactly, and with an odd count no position
    is its own partner (which would leave half a row empty)."""
    return (n_pos - shared) | 1


def partner_position(n_pos: int, first: Array | np.ndarray | int, shared: int = 0) -> Array | np.ndarray | int:
    """The position whose suffix shares a packed row with the suffix from `first` (n_pos: none)."""
    return 2 * n_pos - pair_slots(n_pos, shared) - first


def packed_pair(n_pos: int, first: Array, shared: int = 0) -> Packing:
    """Two suffixes in S = pair_slots(n_pos, shared) slots: positions first..n_pos-1 (segment 0),
    then partner..n_pos-1 with partner = 2 n_pos - S - first (segment 1, empty when partner is
    n_pos), for shared <= first <= partner. Position q sits in slot q - first (segment 0) and
    q - n_pos + S (segment 1). `first` may be traced; `shared` (positions no row recomputes) is static."""
    n_slots = pair_slots(n_pos, shared)
    slot = jnp.arange(n_slots, dtype=jnp.int32)
    second = slot >= n_pos - first
    return Packing(jnp.where(second, slot + n_pos - n_slots, first + slot), second.astype(jnp.int32),
                   jnp.where(second, partner_position(n_pos, first, shared), first).astype(jnp.int32))


def key_mask(cfg: ModelConfig, packing: Packing, n_prefix: int, local_window: Array | None = None) -> Array:
    """[n_slots, n_prefix + n_slots] bool: the keys each slot reads, the unintervened run's first
    (positions 0..n_prefix-1), then the slots'; causal and windowed by token position."""
    prefix = jnp.arange(n_prefix, dtype=jnp.int32)
    allowed = attention_mask(cfg, packing.positions, jnp.concatenate([prefix, packing.positions]), local_window)
    earlier = prefix[None, :] < packing.segment_start[:, None]
    same = packing.segment[None, :] == packing.segment[:, None]
    return allowed & jnp.concatenate([earlier, same], axis=1)


def run_from_layer(cfg: ModelConfig, params: Params, resid: Array, start: Array, hook=_no_hook, *,
                   packing: Packing | None = None, prefix_kv: tuple[Array, Array] | None = None,
                   query_at: Array | None = None, start_z: Array | None = None) -> Array:
    """Run blocks start..n_layers-1 on resid [batch, n, d_model], the residual before block
    `start` at the slots of `packing` (default: positions 0..n-1). Returns the residual after the
    last block [batch, n, d_model] (before ln_final), or with `query_at` [batch, k] (slot
    indices) only there: [batch, k, d_model].

    start: int32 scalar, may be traced. hook: applied in block `start` only (a HookContext whose
    plan has the row's shapes). prefix_kv: the unintervened run's rotated keys and values for
    every layer, each [layer, batch, n_prefix, kv_head, d_head], read where `packing` allows.
    query_at: the last block then computes keys and values at every slot but the rest (queries,
    attention, MLP) only at `query_at`, which is all a metric read there needs.
    start_z: [batch, n, head, d_head] the unintervened run's head outputs (attn.hook_z) in block
    `start` at the row's slots, when `hook` intervenes at hook_z or later there: that block then
    skips its queries, keys, values and pattern, which the intervention cannot change.
    """
    if not supports_resume(cfg):
        raise ValueError("run_from_layer cannot resume ALiBi or LM-Infinite's distance cap (they need "
                         "every key's position id); run a full forward.")
    model = bind(cfg, params)
    block_def, block_state = nnx.split(model.blocks)
    batch, n = resid.shape[:2]
    packing = suffix(n) if packing is None else packing
    n_prefix = 0 if prefix_kv is None else prefix_kv[0].shape[2]
    rope = None
    if cfg.positional == "rotary":
        rope = rope_tables(cfg.rope, jnp.broadcast_to(packing.positions, (batch, n)))
    windows = None if cfg.layer_windows is None else jnp.asarray(cfg.layer_windows, jnp.int32)

    def at(tree, layer):
        return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, layer, 0, keepdims=False), tree)

    def mask_at(layer):
        return key_mask(cfg, packing, n_prefix, None if windows is None else windows[layer])

    def run(layer, x, hook, z=None):
        block = nnx.merge(block_def, at(block_state, layer))
        if z is not None:
            return block(x, hook, z=z)
        return block(x, hook, rope, None, None, None if prefix_kv is None else at(prefix_kv, layer), mask_at(layer))

    start = jnp.asarray(start, jnp.int32)
    x = run(start, resid, hook, start_z)
    last = cfg.n_layers - 1
    if query_at is None:
        return jax.lax.fori_loop(start + 1, cfg.n_layers, lambda l, x: run(l, x, _no_hook), x)
    x = jax.lax.fori_loop(start + 1, last, lambda l, x: run(l, x, _no_hook), x)
    rows = jnp.arange(batch)[:, None]

    def last_block_at_queries(x: Array) -> Array:
        block = nnx.merge(block_def, at(block_state, last))
        keys, values = block.keys_values(x, rope)
        if prefix_kv is not None:
            earlier_k, earlier_v = at(prefix_kv, last)
            keys = jnp.concatenate([earlier_k.astype(keys.dtype), keys], axis=1)
            values = jnp.concatenate([earlier_v.astype(values.dtype), values], axis=1)
        query_rope = None if rope is None else tuple(t[rows, query_at] for t in rope)
        # The queries' own keys, which the block appends, are copies of slots in `keys`: masked.
        mask = mask_at(last)[query_at]
        mask = jnp.concatenate([mask, jnp.zeros(mask.shape[:2] + (query_at.shape[1],), bool)], axis=-1)
        return block(x[rows, query_at], _no_hook, query_rope, None, None, (keys, values), mask)

    # A patch in the last block has already run it at every slot.
    return jax.lax.cond(start == last, lambda x: x[rows, query_at], last_block_at_queries, x)


def final_logits(cfg: ModelConfig, params: Params, resid: Array, columns: Array | None = None) -> Array:
    """Residual after the last block [batch, d_model] -> logits [batch, d_vocab] (ln_final,
    unembed), or only the token ids `columns` [batch, k] of each row: [batch, k]."""
    model = bind(cfg, params)
    return model.unembed(model.ln_final(resid), columns)
