"""BLOOM: ALiBi position bias, LayerNorm after the embedding, fused per-head query_key_value,
biases everywhere, tanh-approximated GELU MLP, tied head. HF weight converter.

HF's BloomMLP and BloomAttention add the residual inside; here hook_attn_out and hook_mlp_out
are the updates alone, as in every other family.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from jaxcirc.models.config import ModelConfig
from jaxcirc.models.hf_config import first, stack_blocks

MODEL_TYPES = ("bloom",)


def config_from_hf(hf: dict[str, Any], dtype: str = "float32") -> ModelConfig:
    """Reads both spellings BloomConfig accepts (hidden_size / n_embed, n_layer / num_hidden_layers,
    n_head / num_attention_heads); like BloomConfig, n_embed wins when both are given."""
    if hf.get("apply_residual_connection_post_layernorm"):
        raise ValueError("BLOOM configs with apply_residual_connection_post_layernorm=True (the residual "
                         "taken after the norm) are not supported.")
    d_model = first(hf, "n_embed", "hidden_size")
    n_heads = first(hf, "n_head", "num_attention_heads")
    if d_model % n_heads:
        raise ValueError(f"BLOOM hidden_size={d_model} is not a multiple of n_head={n_heads}.")
    return ModelConfig(
        family="bloom", n_layers=first(hf, "n_layer", "num_hidden_layers"), d_model=d_model,
        n_heads=n_heads, d_head=d_model // n_heads, d_mlp=4 * d_model, d_vocab=hf["vocab_size"],
        # ALiBi has no position table; this is only the length the model was trained at.
        n_ctx=first(hf, "seq_length", "max_position_embeddings", "n_positions", default=2048),
        norm="layernorm", norm_eps=first(hf, "layer_norm_epsilon", default=1e-5),
        # BloomGelu is the tanh approximation (its 0.79788456 is sqrt(2 / pi) to 8 digits).
        activation="gelu_new", positional="alibi", embed_norm=True,
        tied_embeddings=bool(hf.get("tie_word_embeddings", True)),
        qkv_bias=True, o_bias=True, mlp_bias=True, dtype=dtype,
        initializer_range=first(hf, "initializer_range", default=0.02),
    )


def params_from_hf(get: Callable[[str], np.ndarray], cfg: ModelConfig) -> dict:
    """`get(name)` returns an HF tensor (names with or without the `transformer.` prefix)."""
    d, h, dh = cfg.d_model, cfg.n_heads, cfg.d_head

    def block(i: int) -> dict:
        p = f"h.{i}."
        # Fused rows are laid out [head, (q, k, v), d_head].
        qkv = get(p + "self_attention.query_key_value.weight").reshape(h, 3, dh, d).transpose(1, 3, 0, 2)
        qkv_b = get(p + "self_attention.query_key_value.bias").reshape(h, 3, dh).transpose(1, 0, 2)
        return {
            "ln1": {"w": get(p + "input_layernorm.weight"), "b": get(p + "input_layernorm.bias")},
            "ln2": {"w": get(p + "post_attention_layernorm.weight"), "b": get(p + "post_attention_layernorm.bias")},
            "attn": {"W_Q": qkv[0], "W_K": qkv[1], "W_V": qkv[2], "b_Q": qkv_b[0], "b_K": qkv_b[1], "b_V": qkv_b[2],
                     "W_O": get(p + "self_attention.dense.weight").T.reshape(h, dh, d),
                     "b_O": get(p + "self_attention.dense.bias")},
            "mlp": {"W_in": get(p + "mlp.dense_h_to_4h.weight").T, "b_in": get(p + "mlp.dense_h_to_4h.bias"),
                    "W_out": get(p + "mlp.dense_4h_to_h.weight").T, "b_out": get(p + "mlp.dense_4h_to_h.bias")},
        }

    params = {
        "W_E": get("word_embeddings.weight"),
        "ln_embed": {"w": get("word_embeddings_layernorm.weight"), "b": get("word_embeddings_layernorm.bias")},
        "blocks": stack_blocks([block(i) for i in range(cfg.n_layers)]),
        "ln_final": {"w": get("ln_f.weight"), "b": get("ln_f.bias")},
    }
    if not cfg.tied_embeddings:
        params["W_U"] = get("lm_head.weight").T
    return params
