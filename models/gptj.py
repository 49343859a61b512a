"""GPT-J: parallel attention and MLP reading one LayerNorm, partial interleaved rotary
(rotate-every-two), no attention biases, untied head with a bias. HF weight converter."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from jaxcirc.models.config import ModelConfig, RopeConfig
from jaxcirc.models.hf_config import first, stack_blocks

MODEL_TYPES = ("gptj",)


def config_from_hf(hf: dict[str, Any], dtype: str = "float32") -> ModelConfig:
    """Reads both spellings GPTJConfig accepts (n_embd / hidden_size, n_layer / num_hidden_layers,
    n_head / num_attention_heads, n_positions / max_position_embeddings)."""
    d_model = first(hf, "n_embd", "hidden_size")
    n_heads = first(hf, "n_head", "num_attention_heads")
    d_head = d_model // n_heads
    # HF rotates the whole head when rotary_dim is None.
    rotary_dim = first(hf, "rotary_dim", default=d_head)
    if rotary_dim > d_head or rotary_dim % 2:
        raise ValueError(f"GPT-J rotary_dim={rotary_dim} must be even and at most the head size {d_head}.")
    return ModelConfig(
        family="gptj", n_layers=first(hf, "n_layer", "num_hidden_layers"), d_model=d_model, n_heads=n_heads,
        d_head=d_head, d_mlp=first(hf, "n_inner", default=4 * d_model), d_vocab=hf["vocab_size"],
        n_ctx=first(hf, "n_positions", "max_position_embeddings", default=2048), norm="layernorm",
        norm_eps=first(hf, "layer_norm_epsilon", default=1e-5),
        activation=first(hf, "activation_function", default="gelu_new"),
        parallel_residual=True, shared_norm=True, positional="rotary",
        rope=RopeConfig(theta=10000.0, rotary_dim=int(rotary_dim), interleaved=True),
        tied_embeddings=bool(hf.get("tie_word_embeddings", False)), unembed_bias=True,
        qkv_bias=False, o_bias=False, mlp_bias=True, dtype=dtype,
        initializer_range=first(hf, "initializer_range", default=0.02),
    )


def params_from_hf(get: Callable[[str], np.ndarray], cfg: ModelConfig) -> dict:
    """`get(name)` returns an HF tensor (names without the `transformer.` prefix; `lm_head.*` as is)."""
    d, h, dh = cfg.d_model, cfg.n_heads, cfg.d_head

    def block(i: int) -> dict:
        p = f"h.{i}."
        return {
            "ln1": {"w": get(p + "ln_1.weight"), "b": get(p + "ln_1.bias")},
            "attn": {
                "W_Q": get(p + "attn.q_proj.weight").T.reshape(d, h, dh),
                "W_K": get(p + "attn.k_proj.weight").T.reshape(d, h, dh),
                "W_V": get(p + "attn.v_proj.weight").T.reshape(d, h, dh),
                "W_O": get(p + "attn.out_proj.weight").T.reshape(h, dh, d),
            },
            "mlp": {"W_in": get(p + "mlp.fc_in.weight").T, "b_in": get(p + "mlp.fc_in.bias"),
                    "W_out": get(p + "mlp.fc_out.weight").T, "b_out": get(p + "mlp.fc_out.bias")},
        }

    params = {
        "W_E": get("wte.weight"),
        "blocks": stack_blocks([block(i) for i in range(cfg.n_layers)]),
        "ln_final": {"w": get("ln_f.weight"), "b": get("ln_f.bias")},
        "b_U": get("lm_head.bias"),
    }
    if not cfg.tied_embeddings:
        params["W_U"] = get("lm_head.weight").T
    return params
