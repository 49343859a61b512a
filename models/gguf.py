"""Loading a GGUF file (llama.cpp's format) as an HF-style config, state dict and tokenizer.

    config, state_dict, tokenizer = load_gguf("model.gguf")

- `config` is the dict transformers would write as config.json for the checkpoint
  (older, published spelling: `rope_theta` and `rope_scaling` at top level), plus
  provenance keys that start with `_jaxcirc_` and are not model settings:
  `_jaxcirc_source_sha256` (sha256 of the .gguf file, for results files),
  `_jaxcirc_source_path` and `_jaxcirc_cache_hit` (True when the tensors came from
  the on-disk cache).
- `state_dict` maps HF parameter names (the names transformers' own GGUF loader gives)
  to float32 numpy arrays in HF's orientation ([out, in] for Linear layers, [in, out]
  for GPT-2's Conv1D layers), with llama.cpp's conversions undone (below).
- `tokenizer` is a `jaxcirc.tokenizer.Tokenizer` rebuilt from the file's metadata
  (byte-level BPE vocabularies, `tokenizer.ggml.model == "gpt2"`, only).

Architectures (`general.architecture`) and what llama.cpp's converter did that is undone here:
- `llama` (Llama 1-3, SmolLM, Mistral-as-llama, ...): q/k rows permuted per head; Llama 3
  rope scaling stored as a `rope_freqs` tensor (turned back into `rope_scaling`).
- `qwen2`: q/k/v biases; nothing permuted.
- `gemma2`: 1 added to every RMSNorm weight (Gemma scales by 1 + w; llama.cpp by w);
  pre- and post-norms around attention and MLP; soft-capping and sliding window in metadata.
- `gpt2`: Conv1D weights ([in, out]) transposed to [out, in]; the tied head written out as
  an `output.weight` copy of the embedding.
- `bloom`: the fused query_key_value rows reordered from per-head (q, k, v) to q, k, v
  blocks; the tied head written out as an `output.weight` copy of the embedding.
Every tensor type `gguf.quants.dequantize` handles is accepted (plus F64).

Dequantizing is slow (seconds to minutes), so the result is cached under
`cache_dir`, else `$JAXCIRC_CACHE_DIR`, else `~/.cache/jaxcirc`, in `gguf/` as
`<sha256>.v<FORMAT_VERSION>.safetensors` + `.json` (config, tokenizer, checksum).
Entries are written atomically; a missing, partial or corrupt entry is rebuilt.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import re
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from jaxcirc.tokenizer import Tokenizer

__all__ = [
    "FORMAT_VERSION",
    "SUPPORTED_ARCHITECTURES",
    "load_gguf",
    "file_sha256",
    "default_cache_dir",
    "gguf_metadata",
    "hf_config_from_gguf",
    "hf_tensor_name",
    "unpermute_qk_rows",
    "bloom_qkv_from_llamacpp",
    "dequantize_tensor",
    "supported_tensor_types",
]

logger = logging.getLogger(__name__)

# Bump when the conversion changes, so stale cache entries are not reused.
FORMAT_VERSION = 1
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "gemma2", "gpt2", "bloom")


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How one architecture's GGUF tensor names map to HF state-dict names.

    `block` maps the part of `blk.N.<part>.<weight|bias>` to the HF module under
    `block_prefix.format(N)`; `top` maps whole GGUF names (outside blocks) to HF names.
    `layer_norm`: norms are LayerNorms (weight and bias) rather than RMSNorms (weight only).
    `block_biases`: every block tensor has a bias, which the family's port requires.
    `required_top`: the HF names outside blocks that must be present.
    """

    hf_class: str
    block_prefix: str
    block: Mapping[str, str]
    top: Mapping[str, str]
    layer_norm: bool
    block_biases: bool
    required_top: tuple[str, ...]


_LLAMA_BLOCK = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LLAMA_TOP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Gemma 2's HF post_attention_layernorm normalises the attention output (llama.cpp's
# post_attention_norm); its pre-MLP norm is pre_feedforward_layernorm (llama.cpp's ffn_norm).
_GEMMA2_BLOCK = {
    **_LLAMA_BLOCK,
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_GPT2_BLOCK = {
    "attn_norm": "ln_1",
    "attn_qkv": "attn.c_attn",
    "attn_output": "attn.c_proj",
    "ffn_norm": "ln_2",
    "ffn_up": "mlp.c_fc",
    "ffn_down": "mlp.c_proj",
}
_GPT2_TOP = {
    "token_embd.weight": "transformer.wte.weight",
    "position_embd.weight": "transformer.wpe.weight",
    "output_norm.weight": "transformer.ln_f.weight",
    "output_norm.bias": "transformer.ln_f.bias",
    "output.weight": "lm_head.weight",
}
_BLOOM_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_qkv": "self_attention.query_key_value",
    "attn_output": "self_attention.dense",
    "ffn_norm": "post_attention_layernorm",
    "ffn_up": "mlp.dense_h_to_4h",
    "ffn_down": "mlp.dense_4h_to_h",
}
_BLOOM_TOP = {
    "token_embd.weight": "transformer.word_embeddings.weight",
    "token_embd_norm.weight": "transformer.word_embeddings_layernorm.weight",
    "token_embd_norm.bias": "transformer.word_embeddings_layernorm.bias",
    "output_norm.weight": "transformer.ln_f.weight",
    "output_norm.bias": "transformer.ln_f.bias",
    "output.weight": "lm_head.weight",
}
_LLAMA_REQUIRED = ("model.embed_tokens.weight", "model.norm.weight")

_LAYOUTS: dict[str, _Layout] = {
    "llama": _Layout("LlamaForCausalLM", "model.layers.{}.", _LLAMA_BLOCK, _LLAMA_TOP, False, False, _LLAMA_REQUIRED),
    "qwen2": _Layout("Qwen2ForCausalLM", "model.layers.{}.", _LLAMA_BLOCK, _LLAMA_TOP, False, False, _LLAMA_REQUIRED),
    "gemma2": _Layout("Gemma2ForCausalLM", "model.layers.{}.", _GEMMA2_BLOCK, _LLAMA_TOP, False, False,
                      _LLAMA_REQUIRED),
    "gpt2": _Layout("GPT2LMHeadModel", "transformer.h.{}.", _GPT2_BLOCK, _GPT2_TOP, True, True,
                    tuple(v for k, v in _GPT2_TOP.items() if k != "output.weight")),
    "bloom": _Layout("BloomForCausalLM", "transformer.h.{}.", _BLOOM_BLOCK, _BLOOM_TOP, True, True,
                     tuple(v for k, v in _BLOOM_TOP.items() if k != "output.weight")),
}
assert tuple(_LAYOUTS) == SUPPORTED_ARCHITECTURES

# Architectures whose llama.cpp converter writes the (tied) head out as a copy of the embedding.
_HEAD_COPIED = ("gpt2", "bloom")
# GPT-2's Conv1D weights, which llama.cpp transposes to [out, in] (the biases stay as they are).
_GPT2_CONV1D = ("attn_qkv", "attn_output", "ffn_up", "ffn_down")

_BLOCK_NAME = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
# Tensors that only feed the config (llama.cpp's Llama 3 rope factors), never the state dict.
_CONFIG_ONLY_TENSORS = {"rope_freqs.weight"}


# --------------------------------------------------------------------------- hashing, cache paths


def file_sha256(path: str | os.PathLike[str], chunk_bytes: int = 1 << 24) -> str:
    """Hex sha256 of a file, read in chunks (constant memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def default_cache_dir() -> Path:
    """`$JAXCIRC_CACHE_DIR`, else `~/.cache/jaxcirc`."""
    return Path(os.environ.get("JAXCIRC_CACHE_DIR") or "~/.cache/jaxcirc").expanduser()


def _cache_paths(cache_dir: Path, sha256: str) -> tuple[Path, Path]:
    stem = cache_dir / "gguf" / f"{sha256}.v{FORMAT_VERSION}"
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


# --------------------------------------------------------------------------- metadata, config


def gguf_metadata(reader: Any) -> dict[str, Any]:
    """All key/value metadata of a `gguf.GGUFReader` as plain Python values."""
    return {key: field.contents() for key, field in reader.fields.items()}


def _f32(value: float) -> float:
    """A float32 metadata value as the shortest decimal that round-trips (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(value)))


def _llama3_factors(factor: float, low: float, high: float, original: float, inv_freq: np.ndarray) -> np.ndarray:
    """Per-frequency divisors of Llama 3 rope scaling ([head_dim/2]), as HF and llama.cpp compute them."""
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, mid))


def _llama3_rope_scaling(
    rope_freqs: np.ndarray, rope_theta: float, rotary_dim: int, context_hint: int | None
) -> dict[str, Any] | None:
    """HF `rope_scaling` for llama.cpp's `rope_freqs` tensor ([rotary_dim/2] divisors), or None if all 1.

    The factors fix `factor` and the smooth ramp between the two wavelength cut-offs; the
    HF parameters (low_freq_factor, high_freq_factor, original_max_position_embeddings) are
    only determined up to a common scale, so low_freq_factor = 1 (every Llama 3.x) is chosen.
    """
    r = np.asarray(rope_freqs, dtype=np.float64).reshape(-1)
    if np.allclose(r, 1.0, rtol=0, atol=1e-6):
        return None
    inv_freq = 1.0 / rope_theta ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)
    if inv_freq.shape != r.shape:
        raise ValueError(
            f"rope_freqs has {r.size} entries but the rotary dimension {rotary_dim} implies {inv_freq.size}."
        )
    factor = float(r.max())
    candidates: list[tuple[float, float, float]] = []
    mid = (r > 1 + 1e-4) & (r < factor * (1 - 1e-4))
    if mid.sum() >= 2 and factor > 1:
        # On the ramp, 1/r is linear in 1/wavelen: smooth = original/(high-low)/wavelen - low/(high-low).
        smooth = (1 / r[mid] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(inv_freq[mid] / (2 * math.pi), smooth, 1)
        if intercept < 0:
            high = 1 - 1 / intercept
            candidates.append((1.0, float(round(high, 4)), float(round(-slope / intercept))))
    for original in dict.fromkeys([context_hint, 8192, 4096, 2048, 16384, 32768, 131072]):
        if original:
            candidates.append((1.0, 4.0, float(original)))
    for low, high, original in candidates:
        if high > low and np.allclose(_llama3_factors(factor, low, high, original, inv_freq), r, rtol=1e-3, atol=0):
            return {
                "rope_type": "llama3",
                "factor": _f32(factor),
                "low_freq_factor": float(low),
                "high_freq_factor": float(high),
                "original_max_position_embeddings": int(original),
            }
    raise ValueError(
        "The GGUF file has a rope_freqs tensor that does not follow Llama 3's rope scaling, which is the only "
        "per-frequency scaling jaxcirc can express as an HF config. Load the model from its HF directory instead."
    )


def _rope_scaling(meta: Mapping[str, Any], arch: str) -> dict[str, Any] | None:
    """HF `rope_scaling` from `{arch}.rope.scaling.*` metadata, or None when the file states none."""
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if kind is None and f"{arch}.rope.scale_linear" in meta:  # the pre-2024 spelling
        kind, factor = "linear", meta[f"{arch}.rope.scale_linear"]
    if kind in (None, "none") or (factor is not None and float(factor) == 1.0 and kind == "linear"):
        return None
    original = meta.get(f"{arch}.rope.scaling.original_context_length")
    if kind == "linear":
        return {"rope_type": "linear", "factor": _f32(factor)}
    if kind == "yarn":
        scaling: dict[str, Any] = {"rope_type": "yarn", "factor": _f32(factor)}
        if original is not None:
            scaling["original_max_position_embeddings"] = int(original)
        for gguf_key, hf_key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            if (value := meta.get(f"{arch}.rope.scaling.{gguf_key}")) is not None:
                scaling[hf_key] = _f32(value)
        return scaling
    raise ValueError(
        f"GGUF rope scaling type {kind!r} ({arch}.rope.scaling.type) is not supported; supported: linear, yarn "
        "(and Llama 3 scaling via a rope_freqs tensor)."
    )


def _check_architecture(arch: Any, path: str) -> str:
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"GGUF file {path} has architecture {arch!r} (general.architecture); jaxcirc loads GGUF files of "
            f"architecture {', '.join(map(repr, SUPPORTED_ARCHITECTURES))}. For other models, pass a local HF "
            "directory (config.json + safetensors) instead."
        )
    return arch


def hf_config_from_gguf(
    meta: Mapping[str, Any],
    tensor_shapes: Mapping[str, tuple[int, ...]],
    rope_freqs: np.ndarray | None = None,
    path: str = "<metadata>",
) -> dict[str, Any]:
    """The HF config.json dict for a GGUF file's metadata and tensors.

    `tensor_shapes` are numpy-order shapes ([out, in]) by GGUF tensor name; `rope_freqs`
    is the dequantized `rope_freqs.weight` ([rotary_dim/2]) when the file has one.
    `tie_word_embeddings` is True when the file has no `output.weight`; for `gpt2` and
    `bloom`, whose converters write the tied head out as a copy, `load_gguf` also sets it
    True when `output.weight` is an exact copy of `token_embd.weight`.
    """
    arch = _check_architecture(meta.get("general.architecture"), path)

    def key(name: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise ValueError(
                f"GGUF file {path} lacks the metadata key {arch}.{name}, which the config needs; "
                "it was not written by a llama.cpp converter jaxcirc knows. Load the HF directory instead."
            )
        return value

    if meta.get(f"{arch}.expert_count"):
        raise ValueError(
            f"GGUF file {path} is a mixture-of-experts model ({arch}.expert_count = {meta[f'{arch}.expert_count']}); "
            "jaxcirc's GGUF loader supports dense models only."
        )
    hidden = int(key("embedding_length"))
    heads = int(key("attention.head_count"))
    layers = int(key("block_count"))
    kv_heads = key("attention.head_count_kv", heads)
    if isinstance(kv_heads, list):  # some files store one count per layer
        if len(set(kv_heads)) != 1:
            raise ValueError(
                f"GGUF file {path} has per-layer kv head counts {kv_heads}; only uniform ones are supported."
            )
        kv_heads = kv_heads[0]
    kv_heads = int(kv_heads)
    embd_shape = tensor_shapes.get("token_embd.weight")
    # The embedding's row count is what the weights need; metadata only says the same when present.
    vocab = embd_shape[0] if embd_shape else meta.get(f"{arch}.vocab_size") or len(meta["tokenizer.ggml.tokens"])
    context = int(key("context_length"))
    tokens = {
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }
    common = {"architectures": [_LAYOUTS[arch].hf_class], "model_type": arch}
    tied = "output.weight" not in tensor_shapes

    if arch in ("gpt2", "bloom"):
        # Multi-head attention with learned positions (GPT-2) or ALiBi (BLOOM): no rope, no GQA.
        if kv_heads != heads or hidden % heads:
            raise ValueError(
                f"GGUF file {path} ({arch}) has {heads} heads, {kv_heads} kv heads and embedding length {hidden}; "
                f"{arch} needs as many kv heads as heads and an embedding length divisible by the head count."
            )
        ffn = int(key("feed_forward_length", 4 * hidden))
        eps = _f32(key("attention.layer_norm_epsilon"))
        if arch == "gpt2":
            positions = tensor_shapes.get("position_embd.weight")
            return {
                **common,
                "n_embd": hidden,
                "n_layer": layers,
                "n_head": heads,
                "n_inner": ffn,
                # The position table's row count is what the weights need (GPT2Config's n_positions).
                "n_positions": int(positions[0]) if positions else context,
                "n_ctx": context,
                "layer_norm_epsilon": eps,
                # llama.cpp's GPT-2 MLP uses ggml_gelu, the tanh approximation (HF's gelu_new).
                "activation_function": "gelu_new",
                "vocab_size": int(vocab),
                "tie_word_embeddings": tied,
                **tokens,
            }
        if ffn != 4 * hidden:
            raise ValueError(
                f"GGUF file {path} (bloom) has feed_forward_length {ffn}; BLOOM's MLP is 4 x the embedding "
                f"length ({4 * hidden})."
            )
        return {
            **common,
            "hidden_size": hidden,
            "n_layer": layers,
            "n_head": heads,
            "layer_norm_epsilon": eps,
            "seq_length": context,  # ALiBi has no position table; only the training length
            "vocab_size": int(vocab),
            "tie_word_embeddings": tied,
            **tokens,
        }

    head_dim = int(
        meta.get(f"{arch}.attention.key_length") or meta.get(f"{arch}.rope.dimension_count") or hidden // heads
    )
    rope_theta = _f32(meta.get(f"{arch}.rope.freq_base", 10000.0))
    config: dict[str, Any] = {
        **common,
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "hidden_act": "silu",
        "rms_norm_eps": _f32(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": rope_theta,
        "max_position_embeddings": context,
        "vocab_size": int(vocab),
        "tie_word_embeddings": tied,
        **tokens,
    }
    if arch == "llama":
        # Qwen2's HF config has no head_dim / bias switches; Llama's does.
        config["head_dim"] = head_dim
        config["attention_bias"] = "blk.0.attn_q.bias" in tensor_shapes
        config["mlp_bias"] = "blk.0.ffn_up.bias" in tensor_shapes
    elif arch == "gemma2":
        del config["hidden_act"]
        window = int(meta.get(f"{arch}.attention.sliding_window") or 4096)  # llama.cpp's and HF's default
        config.update({
            "head_dim": head_dim,
            "hidden_activation": "gelu_pytorch_tanh",
            # llama.cpp's defaults (the same as Gemma2Config's) when the file does not state them.
            "attn_logit_softcapping": _f32(meta.get(f"{arch}.attn_logit_softcapping", 50.0)),
            "final_logit_softcapping": _f32(meta.get(f"{arch}.final_logit_softcapping", 30.0)),
            "sliding_window": window,
            # llama.cpp slides on even layers (swa pattern 2), as HF's default layer_types do.
            "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
            # llama.cpp stores no query scale. This is what transformers' GGUF loader assumes
            # (Gemma2Config's default, 256), right for Gemma 2 2B and 9B (head_dim 256). llama.cpp
            # itself scales by 1/sqrt(head_dim), except for 46-layer models (27B), where it uses
            # 1/sqrt(hidden / heads) (= 144, the HF checkpoint's value).
            "query_pre_attn_scalar": 256,
            "attention_bias": "blk.0.attn_q.bias" in tensor_shapes,
        })
    scaling = _rope_scaling(meta, arch)
    if rope_freqs is not None:
        rotary_dim = int(meta.get(f"{arch}.rope.dimension_count") or head_dim)
        original = meta.get(f"{arch}.rope.scaling.original_context_length")
        scaling = _llama3_rope_scaling(rope_freqs, rope_theta, rotary_dim, original) or scaling
    if scaling is not None:
        config["rope_scaling"] = scaling
    return config


# --------------------------------------------------------------------------- tensors


def hf_tensor_name(gguf_name: str, arch: str = "llama") -> str | None:
    """The HF state-dict name of a GGUF tensor name of architecture `arch`, or None if it has no
    HF counterpart."""
    layout = _LAYOUTS[arch]
    if gguf_name in layout.top:
        return layout.top[gguf_name]
    match = _BLOCK_NAME.match(gguf_name)
    if match and match.group(2) in layout.block:
        layer, part, kind = match.groups()
        if part.endswith("norm") and kind == "bias" and not layout.layer_norm:
            return None  # an RMSNorm has no bias
        return f"{layout.block_prefix.format(layer)}{layout.block[part]}.{kind}"
    return None


def unpermute_qk_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation ([out, ...] -> [out, ...]).

    llama.cpp stores each head's rows interleaved (pairs for its rope layout), HF stores
    them as two halves (rotate-half): rows (n, d/2, 2) -> (n, 2, d/2).
    """
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"Cannot un-permute {rows} rows into {n_heads} heads of an even size.")
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def bloom_qkv_from_llamacpp(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of BLOOM's fused query_key_value rows (weight [3d, d] or bias [3d]).

    HF's rows are per head, then q, k, v: (head, 3, d_head); llama.cpp stores all q rows, then
    all k, then all v: (3, head, d_head).
    """
    rows = w.shape[0]
    if rows % (3 * n_heads):
        raise ValueError(f"Cannot split {rows} fused qkv rows into q, k, v of {n_heads} heads.")
    return w.reshape(3, n_heads, rows // 3 // n_heads, *w.shape[1:]).swapaxes(0, 1).reshape(w.shape)


@functools.lru_cache(maxsize=1)
def supported_tensor_types() -> tuple[str, ...]:
    """Names of the GGML tensor types this installation can dequantize."""
    import gguf

    names = []
    for qtype in gguf.GGMLQuantizationType:
        if qtype == gguf.GGMLQuantizationType.F64:
            names.append(qtype.name)
            continue
        block, type_size = gguf.GGML_QUANT_SIZES.get(qtype, (0, 0))
        if not type_size:
            continue
        try:
            gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
        except NotImplementedError:
            continue
        except Exception:  # a type that is implemented but dislikes all-zero probes still counts
            pass
        names.append(qtype.name)
    return tuple(names)


def dequantize_tensor(tensor: Any, path: str = "<gguf>") -> np.ndarray:
    """A `gguf.ReaderTensor` as a float32 array in numpy order ([out, in]), owning its memory."""
    import gguf

    qtype = gguf.GGMLQuantizationType(tensor.tensor_type)
    shape = tuple(int(d) for d in reversed(tensor.shape))  # ReaderTensor.shape is ggml order
    if qtype == gguf.GGMLQuantizationType.F64:  # gguf's dequantize does not handle F64
        array = np.asarray(tensor.data).view(np.float64).astype(np.float32)
    else:
        try:
            array = gguf.quants.dequantize(tensor.data, qtype)
        except NotImplementedError:
            raise ValueError(
                f"Tensor {tensor.name!r} in {path} has type {qtype.name}, which the installed gguf package "
                f"cannot dequantize. Dequantizable types: {', '.join(supported_tensor_types())}. Re-quantize the "
                "file to one of those (llama.cpp's llama-quantize, e.g. Q8_0) or upgrade `gguf`."
            ) from None
    # F32 comes back as a view of the memory-mapped file; copy so the file can close.
    return np.array(array, dtype=np.float32, copy=True).reshape(shape)


def _undo_llamacpp(arch: str, name: str, array: np.ndarray, config: Mapping[str, Any]) -> np.ndarray:
    """A dequantized tensor as HF stores it: llama.cpp's converter changes undone (GGUF `name`)."""
    part = name.split(".")[-2]
    if arch == "llama" and part == "attn_q":
        # llama.cpp permutes q/k rows for llama only (its Qwen2 and Gemma 2 converters leave them as in HF).
        return unpermute_qk_rows(array, config["num_attention_heads"])
    if arch == "llama" and part == "attn_k":
        return unpermute_qk_rows(array, config["num_key_value_heads"])
    if arch == "gemma2" and name.endswith("norm.weight"):
        # Gemma's RMSNorm scales by (1 + w); llama.cpp stores 1 + w and scales by it.
        return array - np.float32(1.0)
    if arch == "gpt2" and part in _GPT2_CONV1D and name.endswith(".weight"):
        # HF's Conv1D keeps [in, out]; llama.cpp transposed it to [out, in].
        return np.ascontiguousarray(array.T)
    if arch == "bloom" and part == "attn_qkv":
        return bloom_qkv_from_llamacpp(array, config["n_head"])
    return array


def _required_names(arch: str, config: Mapping[str, Any]) -> list[str]:
    """The HF names the family's port needs (the head only when untied)."""
    layout = _LAYOUTS[arch]
    layers = config.get("num_hidden_layers", config.get("n_layer"))
    kinds = ("weight", "bias") if layout.block_biases else ("weight",)
    required = list(layout.required_top) + [
        f"{layout.block_prefix.format(i)}{module}.{kind}"
        for i in range(layers)
        for module in layout.block.values()
        for kind in kinds
    ]
    if not config["tie_word_embeddings"]:
        required.append("lm_head.weight")
    return required


def _convert(path: str) -> tuple[dict[str, Any], dict[str, np.ndarray], Tokenizer]:
    """Read and dequantize a GGUF file (no cache): (config, HF state dict, tokenizer)."""
    import gguf

    reader = gguf.GGUFReader(path)
    meta = gguf_metadata(reader)
    arch = _check_architecture(meta.get("general.architecture"), path)
    if int(meta.get("split.count", 1)) > 1:
        raise ValueError(
            f"{path} is one part of a split GGUF ({meta['split.count']} parts). Merge the parts into one file "
            "first (llama.cpp: `llama-gguf-split --merge first-part.gguf merged.gguf`)."
        )
    tensors = {t.name: t for t in reader.tensors}
    shapes = {name: tuple(int(d) for d in reversed(t.shape)) for name, t in tensors.items()}

    unknown = sorted(n for n in tensors if hf_tensor_name(n, arch) is None and n not in _CONFIG_ONLY_TENSORS)
    if unknown:
        raise ValueError(
            f"GGUF file {path} (architecture {arch!r}) has tensors jaxcirc does not know how to map to HF names: "
            f"{unknown[:8]}{' ...' if len(unknown) > 8 else ''}. It may be a variant of {arch!r} that jaxcirc "
            "does not support; load the model from its HF directory instead."
        )
    rope_freqs = dequantize_tensor(tensors["rope_freqs.weight"], path) if "rope_freqs.weight" in tensors else None
    config = hf_config_from_gguf(meta, shapes, rope_freqs, path)
    tokenizer = Tokenizer.from_gguf(meta)

    state: dict[str, np.ndarray] = {}
    for name, tensor in tensors.items():
        if name in _CONFIG_ONLY_TENSORS:
            continue
        state[hf_tensor_name(name, arch)] = _undo_llamacpp(arch, name, dequantize_tensor(tensor, path), config)

    if arch in _HEAD_COPIED and "lm_head.weight" in state:
        _untie_or_drop_head(arch, state, config, path)
    required = _required_names(arch, config)
    missing = [n for n in required if n not in state]
    if missing:
        raise ValueError(f"GGUF file {path} lacks tensors for {missing[:8]}{' ...' if len(missing) > 8 else ''}.")
    return config, state, tokenizer


def _untie_or_drop_head(arch: str, state: dict[str, np.ndarray], config: dict[str, Any], path: str) -> None:
    """GPT-2 and BLOOM tie the head to the embedding; llama.cpp's converters write it out as an
    `output.weight` copy anyway. An exact copy is dropped (tied, as in the HF checkpoint); a
    different head (e.g. quantized to another type than the embedding) stays as `lm_head.weight`
    for BLOOM (untied, as llama.cpp runs it) and is refused for GPT-2, whose port is always tied."""
    head = state["lm_head.weight"]
    embedding = state[_LAYOUTS[arch].top["token_embd.weight"]]
    if head.shape == embedding.shape and np.array_equal(head, embedding):
        del state["lm_head.weight"]
        config["tie_word_embeddings"] = True
        return
    if arch == "gpt2":
        diff = float(np.max(np.abs(head - embedding))) if head.shape == embedding.shape else float("nan")
        raise ValueError(
            f"GGUF file {path} (gpt2) has an output.weight that is not a copy of token_embd.weight (shapes "
            f"{head.shape} and {embedding.shape}, max abs difference {diff:.3g}; llama.cpp quantizes the two "
            "separately, often to different types). jaxcirc's GPT-2 ties the unembedding to the embedding, so it "
            "cannot use both. Re-quantize with the same type for both (llama-quantize --token-embedding-type T "
            "--output-tensor-type T) or load the model from its HF directory instead."
        )
    config["tie_word_embeddings"] = False


# --------------------------------------------------------------------------- cache


def _atomic_write(target: Path, data: bytes) -> None:
    """Write `data` to `target` so that readers see either the old file or the whole new one."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _file_crc32(path: Path, chunk_bytes: int = 1 << 24) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            crc = zlib.crc32(chunk, crc)
    return crc


def _read_cache(tensors_file: Path, meta_file: Path, sha256: str) -> tuple[dict, dict[str, np.ndarray], Tokenizer]:
    """A cache entry, validated (raises on any missing, partial or corrupt part)."""
    from safetensors import safe_open

    record = json.loads(meta_file.read_text(encoding="utf-8"))
    if record.get("format_version") != FORMAT_VERSION or record.get("source_sha256") != sha256:
        raise ValueError("cache record is for another file or format version")
    if tensors_file.stat().st_size != record["tensors_bytes"] or _file_crc32(tensors_file) != record["tensors_crc32"]:
        raise ValueError("cached tensors do not match their recorded size/checksum")
    with safe_open(tensors_file, framework="np") as f:
        state = {name: f.get_tensor(name) for name in f.keys()}
    if sorted(state) != sorted(record["tensor_names"]):
        raise ValueError("cached tensors are not the recorded set")
    return record["config"], state, Tokenizer.from_json(record["tokenizer"])


def _remove_stale_temporaries(folder: Path, older_than_s: float = 3600.0) -> None:
    """Delete temp files left by writers that were killed (each may be as large as a model)."""
    now = time.time()
    for tmp in folder.glob("*.tmp"):
        try:
            if now - tmp.stat().st_mtime > older_than_s:
                tmp.unlink()
        except OSError:
            pass  # another process removed or replaced it first


def _write_cache(
    tensors_file: Path,
    meta_file: Path,
    sha256: str,
    config: dict,
    state: Mapping[str, np.ndarray],
    tokenizer: Tokenizer,
) -> None:
    import safetensors.numpy

    tensors_file.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(tensors_file.parent)
    data = safetensors.numpy.save({k: np.ascontiguousarray(v) for k, v in state.items()})
    record = {
        "format_version": FORMAT_VERSION,
        "source_sha256": sha256,
        "tensors_bytes": len(data),
        "tensors_crc32": zlib.crc32(data),
        "tensor_names": sorted(state),
        "config": config,
        "tokenizer": tokenizer.to_json(),
    }
    _atomic_write(tensors_file, data)
    del data
    # The record goes last: it is what marks the entry complete.
    _atomic_write(meta_file, json.dumps(record).encode("utf-8"))


def load_gguf(
    path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None
) -> tuple[dict[str, Any], dict[str, np.ndarray], Tokenizer]:
    """Load a GGUF file as (HF config dict, HF-named float32 state dict, tokenizer).

    Second and later loads of the same file (same sha256) read the dequantized tensors
    from the cache in `cache_dir` (default `default_cache_dir()`).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"No GGUF file at {path}.")
    sha256 = file_sha256(path)
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    tensors_file, meta_file = _cache_paths(cache_root, sha256)

    provenance = {"_jaxcirc_source_sha256": sha256, "_jaxcirc_source_path": str(path)}
    if meta_file.is_file() or tensors_file.is_file():
        try:
            config, state, tokenizer = _read_cache(tensors_file, meta_file, sha256)
            return {**config, **provenance, "_jaxcirc_cache_hit": True}, state, tokenizer
        except Exception as err:  # any damage means: rebuild, never crash
            logger.warning("Ignoring unusable GGUF cache entry %s (%s); rebuilding it.", meta_file, err)

    config, state, tokenizer = _convert(str(path))
    try:
        _write_cache(tensors_file, meta_file, sha256, config, state, tokenizer)
    except OSError as err:  # a read-only or full disk costs speed next time, not this load
        logger.warning(
            "Could not write the GGUF cache in %s (%s); set JAXCIRC_CACHE_DIR to a writable folder.", cache_root, err
        )
    return {**config, **provenance, "_jaxcirc_cache_hit": False}, state, tokenizer
