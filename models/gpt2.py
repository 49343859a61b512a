"""GPT-2: learned positions, LayerNorm, GELU (tanh) MLP, tied unembedding. HF weight converter."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from jaxcirc.models.config import ModelConfig
from jaxcirc.models.hf_config import first, stack_blocks

MODEL_TYPES = ("gpt2",)


def config_from_hf(hf: dict[str, Any], dtype: str = "float32") -> ModelConfig:
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights") is False:
        raise ValueError("GPT-2 configs with scale_attn_by_inverse_layer_idx=True or "
                         "scale_attn_weights=False are not supported.")
    d_model, n_heads = hf["n_embd"], hf["n_head"]
    return ModelConfig(
        family="gpt2", n_layers=hf["n_layer"], d_model=d_model, n_heads=n_heads,
        d_head=d_model // n_heads, d_mlp=first(hf, "n_inner", default=4 * d_model),
        d_vocab=hf["vocab_size"], n_ctx=hf["n_positions"], norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        activation=hf.get("activation_function", "gelu_new"), positional="learned",
        tied_embeddings=True, qkv_bias=True, o_bias=True, mlp_bias=True, dtype=dtype,
        initializer_range=hf.get("initializer_range", 0.02),
    )


def params_from_hf(get: Callable[[str], np.ndarray], cfg: ModelConfig) -> dict:
    """`get(name)` returns an HF tensor (names without the `transformer.` prefix)."""
    d, h, dh = cfg.d_model, cfg.n_heads, cfg.d_head

    def block(i: int) -> dict:
        p = f"h.{i}."
        qkv_w, qkv_b = get(p + "attn.c_attn.weight"), get(p + "attn.c_attn.bias")  # Conv1D: [in, out]
        q_w, k_w, v_w = np.split(qkv_w, 3, axis=1)
        q_b, k_b, v_b = np.split(qkv_b, 3)
        return {
            "ln1": {"w": get(p + "ln_1.weight"), "b": get(p + "ln_1.bias")},
            "ln2": {"w": get(p + "ln_2.weight"), "b": get(p + "ln_2.bias")},
            "attn": {
                "W_Q": q_w.reshape(d, h, dh), "W_K": k_w.reshape(d, h, dh), "W_V": v_w.reshape(d, h, dh),
                "b_Q": q_b.reshape(h, dh), "b_K": k_b.reshape(h, dh), "b_V": v_b.reshape(h, dh),
                "W_O": get(p + "attn.c_proj.weight").reshape(h, dh, d), "b_O": get(p + "attn.c_proj.bias"),
            },
            "mlp": {"W_in": get(p + "mlp.c_fc.weight"), "b_in": get(p + "mlp.c_fc.bias"),
                    "W_out": get(p + "mlp.c_proj.weight"), "b_out": get(p + "mlp.c_proj.bias")},
        }

    return {
        "W_E": get("wte.weight"), "W_pos": get("wpe.weight"),
        "blocks": stack_blocks([block(i) for i in range(cfg.n_layers)]),
        "ln_final": {"w": get("ln_f.weight"), "b": get("ln_f.bias")},
    }

