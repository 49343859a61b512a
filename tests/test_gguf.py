"""GGUF loading: parity with transformers' GGUF loader, config, caching, clear errors."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from jaxcirc.models import gguf as jgguf  # noqa: E402
from jaxcirc.tokenizer import _byte_alphabet  # noqa: E402


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("jaxcirc-cache")


@pytest.fixture(scope="module")
def smollm(smollm_path, cache_dir):
    """(config, state_dict, tokenizer) from a cold cache."""
    return jgguf.load_gguf(smollm_path, cache_dir=cache_dir)


@pytest.fixture(scope="module")
def hf_model(smollm2_transformers):
    return smollm2_transformers


# --------------------------------------------------------------------------- a tiny GGUF writer

_TINY_MERGES = ["Ġ t", "h e", "Ġt he"]


def _tiny_vocab() -> tuple[list[str], list[int]]:
    """<|endoftext|> (control), the 256 byte-level characters, then the merge results."""
    tokens = ["<|endoftext|>"] + [_byte_alphabet()[b] for b in range(256)] + ["Ġt", "he", "Ġthe"]
    types = [3] + [1] * (len(tokens) - 1)
    return tokens, types


def _llamacpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to HF q/k rows (the inverse of unpermute_qk_rows)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _begin_gguf(path: Path, arch: str, pre: str = "smollm") -> Any:
    """A GGUFWriter for `arch` with the tiny byte-level BPE vocabulary's metadata written."""
    tokens, types = _tiny_vocab()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(_TINY_MERGES)
    w.add_uint32("tokenizer.ggml.bos_token_id", 0)
    w.add_uint32("tokenizer.ggml.eos_token_id", 0)
    w.add_bool("tokenizer.ggml.add_bos_token", False)
    return w


def _finish_gguf(w: Any) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _tensor_adder(w: Any, hf: dict[str, np.ndarray]):
    """put(gguf_name, hf_name, value, kind, stored): record `value` (float32) as the HF tensor
    `hf_name` and write `stored` (default: `value`) as `kind` (f32, f16 or q8_0)."""

    def put(gguf_name: str, hf_name: str | None, value: np.ndarray, kind: str = "f32", stored=None) -> None:
        value = np.asarray(value, dtype=np.float32)
        if hf_name is not None:
            hf[hf_name] = value
        data = value if stored is None else np.asarray(stored, dtype=np.float32)
        if kind == "q8_0":
            w.add_tensor(gguf_name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        elif kind == "f16":
            w.add_tensor(gguf_name, data.astype(np.float16))
        else:
            w.add_tensor(gguf_name, np.ascontiguousarray(data))

    return put


def _matrix(rng, rows: int, cols: int) -> np.ndarray:
    """A random [rows, cols] weight scaled so activations stay O(1) (1/sqrt(fan-in))."""
    return rng.normal(size=(rows, cols)) / math.sqrt(cols)


def write_tiny_gemma2(
    path: Path,
    *,
    seed: int = 0,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 24,
    ffn: int = 96,
    window: int = 8,
    attn_softcap: float = 50.0,
    final_softcap: float = 30.0,
) -> dict[str, np.ndarray]:
    """A small random Gemma 2 in llama.cpp's layout: every RMSNorm weight stored as 1 + w, the
    pre-/post-norms as attn_norm, post_attention_norm, ffn_norm, post_ffw_norm, head_dim (not
    hidden / heads) as attention.key_length. The soft caps default to the values transformers'
    GGUF loader assumes (it does not read them from the file). Tied head (no output.weight), as
    every Gemma 2; transformers' GGUF loader could not load an untied one (it maps no output.weight
    for gemma2). Returns the HF weights."""
    rng = np.random.default_rng(seed)
    vocab = len(_tiny_vocab()[0])
    arch = "gemma2"
    w = _begin_gguf(path, arch)
    for key, value in (("block_count", layers), ("context_length", 256), ("embedding_length", hidden),
                       ("feed_forward_length", ffn), ("attention.head_count", heads),
                       ("attention.head_count_kv", kv_heads), ("attention.key_length", head_dim),
                       ("attention.value_length", head_dim), ("attention.sliding_window", window)):
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float32(f"{arch}.attn_logit_softcapping", attn_softcap)
    w.add_float32(f"{arch}.final_logit_softcapping", final_softcap)
    hf: dict[str, np.ndarray] = {}
    put = _tensor_adder(w, hf)

    def norm(gguf_name: str, hf_name: str) -> None:
        stored = (1 + 0.1 * rng.normal(size=hidden)).astype(np.float32)  # llama.cpp's 1 + w
        put(gguf_name, hf_name, stored - np.float32(1), stored=stored)

    put("token_embd.weight", "model.embed_tokens.weight", rng.normal(size=(vocab, hidden)))
    norm("output_norm.weight", "model.norm.weight")
    for i in range(layers):
        p = f"model.layers.{i}."
        put(f"blk.{i}.attn_q.weight", p + "self_attn.q_proj.weight", _matrix(rng, heads * head_dim, hidden))
        put(f"blk.{i}.attn_k.weight", p + "self_attn.k_proj.weight", _matrix(rng, kv_heads * head_dim, hidden))
        put(f"blk.{i}.attn_v.weight", p + "self_attn.v_proj.weight", _matrix(rng, kv_heads * head_dim, hidden),
            "f16")
        put(f"blk.{i}.attn_output.weight", p + "self_attn.o_proj.weight", _matrix(rng, hidden, heads * head_dim),
            "q8_0")
        put(f"blk.{i}.ffn_gate.weight", p + "mlp.gate_proj.weight", _matrix(rng, ffn, hidden), "q8_0")
        put(f"blk.{i}.ffn_up.weight", p + "mlp.up_proj.weight", _matrix(rng, ffn, hidden), "q8_0")
        put(f"blk.{i}.ffn_down.weight", p + "mlp.down_proj.weight", _matrix(rng, hidden, ffn), "q8_0")
        norm(f"blk.{i}.attn_norm.weight", p + "input_layernorm.weight")
        norm(f"blk.{i}.post_attention_norm.weight", p + "post_attention_layernorm.weight")
        norm(f"blk.{i}.ffn_norm.weight", p + "pre_feedforward_layernorm.weight")
        norm(f"blk.{i}.post_ffw_norm.weight", p + "post_feedforward_layernorm.weight")
    _finish_gguf(w)
    return hf


def _write_layernorm_model(path: Path, arch: str, *, seed: int, layers: int, hidden: int, heads: int,
                           context: int, head: str) -> dict[str, np.ndarray]:
    """GPT-2 or BLOOM in llama.cpp's layout (LayerNorms with biases, fused qkv, biases everywhere).

    GPT-2: HF's Conv1D weights ([in, out]) stored transposed ([out, in]), learned positions.
    BLOOM: the fused qkv rows stored as all q, all k, all v (HF: per head q, k, v), an embedding
    LayerNorm. `head`: "copy" writes output.weight as a copy of the embedding (what llama.cpp's
    converters do), "none" leaves it out, "different" writes an unrelated matrix."""
    rng = np.random.default_rng(seed)
    vocab = len(_tiny_vocab()[0])
    ffn, d_head = 4 * hidden, hidden // heads
    w = _begin_gguf(path, arch, pre="gpt-2")
    for key, value in (("block_count", layers), ("context_length", context), ("embedding_length", hidden),
                       ("feed_forward_length", ffn), ("attention.head_count", heads),
                       ("attention.head_count_kv", heads)):
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.attention.layer_norm_epsilon", 1e-5)
    hf: dict[str, np.ndarray] = {}
    put = _tensor_adder(w, hf)
    gpt2 = arch == "gpt2"
    top = "transformer."

    def layer_norm(gguf_name: str, hf_name: str) -> None:
        put(f"{gguf_name}.weight", f"{hf_name}.weight", 1 + 0.1 * rng.normal(size=hidden))
        put(f"{gguf_name}.bias", f"{hf_name}.bias", 0.1 * rng.normal(size=hidden))

    def linear(gguf_name: str, hf_name: str, rows: int, cols: int, kind: str = "f32", stored=None) -> None:
        """An HF Linear ([out, in] = [rows, cols]) or, for GPT-2, Conv1D ([in, out]) and its bias."""
        weight = _matrix(rng, rows, cols)
        if gpt2:
            put(f"{gguf_name}.weight", f"{hf_name}.weight", weight.T, kind, stored=weight)
        else:
            put(f"{gguf_name}.weight", f"{hf_name}.weight", weight, kind,
                stored=None if stored is None else stored(weight))
        bias = 0.1 * rng.normal(size=rows)
        put(f"{gguf_name}.bias", f"{hf_name}.bias", bias, stored=None if stored is None or gpt2 else stored(bias))

    embedding = (0.5 * rng.normal(size=(vocab, hidden))).astype(np.float32)
    if gpt2:
        put("token_embd.weight", top + "wte.weight", embedding)
        put("position_embd.weight", top + "wpe.weight", 0.5 * rng.normal(size=(context, hidden)))
    else:
        put("token_embd.weight", top + "word_embeddings.weight", embedding)
        layer_norm("token_embd_norm", top + "word_embeddings_layernorm")
    layer_norm("output_norm", top + "ln_f")
    if head == "copy":
        put("output.weight", None, embedding)
    elif head == "different":
        put("output.weight", "lm_head.weight", rng.normal(size=(vocab, hidden)))

    def llamacpp_qkv(x: np.ndarray) -> np.ndarray:
        """What llama.cpp's BLOOM converter does to the fused rows: (head, 3, d_head) -> (3, head, d_head)."""
        return x.reshape(heads, 3, d_head, *x.shape[1:]).swapaxes(0, 1).reshape(x.shape)

    for i in range(layers):
        p = f"{top}h.{i}."
        if gpt2:
            layer_norm(f"blk.{i}.attn_norm", p + "ln_1")
            linear(f"blk.{i}.attn_qkv", p + "attn.c_attn", 3 * hidden, hidden)
            linear(f"blk.{i}.attn_output", p + "attn.c_proj", hidden, hidden, "f16")
            layer_norm(f"blk.{i}.ffn_norm", p + "ln_2")
            linear(f"blk.{i}.ffn_up", p + "mlp.c_fc", ffn, hidden, "q8_0")
            linear(f"blk.{i}.ffn_down", p + "mlp.c_proj", hidden, ffn, "q8_0")
        else:
            layer_norm(f"blk.{i}.attn_norm", p + "input_layernorm")
            linear(f"blk.{i}.attn_qkv", p + "self_attention.query_key_value", 3 * hidden, hidden,
                   stored=llamacpp_qkv)
            linear(f"blk.{i}.attn_output", p + "self_attention.dense", hidden, hidden, "f16")
            layer_norm(f"blk.{i}.ffn_norm", p + "post_attention_layernorm")
            linear(f"blk.{i}.ffn_up", p + "mlp.dense_h_to_4h", ffn, hidden, "q8_0")
            linear(f"blk.{i}.ffn_down", p + "mlp.dense_4h_to_h", hidden, ffn, "q8_0")
    _finish_gguf(w)
    return hf


def write_tiny_gpt2(path: Path, *, seed: int = 0, layers: int = 2, hidden: int = 64, heads: int = 4,
                    context: int = 1024, head: str = "copy") -> dict[str, np.ndarray]:
    """A small random GPT-2 in llama.cpp's layout (see `_write_layernorm_model`). `context` is
    1024 because transformers' GGUF loader keeps GPT2Config's default n_positions (1024)."""
    return _write_layernorm_model(path, "gpt2", seed=seed, layers=layers, hidden=hidden, heads=heads,
                                  context=context, head=head)


def write_tiny_bloom(path: Path, *, seed: int = 0, layers: int = 2, hidden: int = 64, heads: int = 4,
                     head: str = "copy") -> dict[str, np.ndarray]:
    """A small random BLOOM in llama.cpp's layout (see `_write_layernorm_model`)."""
    return _write_layernorm_model(path, "bloom", seed=seed, layers=layers, hidden=hidden, heads=heads,
                                  context=256, head=head)


_ARCH_WRITERS = {"gemma2": write_tiny_gemma2, "gpt2": write_tiny_gpt2, "bloom": write_tiny_bloom}


def write_tiny_gguf(
    path: Path,
    arch: str = "llama",
    *,
    seed: int = 0,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    ffn: int = 96,
    tied: bool = True,
    extra_tensors: dict[str, np.ndarray] | None = None,
    **options: Any,
) -> dict[str, np.ndarray]:
    """Write a small random model in llama.cpp's layout; return its HF-named weights ([out, in]).

    `gemma2` (with kv_heads and ffn; always tied), `gpt2` and `bloom` (MLP 4 x hidden; `head`
    instead of `tied`) go to their own writers, with `options`. Otherwise a
    llama-layout model under `arch`'s metadata keys: block weights go in as Q8_0 (ffn), F16 (o_proj)
    and F32 (q/k/v, norms) to exercise several tensor types; q/k rows are permuted as llama.cpp
    does for `llama`.
    """
    if arch == "gemma2":
        options.update(kv_heads=kv_heads, ffn=ffn)
    if arch in _ARCH_WRITERS:
        return _ARCH_WRITERS[arch](path, seed=seed, layers=layers, hidden=hidden, heads=heads, **options)
    rng = np.random.default_rng(seed)
    tokens, _ = _tiny_vocab()
    vocab = len(tokens)
    head_dim = hidden // heads
    w = _begin_gguf(path, arch)
    w.add_uint32(f"{arch}.block_count", layers)
    w.add_uint32(f"{arch}.context_length", 256)
    w.add_uint32(f"{arch}.embedding_length", hidden)
    w.add_uint32(f"{arch}.feed_forward_length", ffn)
    w.add_uint32(f"{arch}.attention.head_count", heads)
    w.add_uint32(f"{arch}.attention.head_count_kv", kv_heads)
    w.add_float32(f"{arch}.rope.freq_base", 10000.0)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    if arch == "llama":
        w.add_uint32(f"{arch}.rope.dimension_count", head_dim)

    hf: dict[str, np.ndarray] = {}
    put = _tensor_adder(w, hf)

    put("token_embd.weight", "model.embed_tokens.weight", rng.normal(size=(vocab, hidden)))
    put("output_norm.weight", "model.norm.weight", 1 + 0.1 * rng.normal(size=hidden))
    if not tied:
        put("output.weight", "lm_head.weight", rng.normal(size=(vocab, hidden)))
    for i in range(layers):
        p = f"model.layers.{i}."
        q = rng.normal(size=(heads * head_dim, hidden))
        k = rng.normal(size=(kv_heads * head_dim, hidden))
        permute = arch == "llama"
        stored_q = _llamacpp_permute(q, heads) if permute else q
        stored_k = _llamacpp_permute(k, kv_heads) if permute else k
        put(f"blk.{i}.attn_q.weight", p + "self_attn.q_proj.weight", q, stored=stored_q)
        put(f"blk.{i}.attn_k.weight", p + "self_attn.k_proj.weight", k, stored=stored_k)
        put(f"blk.{i}.attn_v.weight", p + "self_attn.v_proj.weight", rng.normal(size=(kv_heads * head_dim, hidden)))
        o = rng.normal(size=(hidden, heads * head_dim))
        put(f"blk.{i}.attn_output.weight", p + "self_attn.o_proj.weight", o, "f16")
        if arch == "qwen2":
            for part, rows in (("q", heads), ("k", kv_heads), ("v", kv_heads)):
                put(f"blk.{i}.attn_{part}.bias", p + f"self_attn.{part}_proj.bias", rng.normal(size=rows * head_dim))
        put(f"blk.{i}.ffn_gate.weight", p + "mlp.gate_proj.weight", rng.normal(size=(ffn, hidden)), "q8_0")
        put(f"blk.{i}.ffn_up.weight", p + "mlp.up_proj.weight", rng.normal(size=(ffn, hidden)), "q8_0")
        put(f"blk.{i}.ffn_down.weight", p + "mlp.down_proj.weight", rng.normal(size=(hidden, ffn)), "q8_0")
        put(f"blk.{i}.attn_norm.weight", p + "input_layernorm.weight", 1 + 0.1 * rng.normal(size=hidden))
        put(f"blk.{i}.ffn_norm.weight", p + "post_attention_layernorm.weight", 1 + 0.1 * rng.normal(size=hidden))
    for name, value in (extra_tensors or {}).items():
        w.add_tensor(name, value)
    _finish_gguf(w)
    return hf


@pytest.fixture
def tiny_llama(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path / "tiny-llama.gguf"
    return path, write_tiny_gguf(path)


# --------------------------------------------------------------------------- SmolLM2 vs transformers


def test_smollm_state_dict_matches_transformers(smollm, hf_model):
    config, state, _ = smollm
    reference = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    if config["tie_word_embeddings"]:
        reference.pop("lm_head.weight")  # transformers lists the tied head; the file has no output.weight
    assert sorted(state) == sorted(reference)
    worst = 0.0
    for name, expected in reference.items():
        got = state[name]
        assert got.dtype == np.float32, name
        assert got.shape == expected.shape, name
        diff = float(np.max(np.abs(got - expected)))
        worst = max(worst, diff)
        assert diff <= 1e-6, f"{name}: max abs diff {diff}"
    print(f"max abs diff over {len(reference)} tensors: {worst}")


def test_smollm_config_matches_transformers(smollm, hf_model):
    config, _, _ = smollm
    hf = hf_model.config
    for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "vocab_size",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act",
                "attention_bias", "mlp_bias"):
        assert config[key] == getattr(hf, key), key
    # transformers keeps the float32 value widened (9.99999974e-06); we keep its shortest spelling (1e-05).
    assert np.float32(config["rms_norm_eps"]) == np.float32(hf.rms_norm_eps)
    assert config["rope_theta"] == hf.rope_parameters["rope_theta"]
    assert "rope_scaling" not in config


def test_smollm_config_values(smollm):
    config, state, tokenizer = smollm
    expected = {
        "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0, "max_position_embeddings": 8192, "vocab_size": 49152,
        "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
    }
    assert {k: config[k] for k in expected} == expected
    assert "lm_head.weight" not in state
    assert len(config["_jaxcirc_source_sha256"]) == 64
    assert config["_jaxcirc_cache_hit"] is False
    assert state["model.layers.0.self_attn.q_proj.weight"].shape == (576, 576)
    assert state["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert state["model.layers.0.mlp.down_proj.weight"].shape == (576, 1536)
    assert tokenizer.encode("The capital of France is") == [504, 3575, 282, 4649, 314]


def test_smollm_second_load_uses_cache(smollm, smollm_path, cache_dir, monkeypatch):
    config, state, _ = smollm

    def no_dequantizing(*args, **kwargs):
        raise AssertionError("the cached load dequantized a tensor")

    monkeypatch.setattr(jgguf, "dequantize_tensor", no_dequantizing)
    monkeypatch.setattr(gguf.quants, "dequantize", no_dequantizing)
    config2, state2, tokenizer2 = jgguf.load_gguf(smollm_path, cache_dir=cache_dir)
    assert config2["_jaxcirc_cache_hit"] is True
    assert {k: v for k, v in config2.items() if k != "_jaxcirc_cache_hit"} == {
        k: v for k, v in config.items() if k != "_jaxcirc_cache_hit"
    }
    assert sorted(state2) == sorted(state)
    for name in state:
        np.testing.assert_array_equal(state2[name], state[name])
    assert tokenizer2.encode("The capital of France is") == [504, 3575, 282, 4649, 314]


def test_cache_dir_from_environment(tiny_llama, tmp_path, monkeypatch):
    path, _ = tiny_llama
    monkeypatch.setenv("JAXCIRC_CACHE_DIR", str(tmp_path / "env-cache"))
    assert jgguf.default_cache_dir() == tmp_path / "env-cache"
    jgguf.load_gguf(path)
    assert list((tmp_path / "env-cache" / "gguf").glob("*.safetensors"))
    assert jgguf.load_gguf(path)[0]["_jaxcirc_cache_hit"] is True


# --------------------------------------------------------------------------- tiny files: conversion


def test_tiny_llama_unpermutes_and_dequantizes(tiny_llama, tmp_path):
    path, hf = tiny_llama
    config, state, tokenizer = jgguf.load_gguf(path, cache_dir=tmp_path / "cache")
    assert sorted(state) == sorted(hf)
    for name, expected in hf.items():
        tol = 0.05 if ".mlp." in name else (2e-3 if "o_proj" in name else 0.0)  # Q8_0, F16, F32
        np.testing.assert_allclose(state[name], expected, atol=tol, rtol=0, err_msg=name)
    assert config["head_dim"] == 16 and config["num_key_value_heads"] == 2
    assert tokenizer.encode(" the") == [259]  # "Ġthe", via both merges
    assert tokenizer.vocab_size == 260


# (our config key, transformers' config attribute) per architecture, compared exactly.
_CONFIG_PARITY_KEYS = {
    "llama": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "max_position_embeddings", "attention_bias", "mlp_bias"),
    "qwen2": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "max_position_embeddings"),
    "gemma2": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window",
               "attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar",
               "hidden_activation", "layer_types", "tie_word_embeddings"),
    "gpt2": ("n_embd", "n_layer", "n_head", "n_positions", "activation_function"),
    "bloom": ("hidden_size", "n_layer", "n_head", "tie_word_embeddings"),
}
_EPS_KEY = {"llama": "rms_norm_eps", "qwen2": "rms_norm_eps", "gemma2": "rms_norm_eps",
            "gpt2": "layer_norm_epsilon", "bloom": "layer_norm_epsilon"}
# The HF name of each architecture's token embedding.
_EMBEDDING = {"llama": "model.embed_tokens.weight", "qwen2": "model.embed_tokens.weight",
              "gemma2": "model.embed_tokens.weight", "gpt2": "transformer.wte.weight",
              "bloom": "transformer.word_embeddings.weight"}


@pytest.mark.parametrize("arch, options", [
    ("llama", {"tied": False}), ("qwen2", {"tied": False}), ("gemma2", {}), ("gpt2", {}), ("bloom", {}),
], ids=["llama", "qwen2", "gemma2", "gpt2", "bloom"])
def test_tiny_matches_transformers(arch, options, tmp_path):
    """State dict and config equal transformers' own GGUF loader's for the same file."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    path = tmp_path / f"tiny-{arch}.gguf"
    write_tiny_gguf(path, arch, **options)
    config, state, _ = jgguf.load_gguf(path, cache_dir=tmp_path / "cache")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    reference = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    if config["tie_word_embeddings"]:
        # transformers lists the tied head (for gpt2: the file's output.weight copy, which we drop).
        np.testing.assert_array_equal(reference.pop("lm_head.weight"), state[_EMBEDDING[arch]])
    assert sorted(state) == sorted(reference)
    for name, expected in reference.items():
        assert state[name].dtype == np.float32 and state[name].shape == expected.shape, name
        np.testing.assert_allclose(state[name], expected, atol=1e-6, rtol=0, err_msg=name)
    hf = model.config
    assert config["model_type"] == hf.model_type == arch
    assert config["architectures"] == [type(model).__name__]
    assert config["vocab_size"] == hf.vocab_size == 260
    for key in _CONFIG_PARITY_KEYS[arch]:
        assert config[key] == getattr(hf, key), key
    assert np.float32(config[_EPS_KEY[arch]]) == np.float32(getattr(hf, _EPS_KEY[arch]))
    if arch == "gpt2":
        assert config["n_inner"] == (hf.n_inner or 4 * hf.n_embd)
        assert config["tie_word_embeddings"] is True  # the output.weight copy is dropped
    elif arch != "bloom":
        assert config["tie_word_embeddings"] is options.get("tied", True)
    if arch == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in state


def _loose(name: str) -> float:
    """Tolerance of a tiny-writer tensor against its pre-quantization value: Q8_0 / F16 vs exact F32."""
    lossy = ("mlp.", "o_proj", "v_proj", "c_proj", "self_attention.dense")
    return 0.05 if any(part in name for part in lossy) else 0.0


@pytest.mark.parametrize("arch", ["gemma2", "gpt2", "bloom"])
def test_tiny_conversion_undoes_llamacpp(arch, tmp_path, monkeypatch):
    """Against the weights before the writer applied llama.cpp's conversions (+1 on Gemma 2 norms,
    GPT-2's Conv1D transposed, BLOOM's qkv rows reordered), independently of transformers; then the
    second load comes from the cache, unchanged."""
    path = tmp_path / f"tiny-{arch}.gguf"
    hf = write_tiny_gguf(path, arch)
    config, state, tokenizer = jgguf.load_gguf(path, cache_dir=tmp_path / "cache")
    assert sorted(state) == sorted(hf)
    for name, expected in hf.items():
        assert state[name].shape == expected.shape, name
        np.testing.assert_allclose(state[name], expected, atol=_loose(name), rtol=0, err_msg=name)
    assert config["tie_word_embeddings"] is True and "lm_head.weight" not in state
    if arch == "gemma2":
        assert (config["head_dim"], config["sliding_window"], config["query_pre_attn_scalar"]) == (24, 8, 256)
        assert (config["attn_logit_softcapping"], config["final_logit_softcapping"]) == (50.0, 30.0)
        assert config["layer_types"] == ["sliding_attention", "full_attention"]
    elif arch == "gpt2":
        assert (config["n_positions"], config["n_inner"], config["n_head"]) == (1024, 256, 4)
        assert state["transformer.h.0.attn.c_attn.weight"].shape == (64, 192)  # Conv1D: [in, out]
    else:
        assert (config["n_head"], config["hidden_size"], config["n_layer"]) == (4, 64, 2)
    assert tokenizer.encode(" the") == [259]

    def no_dequantizing(*args, **kwargs):
        raise AssertionError("the cached load dequantized a tensor")

    monkeypatch.setattr(jgguf, "dequantize_tensor", no_dequantizing)
    config2, state2, _ = jgguf.load_gguf(path, cache_dir=tmp_path / "cache")
    assert config2.pop("_jaxcirc_cache_hit") is True and config.pop("_jaxcirc_cache_hit") is False
    assert config2 == config
    assert sorted(state2) == sorted(state)
    for name in state:
        np.testing.assert_array_equal(state2[name], state[name])


GGUF_LOGITS_TOL = 5e-5


@pytest.mark.parametrize("arch", ["gemma2", "gpt2", "bloom"])
def test_tiny_logits_match_transformers(arch, tmp_path):
    """End to end: `jaxcirc.load(file.gguf)` gives the fp32 log-softmax transformers gives for the
    same file (its own GGUF loader, eager attention), every position of 3 sequences of 24 tokens
    (3 Gemma 2 sliding windows of 8)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import jaxcirc
    from jaxcirc.cli import log_softmax

    path = tmp_path / f"tiny-{arch}.gguf"
    write_tiny_gguf(path, arch)
    model = jaxcirc.load(path, cache_dir=tmp_path / "cache")
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager").eval()
    tokens = np.random.default_rng(1).integers(0, 260, size=(3, 24)).astype(np.int32)
    ours = log_softmax(np.asarray(jaxcirc.run(model, tokens)[0]))
    with torch.no_grad():
        theirs = torch.log_softmax(reference(torch.as_tensor(tokens, dtype=torch.long)).logits.double(), -1)
    diff = float(np.abs(ours - theirs.numpy()).max())
    print(f"{arch} GGUF: max |log_softmax diff| = {diff:.2e}")
    assert diff <= GGUF_LOGITS_TOL

    cfg = model.config
    assert cfg.family == arch and cfg.dtype == "float32" and cfg.n_layers == 2 and cfg.d_model == 64
    assert cfg.tied_embeddings and model.source_hash == jgguf.file_sha256(path)
    if arch == "gemma2":
        assert cfg.d_head == 24 and cfg.n_kv_heads == 2 and cfg.layer_windows == (8, 0)
        assert (cfg.attn_softcap, cfg.final_softcap) == (50.0, 30.0)
        assert cfg.query_scale == pytest.approx(256 ** -0.5)
    elif arch == "gpt2":
        assert cfg.positional == "learned" and cfg.n_ctx == 1024 and cfg.norm == "layernorm"
    else:
        assert cfg.positional == "alibi" and cfg.norm == "layernorm"


@pytest.mark.parametrize("head", ["none", "different"])
@pytest.mark.parametrize("arch", ["gpt2", "bloom"])
def test_copied_head_of_gpt2_and_bloom(arch, head, tmp_path):
    """llama.cpp writes GPT-2's and BLOOM's tied head out as an output.weight copy (tested above);
    without one the model is tied; a different one stays (untied) for BLOOM and is refused, with the
    reason, for GPT-2, which jaxcirc always ties."""
    from jaxcirc.models.hf import params_from_hf_tensors

    path = tmp_path / f"{arch}-{head}.gguf"
    hf = write_tiny_gguf(path, arch, head=head)
    if arch == "gpt2" and head == "different":
        with pytest.raises(ValueError, match=r"output\.weight.*not a copy of token_embd\.weight.*HF directory"):
            jgguf.load_gguf(path, cache_dir=tmp_path / "cache")
        return
    config, state, _ = jgguf.load_gguf(path, cache_dir=tmp_path / "cache")
    tied = head == "none"
    assert config["tie_word_embeddings"] is tied
    assert ("lm_head.weight" in state) is not tied
    if not tied:
        np.testing.assert_array_equal(state["lm_head.weight"], hf["lm_head.weight"])
    cfg, params = params_from_hf_tensors(config, state)
    assert cfg.tied_embeddings is tied and ("W_U" in params) is not tied


def _gemma2_meta(**extra):
    meta = {
        "general.architecture": "gemma2", "gemma2.block_count": 3, "gemma2.context_length": 8192,
        "gemma2.embedding_length": 64, "gemma2.feed_forward_length": 128, "gemma2.attention.head_count": 4,
        "gemma2.attention.head_count_kv": 2, "gemma2.attention.key_length": 32,
        "gemma2.attention.layer_norm_rms_epsilon": 1e-6,
    }
    meta.update(extra)
    return meta


def test_gemma2_config_reads_llamacpp_metadata():
    """The soft caps and window come from the file (transformers' GGUF loader ignores the caps and
    keeps Gemma2Config's 50 / 30); absent, llama.cpp's defaults (50, 30, 4096) apply."""
    from jaxcirc.models.hf import family_for

    shapes = {"token_embd.weight": (260, 64)}
    config = jgguf.hf_config_from_gguf(_gemma2_meta(**{
        "gemma2.attn_logit_softcapping": 20.0, "gemma2.final_logit_softcapping": 10.0,
        "gemma2.attention.sliding_window": 16}), shapes)
    assert (config["attn_logit_softcapping"], config["final_logit_softcapping"], config["sliding_window"]) == (
        20.0, 10.0, 16)
    assert config["head_dim"] == 32 and config["layer_types"] == [
        "sliding_attention", "full_attention", "sliding_attention"]
    cfg = family_for(config).config_from_hf(dict(config))
    assert (cfg.attn_softcap, cfg.final_softcap, cfg.layer_windows, cfg.d_head) == (20.0, 10.0, (16, 0, 16), 32)
    assert cfg.norm_offset == 1.0 and cfg.tied_embeddings
    defaults = jgguf.hf_config_from_gguf(_gemma2_meta(), shapes)
    assert (defaults["attn_logit_softcapping"], defaults["final_logit_softcapping"], defaults["sliding_window"]) == (
        50.0, 30.0, 4096)


def test_layernorm_architectures_refuse_what_their_ports_cannot_express():
    base = {"general.architecture": "bloom", "bloom.block_count": 2, "bloom.context_length": 256,
            "bloom.embedding_length": 64, "bloom.attention.head_count": 4, "bloom.attention.layer_norm_epsilon": 1e-5,
            "bloom.vocab_size": 100}
    assert jgguf.hf_config_from_gguf(base, {})["n_head"] == 4
    with pytest.raises(ValueError, match="feed_forward_length 128"):
        jgguf.hf_config_from_gguf({**base, "bloom.feed_forward_length": 128}, {})
    with pytest.raises(ValueError, match="kv heads"):
        jgguf.hf_config_from_gguf({**base, "bloom.attention.head_count_kv": 2}, {})


def test_bloom_qkv_reorder_inverts_llamacpp():
    w = np.arange(3 * 12 * 5, dtype=np.float32).reshape(36, 5)
    for heads in (1, 2, 3, 6):
        d_head = 36 // 3 // heads
        stored = w.reshape(heads, 3, d_head, 5).swapaxes(0, 1).reshape(w.shape)  # llama.cpp's order
        np.testing.assert_array_equal(jgguf.bloom_qkv_from_llamacpp(stored, heads), w)
        np.testing.assert_array_equal(jgguf.bloom_qkv_from_llamacpp(stored[:, 0], heads), w[:, 0])  # a bias


# --------------------------------------------------------------------------- tiny files: cache robustness


def _cache_files(cache: Path) -> tuple[Path, Path]:
    (tensors,) = (cache / "gguf").glob("*.safetensors")
    (record,) = (cache / "gguf").glob("*.json")
    return tensors, record


@pytest.mark.parametrize("damage", ["flip-byte", "truncate", "garbage-record", "delete-tensors", "empty-record"])
def test_corrupt_cache_is_rebuilt(damage, tiny_llama, tmp_path):
    path, _ = tiny_llama
    cache = tmp_path / "cache"
    _, first, _ = jgguf.load_gguf(path, cache_dir=cache)
    tensors, record = _cache_files(cache)
    if damage == "flip-byte":
        data = bytearray(tensors.read_bytes())
        data[-5] ^= 0xFF
        tensors.write_bytes(bytes(data))
    elif damage == "truncate":
        tensors.write_bytes(tensors.read_bytes()[: tensors.stat().st_size // 2])
    elif damage == "garbage-record":
        record.write_text("{not json")
    elif damage == "delete-tensors":
        tensors.unlink()
    else:
        record.write_text("")
    config, state, _ = jgguf.load_gguf(path, cache_dir=cache)
    assert config["_jaxcirc_cache_hit"] is False
    for name in first:
        np.testing.assert_array_equal(state[name], first[name])
    # ... and the rebuilt entry is good again.
    assert jgguf.load_gguf(path, cache_dir=cache)[0]["_jaxcirc_cache_hit"] is True


def test_cached_arrays_are_ordinary_float32(tiny_llama, tmp_path):
    path, _ = tiny_llama
    jgguf.load_gguf(path, cache_dir=tmp_path / "cache")
    _, state, _ = jgguf.load_gguf(path, cache_dir=tmp_path / "cache")
    for array in state.values():
        assert array.dtype == np.float32 and array.flags.c_contiguous


def test_stale_temporaries_are_cleaned(tiny_llama, tmp_path):
    import os
    import time

    path, _ = tiny_llama
    folder = tmp_path / "cache" / "gguf"
    folder.mkdir(parents=True)
    stale, fresh = folder / "x.safetensors.abc.tmp", folder / "y.safetensors.def.tmp"
    for tmp in (stale, fresh):
        tmp.write_bytes(b"left by a killed writer")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    jgguf.load_gguf(path, cache_dir=tmp_path / "cache")
    assert not stale.exists() and fresh.exists()  # a fresh one may belong to a writer still running


def test_unwritable_cache_still_loads(tiny_llama, tmp_path):
    path, hf = tiny_llama
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder should be")
    config, state, _ = jgguf.load_gguf(path, cache_dir=blocker)
    assert config["_jaxcirc_cache_hit"] is False
    assert sorted(state) == sorted(hf)


def test_sha256_is_chunked_and_recorded(tiny_llama, tmp_path):
    import hashlib

    path, _ = tiny_llama
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert jgguf.file_sha256(path, chunk_bytes=1000) == expected
    assert jgguf.load_gguf(path, cache_dir=tmp_path / "c")[0]["_jaxcirc_source_sha256"] == expected


# --------------------------------------------------------------------------- clear errors


def test_unsupported_tensor_type_names_tensor_type_and_file(tmp_path):
    path = tmp_path / "int-tensor.gguf"
    write_tiny_gguf(path, extra_tensors={"blk.0.attn_v.bias": np.arange(32, dtype=np.int32)})
    with pytest.raises(ValueError) as info:
        jgguf.load_gguf(path, cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert "blk.0.attn_v.bias" in message and "I32" in message and str(path) in message
    assert "Q8_0" in message  # says what would work


def test_every_dequantizable_type_is_accepted():
    supported = jgguf.supported_tensor_types()
    for name in ("F32", "F16", "BF16", "F64", "Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K"):
        assert name in supported


def test_unsupported_architecture_is_named(tmp_path):
    path = tmp_path / "falcon.gguf"
    write_tiny_gguf(path, arch="falcon")
    with pytest.raises(ValueError, match=r"'falcon'.*'llama', 'qwen2', 'gemma2', 'gpt2', 'bloom'.*HF"):
        jgguf.load_gguf(path, cache_dir=tmp_path / "cache")


def test_unknown_tensor_is_named(tmp_path):
    path = tmp_path / "odd.gguf"
    write_tiny_gguf(path, extra_tensors={"blk.0.mystery.weight": np.zeros(4, dtype=np.float32)})
    with pytest.raises(ValueError, match="blk.0.mystery.weight"):
        jgguf.load_gguf(path, cache_dir=tmp_path / "cache")


def test_split_file_says_how_to_merge(tmp_path, monkeypatch):
    path = tmp_path / "part.gguf"
    write_tiny_gguf(path)
    real = jgguf.gguf_metadata
    monkeypatch.setattr(jgguf, "gguf_metadata", lambda reader: {**real(reader), "split.count": 3})
    with pytest.raises(ValueError, match="llama-gguf-split --merge"):
        jgguf.load_gguf(path, cache_dir=tmp_path / "cache")


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="No GGUF file"):
        jgguf.load_gguf("/nonexistent/model.gguf")


# --------------------------------------------------------------------------- rope scaling


def _llama3_factors(factor, low, high, original, theta, dim):
    inv_freq = 1.0 / theta ** (np.arange(0, dim, 2) / dim)
    out = []
    for f in inv_freq:
        wavelen = 2 * math.pi / f
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _meta(**extra):
    meta = {
        "general.architecture": "llama", "llama.block_count": 16, "llama.context_length": 131072,
        "llama.embedding_length": 2048, "llama.feed_forward_length": 8192, "llama.attention.head_count": 32,
        "llama.attention.head_count_kv": 8, "llama.rope.freq_base": 500000.0, "llama.rope.dimension_count": 64,
        "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.vocab_size": 128256,
    }
    meta.update(extra)
    return meta


@pytest.mark.parametrize(
    "factor, high, original",
    [(32.0, 4.0, 8192), (8.0, 4.0, 8192), (16.0, 8.0, 16384)],  # Llama 3.2, Llama 3.1, made up
)
def test_llama3_rope_freqs_become_rope_scaling(factor, high, original):
    # llama.cpp writes Llama 3 scaling as a rope_freqs tensor of per-frequency divisors.
    freqs = _llama3_factors(factor, 1.0, high, original, 500000.0, 64)
    config = jgguf.hf_config_from_gguf(_meta(), {"token_embd.weight": (128256, 2048)}, freqs)
    assert config["rope_scaling"] == {
        "rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": high,
        "original_max_position_embeddings": original,
    }
    assert all(type(v) in (str, int, float) for v in config["rope_scaling"].values())


def test_llama3_rope_scaling_reproduces_the_file_in_transformers():
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    freqs = _llama3_factors(32.0, 1.0, 4.0, 8192, 500000.0, 64)
    config = jgguf.hf_config_from_gguf(_meta(), {}, freqs)
    hf_config = transformers.LlamaConfig(**{k: v for k, v in config.items() if not k.startswith("_")})
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    unscaled = 1.0 / 500000.0 ** (np.arange(0, 64, 2) / 64)
    np.testing.assert_allclose(unscaled / inv_freq.double().numpy(), freqs, rtol=1e-5)


def test_rope_freqs_that_are_not_llama3_are_refused():
    freqs = np.linspace(1.0, 3.0, 32).astype(np.float32)
    with pytest.raises(ValueError, match="rope_freqs"):
        jgguf.hf_config_from_gguf(_meta(), {}, freqs)
    assert "rope_scaling" not in jgguf.hf_config_from_gguf(_meta(), {}, np.ones(32, np.float32))


def test_linear_and_yarn_rope_scaling_metadata():
    linear_meta = _meta(**{"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0})
    linear = jgguf.hf_config_from_gguf(linear_meta, {})
    assert linear["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    yarn = jgguf.hf_config_from_gguf(
        _meta(**{"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0,
                 "llama.rope.scaling.original_context_length": 32768}), {})
    assert yarn["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    assert "rope_scaling" not in jgguf.hf_config_from_gguf(_meta(), {})


def test_unpermute_inverts_llamacpp_permutation():
    w = np.arange(12 * 5, dtype=np.float32).reshape(12, 5)
    for heads in (1, 2, 3, 6):
        np.testing.assert_array_equal(jgguf.unpermute_qk_rows(_llamacpp_permute(w, heads), heads), w)
