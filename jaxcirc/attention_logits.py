"""Pre-softmax attention logits from queries and keys, and logits at artificial distances.

    qk = cache_qk(model, tokens)                     # q/k before and after RoPE, [layer, batch, pos, head, d_head]
    w = logits_from_qk(qk.rot_q[3], qk.rot_k[3])     # [batch, head, q_pos, k_pos], == blocks.3.attn.hook_attn_scores
    m = dummy_distance_logits(q, keys, jnp.arange(256), model.config)   # [..., distance, key]

RoPE (HF rotate-half convention) rotates each pair (x_l, x_{l + rotary_dim/2}) by the angle
position * theta_l. Written as a complex number z_l = x_l + i x_{l + rotary_dim/2}, the rotated
pair is z_l e^{i position theta_l}, so

    (R_m q) . (R_n k) = sum_l Re(zq_l conj(zk_l) e^{i (m - n) theta_l}) + q_pass . k_pass

depends on the positions only through the relative distance m - n. That is what lets the logit of
any query/key pair be evaluated at any distance d from the pre-RoPE vectors alone. GPT-J's
interleaved rotary pairs (x_2l, x_2l+1) instead; the same holds. Logits are scaled as the model
scales them (1/sqrt(d_head) or `cfg.query_scale`) and soft-capped where it caps them (Gemma 2), so
they are the scores its softmax sees.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcirc.hooks import Hooks
from jaxcirc.sharding import shard_batch, shard_params
from jaxcirc.models.common import rope_inverse_frequencies
from jaxcirc.models.config import ModelConfig

Array = jax.Array

# The fill the core attention uses above the diagonal (models/common.py): float32 min, not -inf.
MASKED = float(np.finfo(np.float32).min)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QK:
    """Queries and keys of every requested layer, stacked on a leading layer axis.

    q, rot_q: [layer, batch, pos, head, d_head]; k, rot_k: [layer, batch, pos, kv_head, d_head].
    `q`/`k` are before RoPE (`attn.hook_q|hook_k`), `rot_q`/`rot_k` after (`attn.hook_rot_q|rot_k`);
    for a model without rotary embeddings they are the same arrays.
    """

    q: Array
    k: Array
    rot_q: Array
    rot_k: Array


def _check_rotary(cfg: ModelConfig) -> None:
    if cfg.positional != "rotary":
        raise ValueError(
            f"This analysis needs a rotary (RoPE) model; {cfg.family} uses {cfg.positional!r} position "
            "embeddings, so its logits have no relative-distance rotation to decompose."
        )


def _layers(cfg: ModelConfig, layers: Any) -> list[int]:
    if layers is None:
        return list(range(cfg.n_layers))
    layers = [int(l) for l in np.atleast_1d(layers)]
    bad = [l for l in layers if not 0 <= l < cfg.n_layers]
    if bad:
        raise ValueError(f"Layers {bad} are out of range for a model with {cfg.n_layers} layers (0..{cfg.n_layers - 1}).")
    return layers


def qk_cache_names(cfg: ModelConfig, layers: Any = None) -> tuple[str, ...]:
    """Hook point names holding the pre- and post-RoPE queries and keys of `layers` (default all)."""
    templates = ["attn.hook_q", "attn.hook_k"]
    if cfg.positional == "rotary":
        templates += ["attn.hook_rot_q", "attn.hook_rot_k"]
    return tuple(f"blocks.{l}.{t}" for l in _layers(cfg, layers) for t in templates)


def stack_qk(cfg: ModelConfig, cache: dict[str, Array], layers: Any = None) -> QK:
    """Gather a forward cache (names from `qk_cache_names`) into a `QK` with a leading layer axis."""
    layers = _layers(cfg, layers)
    rotary = cfg.positional == "rotary"

    def get(template: str) -> Array:
        missing = [l for l in layers if f"blocks.{l}.{template}" not in cache]
        if missing:
            raise KeyError(f"The cache has no blocks.L.{template} for layers {missing}; run the forward with "
                           "cache=qk_cache_names(cfg, layers).")
        return jnp.stack([cache[f"blocks.{l}.{template}"] for l in layers])

    q, k = get("attn.hook_q"), get("attn.hook_k")
    return QK(q=q, k=k, rot_q=get("attn.hook_rot_q") if rotary else q, rot_k=get("attn.hook_rot_k") if rotary else k)


def cache_qk(model, tokens: Array, *, params: dict | None = None, layers: Any = None,
             position_ids: Array | None = None, mesh: Any = None) -> QK:
    """Run `model` (a `jaxcirc.Model`) on tokens [batch, pos] and return its queries and keys.

    Only the logits of the first position are unembedded (nothing here needs the others).
    `mesh` (`jaxcirc.sharding.make_mesh`): the batch over `data` (it must divide), weights over
    `model`; the q/k come back sharded along their batch axis."""
    cfg = model.config
    params = model.params if params is None else params
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim == 1:
        tokens = tokens[None]
    logits_at = jnp.zeros(tokens.shape[0], jnp.int32)
    if mesh is not None:
        params = shard_params(params, mesh, cfg)
        tokens, position_ids, logits_at = shard_batch((tokens, position_ids, logits_at), mesh)
    hooks = Hooks(cache=qk_cache_names(cfg, layers))
    _, cache = model.forward(params, tokens, hooks, position_ids=position_ids, logits_at=logits_at)
    return stack_qk(cfg, cache, layers)


def expand_kv(k: Array, n_heads: int, head_axis: int = -2) -> Array:
    """Repeat kv heads so query head h meets kv head h // (n_heads // n_kv_heads) (HF repeat_kv)."""
    n_kv = k.shape[head_axis]
    if n_heads % n_kv:
        raise ValueError(f"{n_heads} query heads cannot share {n_kv} kv heads evenly.")
    return jnp.repeat(k, n_heads // n_kv, axis=head_axis)


def scale_logits(dots: Array, cfg: ModelConfig | None, d_head: int) -> Array:
    """q . k -> the model's logit: times `cfg.query_scale` (default 1/sqrt(d_head)), then its soft
    cap (Gemma 2: cap * tanh(s / cap)); 1/sqrt(d_head) alone without a config."""
    scale = cfg.query_scale if cfg is not None and cfg.query_scale is not None else 1.0 / np.sqrt(d_head)
    logits = dots * np.float32(scale)
    if cfg is not None and cfg.attn_softcap is not None:
        logits = cfg.attn_softcap * jnp.tanh(logits / cfg.attn_softcap)
    return logits


def logits_from_qk(rot_q: Array, rot_k: Array, *, causal: bool = True, fill: float = MASKED,
                   cfg: ModelConfig | None = None) -> Array:
    """Pre-softmax logits from post-RoPE queries and keys.

    rot_q [..., q_pos, head, d_head], rot_k [..., k_pos, kv_head, d_head] -> [..., head, q_pos, k_pos],
    scaled as `cfg`'s attention scales them (`scale_logits`; 1/sqrt(d_head) without `cfg`). With
    `causal`, entries above the diagonal (key after query, positions aligned at the end) are set
    to `fill` (the model's float32 min; pass jnp.nan to drop them).
    """
    n_heads, d_head = rot_q.shape[-2], rot_q.shape[-1]
    k = expand_kv(rot_k, n_heads)
    w = scale_logits(jnp.einsum("...qhd,...khd->...hqk", rot_q.astype(jnp.float32), k.astype(jnp.float32)), cfg, d_head)
    if causal:
        nq, nk = w.shape[-2:]
        allowed = jnp.arange(nk)[None, :] <= jnp.arange(nq)[:, None] + (nk - nq)
        w = jnp.where(allowed, w, jnp.asarray(fill, w.dtype))
    return w


def attention_logits(model, tokens: Array, *, params: dict | None = None, layers: Any = None,
                     causal: bool = True, fill: float = MASKED, mesh: Any = None) -> Array:
    """Pre-softmax logits of every layer and head: [layer, batch, head, q_pos, k_pos]
    (`mesh`: see `cache_qk`)."""
    qk = cache_qk(model, tokens, params=params, layers=layers, mesh=mesh)
    return logits_from_qk(qk.rot_q, qk.rot_k, causal=causal, fill=fill, cfg=model.config)


def inverse_frequencies(cfg: ModelConfig) -> np.ndarray:
    """theta_l of each rotary pair l, [rotary_dim / 2] (with the model's RoPE scaling applied)."""
    _check_rotary(cfg)
    return rope_inverse_frequencies(cfg.rope)


def phasors(x: Array, cfg: ModelConfig) -> tuple[Array, Array]:
    """Split [..., d_head] into the rotary pairs as complex numbers [..., rotary_dim/2] and the
    unrotated rest [..., d_head - rotary_dim]: z_l = x_l + i x_{l + rotary_dim/2}, or with
    interleaved rotary (GPT-J) z_l = x_2l + i x_2l+1."""
    rot = cfg.rope.rotary_dim
    x = x.astype(jnp.float32)
    if cfg.rope.interleaved:
        return jax.lax.complex(x[..., 0:rot:2], x[..., 1:rot:2]), x[..., rot:]
    return jax.lax.complex(x[..., :rot // 2], x[..., rot // 2:rot]), x[..., rot:]


def rotate(x: Array, positions: Array, cfg: ModelConfig) -> Array:
    """Apply RoPE at `positions` (broadcast against x[..., 0]) to pre-RoPE vectors x [..., d_head]."""
    inv = jnp.asarray(inverse_frequencies(cfg))
    z, rest = phasors(x, cfg)
    angle = jnp.asarray(positions, jnp.float32)[..., None] * inv
    z = z * jax.lax.complex(jnp.cos(angle), jnp.sin(angle))
    if cfg.rope.interleaved:
        pairs = jnp.stack([jnp.real(z), jnp.imag(z)], axis=-1).reshape(z.shape[:-1] + (-1,))
        return jnp.concatenate([pairs, rest], axis=-1)
    return jnp.concatenate([jnp.real(z), jnp.imag(z), rest], axis=-1)


def logits_at_distance(q: Array, k: Array, distance: Array, cfg: ModelConfig) -> Array:
    """The logit (R_m q) . (R_n k), scaled as the model does (`scale_logits`), for pre-RoPE
    q [..., d_head], k [..., d_head] at relative distance d = m - n (all three broadcast against
    each other) -> [...]."""
    inv = jnp.asarray(inverse_frequencies(cfg))
    zq, pq = phasors(q, cfg)
    zk, pk = phasors(k, cfg)
    angle = jnp.asarray(distance, jnp.float32)[..., None] * inv
    rotated = jnp.real(zq * jnp.conj(zk) * jax.lax.complex(jnp.cos(angle), jnp.sin(angle))).sum(-1)
    return scale_logits(rotated + (pq * pk.astype(jnp.float32)).sum(-1), cfg, q.shape[-1])


@functools.partial(jax.jit, static_argnames=("cfg",))
def dummy_distance_logits(q: Array, keys: Array, distances: Array, cfg: ModelConfig) -> Array:
    """M[d, j] = the logit of q against k_j at distance distances[d] (as `logits_at_distance`): a
    fixed query against every key placed at every artificial distance, so that position and
    content are decoupled.

    q [..., d_head], keys [..., n_keys, d_head], distances [D] -> [..., D, n_keys].
    """
    inv = jnp.asarray(inverse_frequencies(cfg))
    zq, pq = phasors(q, cfg)
    zk, pk = phasors(keys, cfg)
    angle = jnp.asarray(distances, jnp.float32)[:, None] * inv  # [D, pairs]
    spin = jax.lax.complex(jnp.cos(angle), jnp.sin(angle))
    # sum_l Re(zq_l conj(zk_jl) e^{i d theta_l}), as a product of [D, l] and [j, l] per query.
    cross = zq[..., None, :] * jnp.conj(zk)  # [..., n_keys, pairs]
    rotated = jnp.real(jnp.einsum("...jl,dl->...dj", cross, spin))
    rest = jnp.einsum("...r,...jr->...j", pq, pk.astype(jnp.float32))[..., None, :]
    return scale_logits(rotated + rest, cfg, q.shape[-1])
