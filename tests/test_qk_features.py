"""Per-frequency query/key statistics against hand-built pairs, and the random baselines' scaling."""

import math

import jax.numpy as jnp
import numpy as np

from jaxcirc.models.config import ModelConfig, RopeConfig
from jaxcirc.position_report import random_params
from jaxcirc.qk_features import band_summary, frequency_stats

CFG = ModelConfig(family="llama", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_head=8, d_mlp=64,
                  d_vocab=50, n_ctx=64, norm="rmsnorm", activation="silu", gated_mlp=True, positional="rotary",
                  rope=RopeConfig(theta=10000.0, rotary_dim=8), tied_embeddings=False)


def test_statistics_of_hand_built_pairs():
    rng = np.random.default_rng(0)
    batch, pos, heads, d_head = 3, 200, 2, 8
    x = np.zeros((batch, pos, heads, d_head))
    # Pair l holds (x[l], x[l + 4]). Pair 0: the same vector for every token.
    x[..., 0], x[..., 4] = 2.0, 1.0
    # Pair 1: magnitude 3, uniformly random phase.
    phase = rng.uniform(0, 2 * np.pi, size=(batch, pos, heads))
    x[..., 1], x[..., 5] = 3 * np.cos(phase), 3 * np.sin(phase)
    # Pair 2: a shared mean plus noise; pair 3: arbitrary.
    x[..., 2], x[..., 6] = 1.0 + 0.5 * rng.normal(size=(batch, pos, heads)), 0.5 * rng.normal(size=(batch, pos, heads))
    x[..., 3], x[..., 7] = rng.normal(size=(batch, pos, heads)), rng.normal(size=(batch, pos, heads))
    x[:, 0] = 100.0  # an outlier first token (the sink), left out by skip_first
    stats = frequency_stats(jnp.asarray(x, jnp.float32), CFG)
    assert stats.variance_ratio.shape == (heads, 4)
    np.testing.assert_allclose(stats.theta, 10000.0 ** (-np.arange(4) / 4), rtol=1e-6)
    np.testing.assert_allclose(stats.variance_ratio[:, 0], 0.0, atol=1e-6)
    np.testing.assert_allclose(stats.concentration[:, 0], 1.0, atol=1e-6)
    np.testing.assert_allclose(stats.magnitude[:, 0], math.sqrt(5), rtol=1e-5)
    np.testing.assert_allclose(stats.magnitude[:, 1], 3.0, rtol=1e-5)
    assert float(stats.concentration[:, 1].max()) < 0.15
    # An independent computation of every statistic, for every pair and head.
    z = (x[:, 1:, :, :4] + 1j * x[:, 1:, :, 4:]).reshape(-1, heads, 4)
    mean = z.mean(0)
    np.testing.assert_allclose(stats.variance_ratio[:, 2:], ((np.abs(z - mean) ** 2).mean(0) / np.abs(mean) ** 2)[:, 2:],
                               rtol=1e-3)
    np.testing.assert_allclose(stats.concentration, np.abs((z / np.abs(z)).mean(0)), atol=1e-5)
    np.testing.assert_allclose(stats.magnitude, np.abs(z).mean(0), rtol=1e-5)
    # Stacked over layers: [layer, batch, pos, head, d_head] -> [layer, head, pair].
    stacked = frequency_stats(jnp.asarray(np.stack([x, 2 * x]), jnp.float32), CFG)
    np.testing.assert_allclose(stacked.magnitude[1], 2 * stacked.magnitude[0], rtol=1e-5)
    bands = band_summary(stats, context=200)
    assert bands["fast"]["pairs"] == 2  # wavelengths 2 pi and 2 pi * 10 are shorter than 200 positions


def test_random_initialisations_have_the_documented_scales():
    cfg = CFG.replace(d_model=64, d_mlp=256)
    hf = random_params(cfg, "hf_normal_0.02", 0)
    fan = random_params(cfg, "fan_in", 0)
    unit = random_params(cfg, "unit_normal", 0)
    assert abs(float(np.std(hf["blocks"]["attn"]["W_Q"])) - 0.02) < 0.002
    assert abs(float(np.std(unit["blocks"]["attn"]["W_Q"])) - 1.0) < 0.05
    assert abs(float(np.std(fan["blocks"]["attn"]["W_Q"])) - 1 / 8) < 0.01  # 1 / sqrt(d_model)
    assert abs(float(np.std(fan["blocks"]["attn"]["W_O"])) - 1 / math.sqrt(4 * 8)) < 0.01
    assert abs(float(np.std(fan["blocks"]["mlp"]["W_out"])) - 1 / 16) < 0.005  # 1 / sqrt(d_mlp)
    assert abs(float(np.std(fan["W_E"])) - 1.0) < 0.05
    np.testing.assert_array_equal(fan["blocks"]["ln1"]["w"], 1.0)
