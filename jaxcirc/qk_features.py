"""Per-frequency statistics of queries and keys in the rotary 2-D subspaces.

    stats = frequency_stats(qk.k, cfg)      # k [layer, batch, pos, kv_head, d_head] (pre-RoPE)
    stats.variance_ratio                    # [layer, kv_head, pair]

Why these statistics. With z_l = x_l + i x_{l + rotary_dim/2} the complex coordinate of pair l,
a logit is sum_l Re(zq_l conj(zk_l) e^{i (i - j) theta_l}). In a pair whose keys barely vary
across tokens (zk_l ~ its mean), the term depends on the query and the distance only: a
positional term f(q, i - j). In a pair whose rotation hardly moves over the context
((i - j) theta_l ~ 0, low frequencies), the term depends on the query and key content only: a
semantic term g(q, k). So the decomposition is exact when content lives in low-frequency pairs
and high/mid-frequency pairs are token-invariant. These statistics measure that per pair:

  variance_ratio   E|z - mean z|^2 / |mean z|^2 across tokens (small: token-invariant pair)
  concentration    |mean(z / |z|)|, the mean resultant length of the phase (1: shared phase)
  magnitude        E|z| (how much the pair contributes at all)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxcirc.attention_logits import inverse_frequencies, phasors
from jaxcirc.models.config import ModelConfig

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class FrequencyStats:
    """Statistics of each rotary pair across tokens: arrays [..., head, pair] plus the pair's
    frequency theta [pair] (radians per position) and wavelength 2 pi / theta [pair]."""

    variance_ratio: Array
    concentration: Array
    magnitude: Array
    mean_magnitude: Array  # |E z|: the size of the token-invariant part
    theta: np.ndarray
    wavelength: np.ndarray


@jax.jit
def _pair_stats(z: Array, weight: Array) -> dict[str, Array]:
    """z [layer, tokens, head, pair] complex, weight [tokens] -> stats [layer, head, pair]."""
    w = weight[None, :, None, None]
    total = weight.sum()
    mean = (z * w).sum(1) / total
    spread = ((jnp.abs(z - mean[:, None]) ** 2) * w).sum(1) / total
    size = jnp.abs(z)
    unit = z / jnp.maximum(size, 1e-30)
    return {"variance_ratio": spread / jnp.maximum(jnp.abs(mean) ** 2, 1e-30),
            "concentration": jnp.abs((unit * w).sum(1) / total),
            "magnitude": (size * w).sum(1) / total,
            "mean_magnitude": jnp.abs(mean)}


def frequency_stats(x: Array, cfg: ModelConfig, *, skip_first: int = 1) -> FrequencyStats:
    """Statistics over tokens of pre-RoPE queries or keys x [layer, batch, pos, head, d_head]
    (one layer: [batch, pos, head, d_head]) -> arrays [layer, head, pair] ([head, pair]).

    `skip_first` leaves out the first positions of every sequence (the attention-sink token's
    query/key is typically an outlier that would dominate the mean)."""
    x = jnp.asarray(x)
    single = x.ndim == 4
    if single:
        x = x[None]
    if x.ndim != 5:
        raise ValueError(f"x must be [layer, batch, pos, head, d_head] or [batch, pos, head, d_head], got {tuple(x.shape)}.")
    theta = inverse_frequencies(cfg)
    layers, batch, pos, heads, d_head = x.shape
    if not 0 <= skip_first < pos:
        raise ValueError(f"skip_first={skip_first} leaves no positions of the {pos} available.")
    z, _ = phasors(x, cfg)
    z = z.reshape(layers, batch * pos, heads, -1)
    weight = jnp.tile(jnp.arange(pos) >= skip_first, batch).astype(jnp.float32)
    out = _pair_stats(z, weight)
    if single:
        out = {k: v[0] for k, v in out.items()}
    return FrequencyStats(**out, theta=theta, wavelength=2 * np.pi / theta)


def band_summary(stats: FrequencyStats, context: int) -> dict[str, dict[str, float]]:
    """Median statistics in the pairs that rotate by more than a full turn over `context`
    positions ("fast": they can carry a distance term) and those that rotate by less than a
    radian ("slow": they can carry content), pooled over layers and heads."""
    fast = stats.wavelength < context
    slow = stats.theta * context < 1.0
    out = {}
    for name, band in (("fast", fast), ("slow", slow)):
        if not band.any():
            continue
        out[name] = {"pairs": int(band.sum()),
                     **{field: float(np.median(np.asarray(getattr(stats, field))[..., band]))
                        for field in ("variance_ratio", "concentration", "magnitude")}}
    return out
