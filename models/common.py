"""Layers shared by every family: norms, rotary embeddings, attention, MLPs and the block.

Each layer takes a `hook` callable (`jaxcirc.hook_plan.HookContext`) and passes every
TransformerLens hook point through it: `x = hook("attn.hook_z", x)`. Weights use
TransformerLens' per-head layout (`W_Q [d_model, head, d_head]`, `W_O [head, d_head, d_model]`)
so per-head quantities are one einsum away.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcirc.models.activations import activation
from jaxcirc.models.config import ModelConfig, RopeConfig

Array = jax.Array


def _normal(rngs: nnx.Rngs, shape, cfg: ModelConfig) -> nnx.Param:
    return nnx.Param(cfg.initializer_range * jax.random.normal(rngs.params(), shape, jnp.dtype(cfg.dtype)))


def _zeros(shape, cfg: ModelConfig) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, jnp.dtype(cfg.dtype)))


def _ones(shape, cfg: ModelConfig) -> nnx.Param:
    return nnx.Param(jnp.ones(shape, jnp.dtype(cfg.dtype)))


def _no_hook(name: str, x: Array) -> Array:
    return x


class Norm(nnx.Module):
    """LayerNorm or RMSNorm, computed in float32. Hooks: `{prefix}.hook_scale`, `.hook_normalized`.

    The scale is `cfg.norm_offset + w` (Gemma's RMSNorm stores w with scale 1 + w)."""

    def __init__(self, cfg: ModelConfig):
        self.kind = cfg.norm
        self.eps = cfg.norm_eps
        self.offset = cfg.norm_offset
        self.w = _ones((cfg.d_model,), cfg)
        self.b = _zeros((cfg.d_model,), cfg) if cfg.norm == "layernorm" else None

    def __call__(self, x: Array, hook=_no_hook, prefix: str = "") -> Array:
        """x: [..., d_model] -> [..., d_model]."""
        dtype = x.dtype
        x = x.astype(jnp.float32)
        if self.kind == "layernorm":
            x = x - x.mean(-1, keepdims=True)
        scale = hook(f"{prefix}.hook_scale", jnp.sqrt((x * x).mean(-1, keepdims=True) + self.eps))
        w = self.w[...].astype(jnp.float32)
        # The offset is added in float32, as HF's Gemma does: a bf16 (1 + w) would lose w's low bits.
        out = x / scale * (w if self.offset == 0 else self.offset + w)
        if self.b is not None:
            out = out + self.b[...].astype(jnp.float32)
        return hook(f"{prefix}.hook_normalized", out.astype(dtype))


def rope_inverse_frequencies(rope: RopeConfig) -> np.ndarray:
    """[rotary_dim / 2] float32 inverse frequencies, with linear or llama3 scaling applied."""
    dim = rope.rotary_dim
    inv_freq = (1.0 / (rope.theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))).astype(np.float32)
    if rope.scaling is None:
        return inv_freq
    kind = rope.scaling[0]
    if kind == "linear":
        return (inv_freq / rope.scaling[1]).astype(np.float32)
    if kind == "llama3":
        factor, low_freq_factor, high_freq_factor, old_context = rope.scaling[1:]
        low_freq_wavelen = old_context / low_freq_factor
        high_freq_wavelen = old_context / high_freq_factor
        wavelen = 2 * np.pi / inv_freq
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return np.where(is_medium, smoothed, scaled).astype(np.float32)
    raise ValueError(f"Unsupported rope scaling {kind!r}; supported: linear, llama3.")


def rope_tables(rope: RopeConfig, position_ids: Array) -> tuple[Array, Array]:
    """cos, sin of shape [batch, pos, rotary_dim] for integer `position_ids` [batch, pos]; the
    frequencies are laid out as the pairs `apply_rope` rotates (halves, or interleaved)."""
    freqs = position_ids.astype(jnp.float32)[..., None] * jnp.asarray(rope_inverse_frequencies(rope))
    if rope.interleaved:
        angles = jnp.repeat(freqs, 2, axis=-1)
    else:
        angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Array, cos: Array, sin: Array, interleaved: bool = False) -> Array:
    """Rotate the first rotary_dim dims of x [batch, pos, head, d_head]: pairs (i, i + rotary_dim/2)
    (HF's rotate-half) or, `interleaved`, pairs (2i, 2i + 1) (GPT-J's rotate-every-two)."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    if interleaved:
        rotated = jnp.stack([-x_rot[..., 1::2], x_rot[..., 0::2]], axis=-1).reshape(x_rot.shape)
    else:
        half = rot // 2
        rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return jnp.concatenate([x_rot * cos + rotated * sin, x_pass], axis=-1)


def attention_mask(cfg: ModelConfig, query_positions: Array, key_positions: Array,
                   local_window: Array | None = None) -> Array:
    """[..., n_q, n_k] bool: may a query at `query_positions` [..., n_q] attend to a key at
    `key_positions` [..., n_k] (token positions). Causal, narrowed by `cfg.attention_window`
    (global prefix + local window) and by a layer's sliding `local_window` (0 = unlimited)."""
    i = jnp.asarray(query_positions)[..., :, None]
    j = jnp.asarray(key_positions)[..., None, :]
    allowed = j <= i
    window = cfg.attention_window
    if window is not None:
        allowed &= (i - j < window.n_local) | (j < window.n_global)
    if local_window is not None:
        allowed &= (i - j < local_window) | (local_window <= 0)
    return allowed


def causal_mask(cfg: ModelConfig, n_q: int, local_window: Array | None = None, n_k: int | None = None) -> Array:
    """[n_q, n_k] `attention_mask` for queries at the last n_q of n_k positions (n_k defaults to n_q)."""
    n_k = n_q if n_k is None else n_k
    return attention_mask(cfg, jnp.arange(n_q) + (n_k - n_q), jnp.arange(n_k), local_window)


def alibi_slopes(n_heads: int) -> np.ndarray:
    """[head] float32 ALiBi slopes (Press et al. 2022): 2^(-8 i / n) for i = 1..n when n is a power
    of two; otherwise those of the largest power of two below n, then every other slope of twice
    that many heads (as BLOOM computes them)."""
    n = 2 ** int(np.floor(np.log2(n_heads)))
    base = np.float32(2.0 ** (-(2.0 ** -(np.log2(n) - 3))))
    slopes = np.power(base, np.arange(1, n + 1, dtype=np.float32))
    if n < n_heads:
        extra_base = np.float32(2.0 ** (-(2.0 ** -(np.log2(2 * n) - 3))))
        extra = np.power(extra_base, np.arange(1, 1 + 2 * (n_heads - n), 2, dtype=np.float32))
        slopes = np.concatenate([slopes, extra])
    return slopes.astype(np.float32)


def alibi_bias(n_heads: int, position_ids: Array) -> Array:
    """[batch, head, q_pos, k_pos] float32 bias slope_h * (pos_k - pos_q) for `position_ids`
    [batch, pos]. BLOOM adds slope_h * pos_k instead, which differs by a constant per query row,
    so the softmax (the pattern) is the same; the relative form keeps scores independent of where
    the sequence starts."""
    pos = position_ids.astype(jnp.float32)
    distance = pos[:, None, None, :] - pos[:, None, :, None]
    return jnp.asarray(alibi_slopes(n_heads))[None, :, None, None] * distance


class Attention(nnx.Module):
    """Causal multi-head attention with grouped-query key/value heads and optional rotary or
    ALiBi position information, optional logit soft-capping (Gemma 2)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, h, kv, dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head
        self.cfg = cfg
        self.W_Q = _normal(rngs, (d, h, dh), cfg)
        self.W_K = _normal(rngs, (d, kv, dh), cfg)
        self.W_V = _normal(rngs, (d, kv, dh), cfg)
        self.W_O = _normal(rngs, (h, dh, d), cfg)
        self.b_Q = _zeros((h, dh), cfg) if cfg.qkv_bias else None
        self.b_K = _zeros((kv, dh), cfg) if cfg.qkv_bias else None
        self.b_V = _zeros((kv, dh), cfg) if cfg.qkv_bias else None
        self.b_O = _zeros((d,), cfg) if cfg.o_bias else None

    @staticmethod
    def _project(x: Array, w: Array, b: Array | None) -> Array:
        # x is either the shared residual [b, p, d] or a per-head input [b, p, n, d].
        spec = "bpd,dnk->bpnk" if x.ndim == 3 else "bpnd,dnk->bpnk"
        out = jnp.einsum(spec, x, w)
        return out if b is None else out + b

    def keys_values(self, k_in: Array, v_in: Array, rope: tuple[Array, Array] | None = None,
                    hook=_no_hook) -> tuple[Array, Array, Array]:
        """Keys before rotation, rotated keys and values, each [batch, pos, kv_head, d_head]."""
        k = hook("attn.hook_k", self._project(k_in, self.W_K[...], None if self.b_K is None else self.b_K[...]))
        v = hook("attn.hook_v", self._project(v_in, self.W_V[...], None if self.b_V is None else self.b_V[...]))
        if rope is None:
            return k, k, v
        return k, hook("attn.hook_rot_k", apply_rope(k, *rope, interleaved=self.cfg.rope.interleaved)), v

    def _scores(self, q: Array, k: Array) -> Array:
        """q [batch, q_pos, head, d_head], k [batch, k_pos, kv_head, d_head] -> float32 scaled logits
        [batch, head, q_pos, k_pos]."""
        cfg = self.cfg
        batch, n_q = q.shape[:2]
        # Query head n*g + i reads kv head n (HF's repeat_kv order).
        qg = q.reshape(batch, n_q, cfg.n_kv_heads, cfg.group_size, cfg.d_head)
        scores = jnp.einsum("bqngd,bknd->bngqk", qg.astype(jnp.float32), k.astype(jnp.float32))
        scores = scores.reshape(batch, cfg.n_heads, n_q, k.shape[1])
        scores = scores / np.sqrt(cfg.d_head) if cfg.query_scale is None else scores * np.float32(cfg.query_scale)
        if cfg.attn_softcap is not None:  # Gemma 2: cap * tanh(s / cap)
            scores = cfg.attn_softcap * jnp.tanh(scores / cfg.attn_softcap)
        return scores

    def __call__(self, q_in: Array, k_in: Array, v_in: Array, hook=_no_hook,
                 rope: tuple[Array, Array] | None = None, position_ids: Array | None = None,
                 local_window: Array | None = None, prefix_kv: tuple[Array, Array] | None = None,
                 mask: Array | None = None) -> Array:
        """Inputs [batch, pos, d_model] (or per head [batch, pos, head, d_model]) -> [batch, pos, d_model].

        `position_ids` [batch, pos] are needed only for a distance cap (`cfg.attention_window`) and
        ALiBi (default 0..pos-1); `local_window` is this layer's sliding window (int scalar, 0 = full
        attention). hook_attn_scores are the logits the softmax sees: scaled, soft-capped, plus
        ALiBi's slope_h * (pos_k - pos_q), masked entries at float32 min.

        `prefix_kv`: rotated keys and values of earlier positions, each [batch, offset, kv_head,
        d_head]; the inputs are then the positions after them (resuming a forward part-way, as
        `models.resume` does; not with ALiBi or a distance cap). `mask` [q_pos, k_pos] or [batch,
        q_pos, k_pos] replaces the causal / window mask over the (prefix + own) keys when the keys
        are not simply the positions before each query (`models.resume` packs suffixes)."""
        cfg = self.cfg
        q = hook("attn.hook_q", self._project(q_in, self.W_Q[...], None if self.b_Q is None else self.b_Q[...]))
        k_pre, k, v = self.keys_values(k_in, v_in, rope, hook)
        q_pre = q
        if rope is not None:
            q = hook("attn.hook_rot_q", apply_rope(q, *rope, interleaved=cfg.rope.interleaved))
        if prefix_kv is not None:
            if cfg.positional == "alibi" or (cfg.attention_window and cfg.attention_window.max_distance is not None):
                raise ValueError("prefix_kv needs index-based masks; ALiBi and distance caps need every position id.")
            k = jnp.concatenate([prefix_kv[0].astype(k.dtype), k], axis=1)
            v = jnp.concatenate([prefix_kv[1].astype(v.dtype), v], axis=1)
        batch, pos = q.shape[:2]
        n_k = k.shape[1]
        g = cfg.group_size
        scores = self._scores(q, k)
        allowed = causal_mask(cfg, pos, local_window, n_k) if mask is None else mask
        if allowed.ndim == 3:  # per example: [batch, q_pos, k_pos]
            allowed = allowed[:, None]
        window = cfg.attention_window
        if window is not None and window.max_distance is not None:
            # Rotary logits depend on the distance only: q rotated by the cap against an unrotated
            # k is the logit of any pair at distance max_distance.
            cap = jnp.full((batch, pos), window.max_distance, jnp.int32)
            capped = self._scores(apply_rope(q_pre, *rope_tables(cfg.rope, cap), cfg.rope.interleaved), k_pre)
            distance = position_ids[:, :, None] - position_ids[:, None, :]
            scores = jnp.where((distance > window.max_distance)[:, None], capped, scores)
        if cfg.positional == "alibi":
            positions = jnp.arange(pos)[None] if position_ids is None else position_ids
            scores = scores + alibi_bias(cfg.n_heads, positions)
        scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
        scores = hook("attn.hook_attn_scores", scores.astype(q.dtype))
        pattern = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
        pattern = hook("attn.hook_pattern", pattern.astype(q.dtype))
        pg = pattern.reshape(batch, cfg.n_kv_heads, g, pos, n_k)
        z = jnp.einsum("bngqk,bknd->bqngd", pg, v).reshape(batch, pos, cfg.n_heads, cfg.d_head)
        return self.output(z, hook)

    def output(self, z: Array, hook=_no_hook) -> Array:
        """The heads' outputs z [batch, pos, head, d_head] (hooked) -> [batch, pos, d_model]."""
        z = hook("attn.hook_z", z)
        if hook is not _no_hook and hook.uses("attn.hook_result"):
            result = hook("attn.hook_result", jnp.einsum("bphd,hdm->bphm", z, self.W_O[...]))
            out = result.sum(axis=2)
        else:
            out = jnp.einsum("bphd,hdm->bpm", z, self.W_O[...])
        return out if self.b_O is None else out + self.b_O[...]


class MLP(nnx.Module):
    """Plain (act(x W_in) W_out) or gated (act(x W_gate) * (x W_in)) W_out feed-forward."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, m = cfg.d_model, cfg.d_mlp
        self.activation = cfg.activation
        self.W_in = _normal(rngs, (d, m), cfg)
        self.W_gate = _normal(rngs, (d, m), cfg) if cfg.gated_mlp else None
        self.W_out = _normal(rngs, (m, d), cfg)
        self.b_in = _zeros((m,), cfg) if cfg.mlp_bias else None
        self.b_gate = _zeros((m,), cfg) if cfg.mlp_bias and cfg.gated_mlp else None
        self.b_out = _zeros((d,), cfg) if cfg.mlp_bias else None

    @staticmethod
    def _linear(x: Array, w, b) -> Array:
        out = x @ w[...]
        return out if b is None else out + b[...]

    def __call__(self, x: Array, hook=_no_hook) -> Array:
        """x: [batch, pos, d_model] -> [batch, pos, d_model]."""
        if self.W_gate is not None:
            pre = hook("mlp.hook_pre", self._linear(x, self.W_gate, self.b_gate))
            linear = hook("mlp.hook_pre_linear", self._linear(x, self.W_in, self.b_in))
            post = activation(self.activation, pre) * linear
        else:
            pre = hook("mlp.hook_pre", self._linear(x, self.W_in, self.b_in))
            post = activation(self.activation, pre)
        post = hook("mlp.hook_post", post)
        return self._linear(post, self.W_out, self.b_out)


_PER_HEAD_INPUTS = ("hook_q_input", "hook_k_input", "hook_v_input")


class Block(nnx.Module):
    """One transformer block: sequential (GPT-2, Llama) or parallel residual (GPT-NeoX/Pythia,
    GPT-J with one norm for both), with optional norms on the attention and MLP outputs (Gemma 2)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.ln1 = Norm(cfg)
        self.attn = Attention(cfg, rngs)
        self.ln1_post = Norm(cfg) if cfg.post_norms else None
        # shared_norm: the MLP reads ln1's weights (hooked under ln2.*, as TransformerLens does).
        self.ln2 = None if cfg.shared_norm else Norm(cfg)
        self.mlp = MLP(cfg, rngs)
        self.ln2_post = Norm(cfg) if cfg.post_norms else None

    def _attention_inputs(self, resid: Array, hook) -> tuple[Array, Array, Array]:
        """Normalised q/k/v inputs; per head ([batch, pos, head, d_model]) when a hook asks for it."""
        cfg = self.cfg
        if hook is _no_hook or not any(hook.uses(t) for t in _PER_HEAD_INPUTS):
            normed = self.ln1(resid, hook, "ln1")
            return normed, normed, normed
        heads = {"hook_q_input": cfg.n_heads, "hook_k_input": cfg.n_kv_heads, "hook_v_input": cfg.n_kv_heads}
        inputs = []
        for name, n in heads.items():
            per_head = jnp.broadcast_to(resid[:, :, None, :], resid.shape[:2] + (n, cfg.d_model))
            inputs.append(self.ln1(hook(name, per_head)))
        return tuple(inputs)

    def keys_values(self, resid: Array, rope: tuple[Array, Array] | None = None) -> tuple[Array, Array]:
        """Rotated keys and values [batch, pos, kv_head, d_head] this block's attention reads from the
        residual [batch, pos, d_model] (unhooked)."""
        normed = self.ln1(resid)
        return self.attn.keys_values(normed, normed, rope)[1:]

    def __call__(self, x: Array, hook=_no_hook, rope: tuple[Array, Array] | None = None,
                 position_ids: Array | None = None, local_window: Array | None = None,
                 prefix_kv: tuple[Array, Array] | None = None, mask: Array | None = None,
                 z: Array | None = None) -> Array:
        """x: residual stream [batch, pos, d_model] -> [batch, pos, d_model]. `position_ids`
        [batch, pos], this layer's `local_window`, `prefix_kv` and `mask` as in `Attention`.
        `z` [batch, pos, head, d_head]: the heads' outputs, already known (a resumed run whose
        intervention is at hook_z or later): the attention then only projects them, and the
        hooks before attn.hook_z do not run."""
        resid_pre = hook("hook_resid_pre", x)
        if z is None:
            attn_out = self.attn(*self._attention_inputs(resid_pre, hook), hook, rope, position_ids, local_window,
                                 prefix_kv, mask)
        else:
            attn_out = self.attn.output(z, hook)
        if self.ln1_post is not None:
            attn_out = self.ln1_post(attn_out, hook, "ln1_post")
        attn_out = hook("hook_attn_out", attn_out)
        if self.cfg.parallel_residual:
            mlp_in = hook("hook_mlp_in", resid_pre)
        else:
            resid_mid = hook("hook_resid_mid", resid_pre + attn_out)
            mlp_in = hook("hook_mlp_in", resid_mid)
        mlp_norm = self.ln1 if self.ln2 is None else self.ln2
        mlp_out = self.mlp(mlp_norm(mlp_in, hook, "ln2"), hook)
        if self.ln2_post is not None:
            mlp_out = self.ln2_post(mlp_out, hook, "ln2_post")
        mlp_out = hook("hook_mlp_out", mlp_out)
        if self.cfg.parallel_residual:
            resid_post = resid_pre + attn_out + mlp_out
        else:
            resid_post = resid_mid + mlp_out
        return hook("hook_resid_post", resid_post)
