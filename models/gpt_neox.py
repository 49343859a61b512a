"""GPT-NeoX / Pythia: parallel residual, partial rotary, LayerNorm, GELU MLP. HF weight converter."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from jaxcirc.models.config import ModelConfig
from jaxcirc.models.hf_config import first, rope_from_hf, stack_blocks

MODEL_TYPES = ("gpt_neox",)


def config_from_hf(hf: dict[str, Any], dtype: str = "float32") -> ModelConfig:
    d_model, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    d_head = d_model // n_heads
    bias = hf.get("attention_bias", True)
    return ModelConfig(
        family="gpt_neox", n_layers=hf["num_hidden_layers"], d_model=d_model, n_heads=n_heads,
        d_head=d_head, d_mlp=hf["intermediate_size"], d_vocab=hf["vocab_size"],
        n_ctx=hf.get("max_position_embeddings", 2048), norm="layernorm",
        norm_eps=hf.get("layer_norm_eps", 1e-5), activation=hf.get("hidden_act", "gelu"),
        parallel_residual=hf.get("use_parallel_residual", True), positional="rotary",
        rope=rope_from_hf(hf, d_head), tied_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=bias, o_bias=bias, mlp_bias=True, dtype=dtype,
        initializer_range=first(hf, "initializer_range", default=0.02),
    )


def params_from_hf(get: Callable[[str], np.ndarray], cfg: ModelConfig) -> dict:
    """`get(name)` returns an HF tensor (names without the `gpt_neox.` prefix)."""
    d, h, dh = cfg.d_model, cfg.n_heads, cfg.d_head

    def block(i: int) -> dict:
        p = f"layers.{i}."
        # Fused qkv rows are laid out [head, (q, k, v), d_head].
        qkv = get(p + "attention.query_key_value.weight").reshape(h, 3, dh, d).transpose(1, 3, 0, 2)
        attn = {"W_Q": qkv[0], "W_K": qkv[1], "W_V": qkv[2],
                "W_O": get(p + "attention.dense.weight").T.reshape(h, dh, d)}
        if cfg.qkv_bias:
            qkv_b = get(p + "attention.query_key_value.bias").reshape(h, 3, dh).transpose(1, 0, 2)
            attn.update(b_Q=qkv_b[0], b_K=qkv_b[1], b_V=qkv_b[2], b_O=get(p + "attention.dense.bias"))
        return {
            "ln1": {"w": get(p + "input_layernorm.weight"), "b": get(p + "input_layernorm.bias")},
            "ln2": {"w": get(p + "post_attention_layernorm.weight"), "b": get(p + "post_attention_layernorm.bias")},
            "attn": attn,
            "mlp": {"W_in": get(p + "mlp.dense_h_to_4h.weight").T, "b_in": get(p + "mlp.dense_h_to_4h.bias"),
                    "W_out": get(p + "mlp.dense_4h_to_h.weight").T, "b_out": get(p + "mlp.dense_4h_to_h.bias")},
        }

    params = {
        "W_E": get("embed_in.weight"),
        "blocks": stack_blocks([block(i) for i in range(cfg.n_layers)]),
        "ln_final": {"w": get("final_layer_norm.weight"), "b": get("final_layer_norm.bias")},
    }
    if not cfg.tied_embeddings:
        params["W_U"] = get("embed_out.weight").T
    return params
