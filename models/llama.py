"""Llama family (Llama 2/3, SmolLM2, Mistral-style, Qwen2): RMSNorm, SwiGLU, grouped-query attention,
RoPE (incl. llama3 scaling), tied or untied head, optional q/k/v bias. HF weight converter."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from jaxcirc.models.config import ModelConfig
from jaxcirc.models.hf_config import first, rope_from_hf, stack_blocks

MODEL_TYPES = ("llama", "qwen2", "mistral")


def config_from_hf(hf: dict[str, Any], dtype: str = "float32") -> ModelConfig:
    model_type = hf.get("model_type", "llama")
    if hf.get("use_sliding_window") or (model_type == "mistral" and hf.get("sliding_window")):
        raise ValueError(f"{model_type} checkpoints with sliding-window attention are not supported yet.")
    d_model, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    d_head = first(hf, "head_dim", default=d_model // n_heads)
    attention_bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        family="llama", n_layers=hf["num_hidden_layers"], d_model=d_model, n_heads=n_heads,
        n_kv_heads=first(hf, "num_key_value_heads", default=n_heads), d_head=d_head,
        d_mlp=hf["intermediate_size"], d_vocab=hf["vocab_size"],
        n_ctx=hf.get("max_position_embeddings", 2048), norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6), activation=hf.get("hidden_act", "silu"),
        gated_mlp=True, positional="rotary", rope=rope_from_hf(hf, d_head),
        tied_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=attention_bias or model_type == "qwen2", o_bias=attention_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)), dtype=dtype,
        initializer_range=first(hf, "initializer_range", default=0.02),
    )


def attention_from_hf(get: Callable[[str], np.ndarray], prefix: str, cfg: ModelConfig) -> dict:
    """The q/k/v/o projections (and biases) of an HF `self_attn` module at `prefix`, in our
    per-head layout. Shared by the Llama-style ports (Llama, Qwen2, Mistral, Gemma 2)."""
    d, h, kv, dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head
    p = prefix + "self_attn."
    attn = {
        "W_Q": get(p + "q_proj.weight").T.reshape(d, h, dh),
        "W_K": get(p + "k_proj.weight").T.reshape(d, kv, dh),
        "W_V": get(p + "v_proj.weight").T.reshape(d, kv, dh),
        "W_O": get(p + "o_proj.weight").T.reshape(h, dh, d),
    }
    if cfg.qkv_bias:
        attn.update(b_Q=get(p + "q_proj.bias").reshape(h, dh), b_K=get(p + "k_proj.bias").reshape(kv, dh),
                    b_V=get(p + "v_proj.bias").reshape(kv, dh))
    if cfg.o_bias:
        attn["b_O"] = get(p + "o_proj.bias")
    return attn


def params_from_hf(get: Callable[[str], np.ndarray], cfg: ModelConfig) -> dict:
    """`get(name)` returns an HF tensor (names without the `model.` prefix; `lm_head.weight` as is)."""

    def block(i: int) -> dict:
        p = f"layers.{i}."
        attn = attention_from_hf(get, p, cfg)
        mlp = {"W_gate": get(p + "mlp.gate_proj.weight").T, "W_in": get(p + "mlp.up_proj.weight").T,
               "W_out": get(p + "mlp.down_proj.weight").T}
        if cfg.mlp_bias:
            mlp.update(b_gate=get(p + "mlp.gate_proj.bias"), b_in=get(p + "mlp.up_proj.bias"),
                       b_out=get(p + "mlp.down_proj.bias"))
        return {"ln1": {"w": get(p + "input_layernorm.weight")},
                "ln2": {"w": get(p + "post_attention_layernorm.weight")}, "attn": attn, "mlp": mlp}

    params = {
        "W_E": get("embed_tokens.weight"),
        "blocks": stack_blocks([block(i) for i in range(cfg.n_layers)]),
        "ln_final": {"w": get("norm.weight")},
    }
    if not cfg.tied_embeddings:
        params["W_U"] = get("lm_head.weight").T
    return params
