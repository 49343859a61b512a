"""GGUF loading: parity with transformers' GGUF loader, config, caching, clear errors."""

from __future__ import annotations

import math
from pathlib import Path

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
) -> dict[str, np.ndarray]:
    """Write a small random model in llama.cpp's layout; return its HF-named weights ([out, in]).

    Block weights go in as Q8_0 (ffn), F16 (o_proj) and F32 (q/k/v, norms) to exercise several
    tensor types; q/k rows are permuted as llama.cpp does for `llama`.
    """
    rng = np.random.default_rng(seed)
    tokens, types = _tiny_vocab()
    vocab = len(tokens)
    head_dim = hidden // heads
    w = gguf.GGUFWriter(str(path), arch)
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
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(_TINY_MERGES)
    w.add_uint32("tokenizer.ggml.bos_token_id", 0)
    w.add_uint32("tokenizer.ggml.eos_token_id", 0)
    w.add_bool("tokenizer.ggml.add_bos_token", False)

    hf: dict[str, np.ndarray] = {}

    def put(gguf_name: str, hf_name: str | None, value: np.ndarray, kind: str = "f32", stored=None) -> None:
        value = value.astype(np.float32)
        if hf_name is not None:
            hf[hf_name] = value
        data = value if stored is None else stored.astype(np.float32)
        if kind == "q8_0":
            w.add_tensor(gguf_name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        elif kind == "f16":
            w.add_tensor(gguf_name, data.astype(np.float16))
        else:
            w.add_tensor(gguf_name, data)

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
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
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


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_matches_transformers(arch, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    path = tmp_path / f"tiny-{arch}.gguf"
    write_tiny_gguf(path, arch, tied=False)
    config, state, _ = jgguf.load_gguf(path, cache_dir=tmp_path / "cache")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    reference = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    assert sorted(state) == sorted(reference)
    for name, expected in reference.items():
        np.testing.assert_allclose(state[name], expected, atol=1e-6, rtol=0, err_msg=name)
    assert config["model_type"] == model.config.model_type == arch
    assert config["tie_word_embeddings"] is False
    if arch == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in state


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
    path = tmp_path / "gpt2.gguf"
    write_tiny_gguf(path, arch="gpt2")
    with pytest.raises(ValueError, match=r"'gpt2'.*'llama', 'qwen2'"):
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
