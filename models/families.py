"""The supported model families: what each HF `model_type` loads through, its architecture in a
phrase, what the parity tests cover and the figure they measured.

This table is the one list of families: `hf.families()` (the loader's registry) is built from it,
`jaxcirc info` prints it, and README's "## Models" table is `markdown_table()` (a test checks).
Figures are max |log-softmax difference| against HF transformers in float32 over every position
of 2 sequences of 40 tokens of random-init tiny checkpoints, biases and norm weights randomised
too (tests/test_parity_hf.py prints them with `-s`).
"""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType
from typing import Any


@dataclasses.dataclass(frozen=True)
class Family:
    """One row: `module` is the port in jaxcirc.models; `model_types` the HF model types it loads."""

    name: str
    model_types: tuple[str, ...]
    module: str
    architecture: str
    tested: str
    parity: str

    def port(self) -> ModuleType:
        return importlib.import_module(f"jaxcirc.models.{self.module}")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "model_types": list(self.model_types)}


FAMILIES: tuple[Family, ...] = (
    Family("GPT-2", ("gpt2",), "gpt2",
           "learned positions, LayerNorm, GELU MLP, tied head",
           "3 heads (odd count), learned positions; safetensors and `pytorch_model.bin`",
           "2.6e-6"),
    Family("GPT-NeoX / Pythia", ("gpt_neox",), "gpt_neox",
           "partial rotary, parallel or sequential residual, biases, untied head",
           "partial rotary (`rotary_pct` 0.25), parallel and sequential residual; old "
           "`rotary_pct`/`rotary_emb_base` config; `pytorch_model.bin`",
           "5.5e-6 (parallel), 1.8e-5 (sequential)"),
    Family("Llama", ("llama", "mistral"), "llama",
           "RMSNorm, SwiGLU, GQA, RoPE (linear, llama3 scaling), optional biases; Mistral without "
           "sliding window loads too (untested)",
           "GQA 4/2, llama3 rope scaling (40 tokens, original context 16), untied head, attention and "
           "MLP biases; old `rope_theta`/`rope_scaling` config; sharded safetensors",
           "1.6e-5"),
    Family("Qwen2", ("qwen2",), "llama",
           "Llama with q/k/v biases",
           "q/k/v bias without o bias, GQA 6/2, tied head",
           "2.8e-5"),
    Family("GPT-J", ("gptj",), "gptj",
           "parallel attention + MLP reading one LayerNorm, partial interleaved (rotate-every-two) "
           "rotary, no attention biases, untied head with bias",
           "rotary_dim 4 of head 8 (rotation checked against transformers' rotate-every-two), 3 heads; "
           "both config spellings (`n_embd`/`n_layer`/`n_head` and "
           "`hidden_size`/`num_hidden_layers`/`num_attention_heads`)",
           "2.4e-6"),
    Family("BLOOM", ("bloom",), "bloom",
           "ALiBi (relative slope x (j - i)), LayerNorm after the embedding, fused per-head qkv, "
           "biases everywhere, tanh GELU, tied head",
           "6 heads (ALiBi slopes of a non-power-of-two count; slopes for 1-20 heads checked against "
           "transformers'); old `n_embed`/`num_hidden_layers`/"
           "`num_attention_heads` config",
           "6.2e-6"),
    Family("Gemma 2", ("gemma2",), "gemma2",
           "RMSNorm (1 + w), pre- and post-norms around attention and MLP, attention and final logit "
           "soft-capping, sqrt(d_model) embedding scale, query_pre_attn_scalar, separate head_dim, "
           "GQA, gated tanh-GELU MLP, alternating sliding-window / global layers, tied head",
           "window 8 on 40 tokens (sliding layers 0 and 2 of 3), GQA 4/2, head_dim 12 with d_model 32, "
           "query_pre_attn_scalar 20, soft caps 3 and 5 (removing the window, either cap or the query "
           "scale moves transformers' own output by > 0.1); old config (no `layer_types`, "
           "top-level `rope_theta`, `hidden_act`)",
           "4.1e-6"),
    Family("SmolLM2-135M-Instruct, Q4_1 GGUF", ("llama",), "llama",
           "the embedded default model, read from GGUF",
           "against transformers' own GGUF loader, 4 prompts (56 positions), same top-5, \" Paris\" first",
           "8.5e-5 (bound 1e-4)"),
)


def ports() -> dict[str, ModuleType]:
    """HF model_type -> the family module that loads it (MODEL_TYPES, config_from_hf, params_from_hf)."""
    table: dict[str, ModuleType] = {}
    for family in FAMILIES:
        module = family.port()
        for model_type in module.MODEL_TYPES:
            table[model_type] = module
    return table


def family_table() -> list[dict[str, Any]]:
    """Every row as plain data (what `jaxcirc info --json` prints)."""
    return [f.to_dict() for f in FAMILIES]


def markdown_table() -> str:
    """The README's model table."""
    lines = ["| family (HF `model_type`) | architecture | what the tests cover | "
             "max \\|Δ log-softmax\\| vs transformers (fp32) |",
             "| --- | --- | --- | --- |"]
    for f in FAMILIES:
        types = ", ".join(f"`{t}`" for t in f.model_types)
        lines.append(f"| {f.name} ({types}) | {f.architecture} | {f.tested} | {f.parity} |")
    return "\n".join(lines)
