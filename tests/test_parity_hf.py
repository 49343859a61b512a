"""Parity with HF transformers: fp32 log-softmax over every position, every family and weight format.

Each checkpoint is a random-init tiny model saved with `save_pretrained` and loaded back with
`jaxcirc.load(directory)`; the reference is the same transformers model in memory (fp32, eager
attention). SmolLM2's GGUF is compared with transformers' own GGUF loader.
"""

from __future__ import annotations

import numpy as np
import pytest

import jaxcirc
import tiny_hf
from jaxcirc.cli import log_softmax, top_k

TOL = 5e-5
GGUF_TOL = 1e-4


def max_abs_log_softmax_diff(model_dir, hf_model, tokens) -> float:
    ours = log_softmax(np.asarray(jaxcirc.run(jaxcirc.load(model_dir), tokens)[0]))
    return float(np.abs(ours - tiny_hf.hf_log_softmax(hf_model, tokens)).max())


@pytest.fixture(scope="module")
def hf_models():
    """One random-init transformers model per tiny config (built once for the module)."""
    return {name: tiny_hf.make_model(name) for name in tiny_hf.TINY}


# 40 positions: past llama3's original_max_position_embeddings (16), where its scaling matters.
TOKENS = tiny_hf.random_tokens(2, 40, seed=1)


@pytest.mark.parametrize("name", list(tiny_hf.TINY))
def test_save_pretrained_parity(name, hf_models, tmp_path):
    directory = tiny_hf.save(hf_models[name], tmp_path)
    diff = max_abs_log_softmax_diff(directory, hf_models[name], TOKENS)
    print(f"{name}: max |log_softmax diff| = {diff:.2e}")
    assert diff <= TOL


def test_configs_cover_what_they_claim(hf_models, tmp_path):
    """Guard the coverage of the parity tests: odd heads, GQA, partial rotary, llama3, biases, heads."""
    cfgs = {name: jaxcirc.load(tiny_hf.save(m, tmp_path / name)).config for name, m in hf_models.items()}
    assert cfgs["gpt2"].n_heads % 2 == 1 and cfgs["gpt2"].positional == "learned"
    for name, parallel in (("neox_parallel", True), ("neox_sequential", False)):
        assert cfgs[name].parallel_residual is parallel
        assert cfgs[name].rope.rotary_dim == cfgs[name].d_head // 4
    llama = cfgs["llama"]
    assert llama.n_kv_heads < llama.n_heads and not llama.tied_embeddings
    assert llama.rope.scaling[0] == "llama3" and llama.rope.scaling[4] < TOKENS.shape[1]
    assert llama.qkv_bias and llama.o_bias and llama.mlp_bias
    qwen = cfgs["qwen2"]
    assert qwen.qkv_bias and not qwen.o_bias and qwen.tied_embeddings and qwen.n_kv_heads < qwen.n_heads


def test_llama3_scaling_changes_the_logits(hf_models, tmp_path):
    """Without the scaling the logits differ past position 16: the parity above really tests it."""
    directory = tiny_hf.save(hf_models["llama"], tmp_path)
    model = jaxcirc.load(directory)
    rope = model.config.rope
    plain = model.config.replace(rope=jaxcirc.RopeConfig(theta=rope.theta, rotary_dim=rope.rotary_dim))
    unscaled = jaxcirc.Model(plain, model.params)
    diff = np.abs(np.asarray(jaxcirc.run(model, TOKENS)[0]) - np.asarray(jaxcirc.run(unscaled, TOKENS)[0])).max()
    assert diff > 1e-2


def _old_llama_spelling(config: dict) -> None:
    params = config.pop("rope_parameters")
    config["rope_theta"] = params.pop("rope_theta")
    config["rope_scaling"] = params  # still holds rope_type llama3 and its factors
    assert config["rope_scaling"]["rope_type"] == "llama3"


def _old_neox_spelling(config: dict) -> None:
    params = config.pop("rope_parameters")
    config["rotary_pct"] = params["partial_rotary_factor"]
    config["rotary_emb_base"] = params["rope_theta"]
    config.pop("partial_rotary_factor", None)


@pytest.mark.parametrize("name,change", [("llama", _old_llama_spelling), ("neox_parallel", _old_neox_spelling)])
def test_old_config_spellings(name, change, hf_models, tmp_path):
    directory = tiny_hf.save(hf_models[name], tmp_path)
    config = tiny_hf.rewrite_config(directory, change)
    assert "rope_parameters" not in config
    diff = max_abs_log_softmax_diff(directory, hf_models[name], TOKENS)
    print(f"{name} (old config spelling): max |log_softmax diff| = {diff:.2e}")
    assert diff <= TOL


def test_sharded_safetensors(hf_models, tmp_path):
    directory = tiny_hf.save(hf_models["llama"], tmp_path, max_shard_size="20KB")
    assert (directory / "model.safetensors.index.json").exists()
    assert len(list(directory.glob("model-*-of-*.safetensors"))) > 2
    diff = max_abs_log_softmax_diff(directory, hf_models["llama"], TOKENS)
    print(f"llama (sharded safetensors): max |log_softmax diff| = {diff:.2e}")
    assert diff <= TOL


@pytest.mark.parametrize("name", ["gpt2", "neox_parallel"])
def test_pytorch_model_bin(name, hf_models, tmp_path):
    directory = tiny_hf.save_torch_bin(hf_models[name], tmp_path)
    assert not list(directory.glob("*.safetensors"))
    diff = max_abs_log_softmax_diff(directory, hf_models[name], TOKENS)
    print(f"{name} (pytorch_model.bin): max |log_softmax diff| = {diff:.2e}")
    assert diff <= TOL


# ----------------------------------------------------------------------------- SmolLM2 GGUF

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    return",
    "In 1969, Neil Armstrong became the first person to",
    "Water boils at 100 degrees",
]


@pytest.fixture(scope="module")
def smollm():
    return jaxcirc.load("smollm2-135m")


@pytest.fixture(scope="module")
def smollm_hf(smollm2_transformers):
    return smollm2_transformers


def test_smollm2_gguf_matches_transformers(smollm, smollm_hf):
    ids = [smollm.tokenizer.encode(p) for p in PROMPTS]
    lengths = [len(i) for i in ids]
    # Right-pad to one length so one compiled forward serves every prompt; causal attention keeps
    # each prompt's own positions unaffected by the padding after it.
    pad = smollm.tokenizer.eos_token_id
    tokens = np.array([i + [pad] * (max(lengths) - len(i)) for i in ids], dtype=np.int32)
    ours = log_softmax(np.asarray(jaxcirc.run(smollm, tokens)[0]))
    ref = tiny_hf.hf_log_softmax(smollm_hf, tokens)
    diff = float(np.abs(ours - ref).max())
    print(f"smollm2-135m GGUF: max |log_softmax diff| over {tokens.size} positions = {diff:.2e}")
    assert diff <= GGUF_TOL
    for b, n in enumerate(lengths):
        assert [i for i, _ in top_k(ours[b, n - 1], 5)] == [i for i, _ in top_k(ref[b, n - 1], 5)], PROMPTS[b]
    paris = smollm.tokenizer.encode(" Paris")
    assert len(paris) == 1 and top_k(ours[0, lengths[0] - 1], 1)[0][0] == paris[0]
