"""Gemma 2: RMSNorm scaling by (1 + w), norms before and after attention and MLP, attention-logit
and final-logit soft-capping, embedding scaled by sqrt(d_model), query scale
query_pre_attn_scalar^-1/2, GQA, gated tanh-GELU MLP, sliding-window and global attention layers
alternating (`layer_types`; without it even layers slide, as HF defaults), tied head. HF weight
converter."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from jaxcirc.models.config import ModelConfig
from jaxcirc.models.hf_config import first, rope_from_hf, stack_blocks
from jaxcirc.models.llama import attention_from_hf

MODEL_TYPES = ("gemma2",)


def layer_windows(hf: dict[str, Any], n_layers: int) -> tuple[int, ...] | None:
    """Per-layer sliding window (0 = global) from `layer_types` or HF's default pattern."""
    window = hf.get("sliding_window")
    types = hf.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention"
                                      for i in range(n_layers)]
    if len(types) != n_layers:
        raise ValueError(f"Gemma 2 layer_types has {len(types)} entries for {n_layers} layers.")
    unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
    if unknown:
        raise ValueError(f"Gemma 2 layer_types {unknown} are not supported (sliding_attention, full_attention).")
    if not window:
        return None
    return tuple(int(window) if t == "sliding_attention" else 0 for t in types)


def config_from_hf(hf: dict[str, Any], dtype: str = "float32") -> ModelConfig:
    if hf.get("use_bidirectional_attention"):
        raise ValueError("Gemma 2 with use_bidirectional_attention=True (an encoder) is not supported.")
    d_model, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    n_layers = hf["num_hidden_layers"]
    d_head = first(hf, "head_dim", default=d_model // n_heads)
    activation = first(hf, "hidden_activation", "hidden_act", default="gelu_pytorch_tanh")
    if activation not in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
        raise ValueError(f"Gemma 2 hidden_activation={activation!r} is not supported (gelu_pytorch_tanh).")
    attention_bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        family="gemma2", n_layers=n_layers, d_model=d_model, n_heads=n_heads,
        n_kv_heads=first(hf, "num_key_value_heads", default=n_heads), d_head=d_head,
        d_mlp=hf["intermediate_size"], d_vocab=hf["vocab_size"],
        n_ctx=first(hf, "max_position_embeddings", default=8192), norm="rmsnorm",
        norm_eps=first(hf, "rms_norm_eps", default=1e-6), norm_offset=1.0, post_norms=True,
        activation=activation, gated_mlp=True, positional="rotary", rope=rope_from_hf(hf, d_head),
        embed_scale=float(d_model) ** 0.5,
        query_scale=float(first(hf, "query_pre_attn_scalar", default=256)) ** -0.5,
        attn_softcap=first(hf, "attn_logit_softcapping"), final_softcap=first(hf, "final_logit_softcapping"),
        layer_windows=layer_windows(hf, n_layers),
        tied_embeddings=bool(hf.get("tie_word_embeddings", True)),
        qkv_bias=attention_bias, o_bias=attention_bias, dtype=dtype,
        initializer_range=first(hf, "initializer_range", default=0.02),
    )


def params_from_hf(get: Callable[[str], np.ndarray], cfg: ModelConfig) -> dict:
    """`get(name)` returns an HF tensor (names without the `model.` prefix; `lm_head.weight` as is).
    Norm weights stay as stored (w, with scale 1 + w: `cfg.norm_offset`)."""

    def norm(name: str) -> dict:
        return {"w": get(name + ".weight")}

    def block(i: int) -> dict:
        p = f"layers.{i}."
        attn = attention_from_hf(get, p, cfg)
        return {
            # Gemma 2's post_attention_layernorm normalises the attention output (ln1_post), unlike
            # Llama's, which is the pre-MLP norm; pre_feedforward_layernorm is ln2.
            "ln1": norm(p + "input_layernorm"), "ln1_post": norm(p + "post_attention_layernorm"),
            "ln2": norm(p + "pre_feedforward_layernorm"), "ln2_post": norm(p + "post_feedforward_layernorm"),
            "attn": attn,
            "mlp": {"W_gate": get(p + "mlp.gate_proj.weight").T, "W_in": get(p + "mlp.up_proj.weight").T,
                    "W_out": get(p + "mlp.down_proj.weight").T},
        }

    params = {
        "W_E": get("embed_tokens.weight"),
        "blocks": stack_blocks([block(i) for i in range(cfg.n_layers)]),
        "ln_final": norm("norm"),
    }
    if not cfg.tied_embeddings:
        params["W_U"] = get("lm_head.weight").T
    return params
