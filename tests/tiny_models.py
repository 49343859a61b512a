"""Tiny random models and minimal pairs shared by the tests. Sharing configs and pair shapes shares
compiled programs across test files (jit caches are per process)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxcirc.models.config import ModelConfig, RopeConfig
from jaxcirc.models.transformer import param_shapes
from jaxcirc.pairs import from_tokens


def llama_gqa(**changes) -> ModelConfig:
    """3-layer Llama: RMSNorm, SwiGLU, 4 query heads on 2 kv heads, full rotary, untied head."""
    cfg = ModelConfig(family="llama", n_layers=3, d_model=32, n_heads=4, n_kv_heads=2, d_head=8, d_mlp=64,
                      d_vocab=50, n_ctx=64, norm="rmsnorm", activation="silu", gated_mlp=True,
                      positional="rotary", rope=RopeConfig(theta=10000.0, rotary_dim=8),
                      tied_embeddings=False, initializer_range=0.3)
    return cfg.replace(**changes)


def neox(**changes) -> ModelConfig:
    """2-layer GPT-NeoX: LayerNorm, parallel residual, 3 heads, partial rotary (2 of 8 dims)."""
    cfg = ModelConfig(family="gpt_neox", n_layers=2, d_model=24, n_heads=3, d_head=8, d_mlp=96, d_vocab=50,
                      n_ctx=32, norm="layernorm", activation="gelu", parallel_residual=True,
                      positional="rotary", rope=RopeConfig(rotary_dim=2), tied_embeddings=False,
                      initializer_range=0.3)
    return cfg.replace(**changes)


def random_pairs(seed: int, n: int, pos: int, vocab: int = 50):
    """Mixed-length pairs (every other one a token shorter) differing in one non-final token."""
    rng = np.random.default_rng(seed)
    clean, corrupt = [], []
    for i in range(n):
        length = pos - (i % 2)
        c = rng.integers(1, vocab, length)
        k = c.copy()
        j = int(rng.integers(0, length - 1))
        k[j] = c[j] % (vocab - 1) + 1
        clean.append(c.tolist())
        corrupt.append(k.tolist())
    answer = rng.integers(1, vocab, n)
    return from_tokens(clean, corrupt, answer=answer, foil=answer % (vocab - 1) + 1)


def random_params(cfg: ModelConfig, seed: int) -> dict:
    """Weights ~ N(0, init), norm scales ~ 1 + N(0, 0.1), biases ~ N(0, 0.3): every parameter matters
    (`init_params` sets norm scales to 1 and biases to 0, which hides mistakes with them)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = str(path[-1].key)
        scale = cfg.initializer_range if name.startswith("W") else 0.3
        value = (1.0 + 0.1 * rng.normal(size=leaf.shape)) if name == "w" else scale * rng.normal(size=leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, param_shapes(cfg))
