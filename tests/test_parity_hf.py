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
# 40 positions: past llama3's original_max_position_embeddings (16), where its scaling matters,
# and 5 Gemma 2 sliding windows (8).
TOKENS = tiny_hf.random_tokens(2, 40, seed=1)


def max_abs_log_softmax_diff(model_dir, hf_model, tokens) -> float:
    ours = log_softmax(np.asarray(jaxcirc.run(jaxcirc.load(model_dir), tokens)[0]))
    return float(np.abs(ours - tiny_hf.hf_log_softmax(hf_model, tokens)).max())


@pytest.fixture(scope="module")
def hf_models():
    """One random-init transformers model per tiny config (built once for the module), biases and
    norm weights randomised too."""
    return {name: tiny_hf.make_model(name, random_vectors=True) for name in tiny_hf.TINY}


@pytest.fixture(scope="module")
def loaded(hf_models, tmp_path_factory):
    """name -> the jaxcirc Model loaded from its `save_pretrained` directory, loaded (and its
    forward compiled) once per module; other checkpoints of the same architecture reuse that
    compiled forward through `Model.with_params`."""
    models: dict[str, jaxcirc.Model] = {}

    def get(name: str) -> jaxcirc.Model:
        if name not in models:
            models[name] = jaxcirc.load(tiny_hf.save(hf_models[name], tmp_path_factory.mktemp(name)))
        return models[name]

    return get


def max_diff(model, hf_model, tokens=TOKENS) -> float:
    ours = log_softmax(np.asarray(jaxcirc.run(model, tokens)[0]))
    return float(np.abs(ours - tiny_hf.hf_log_softmax(hf_model, tokens)).max())


@pytest.mark.parametrize("name", list(tiny_hf.TINY))
def test_save_pretrained_parity(name, hf_models, loaded):
    diff = max_diff(loaded(name), hf_models[name])
    print(f"{name}: max |log_softmax diff| = {diff:.2e}")
    assert diff <= TOL


def test_configs_cover_what_they_claim(loaded):
    """Guard the coverage of the parity tests: odd heads, GQA, partial rotary, llama3, biases, heads,
    interleaved rotary, ALiBi with a non-power-of-two head count, sliding windows shorter than the
    tokens, Gemma 2's separate head_dim and query scale."""
    cfgs = {name: loaded(name).config for name in tiny_hf.TINY}
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
    gptj = cfgs["gptj"]
    assert gptj.rope.interleaved and gptj.rope.rotary_dim < gptj.d_head and gptj.n_heads % 2 == 1
    assert gptj.parallel_residual and gptj.shared_norm and gptj.unembed_bias and not gptj.tied_embeddings
    assert not gptj.qkv_bias and not gptj.o_bias and gptj.mlp_bias
    bloom = cfgs["bloom"]
    assert bloom.positional == "alibi" and bloom.n_heads & (bloom.n_heads - 1) and bloom.embed_norm
    gemma = cfgs["gemma2"]
    assert gemma.layer_windows == (8, 0, 8) and max(gemma.layer_windows) < TOKENS.shape[1]
    assert gemma.n_heads * gemma.d_head != gemma.d_model and gemma.n_kv_heads < gemma.n_heads
    assert gemma.query_scale != gemma.d_head ** -0.5 and gemma.post_norms and gemma.norm_offset == 1.0


def test_llama3_scaling_changes_the_logits(loaded):
    """Without the scaling the logits differ past position 16: the parity above really tests it."""
    model = loaded("llama")
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


def _hf_variant(name: str, **changes) -> np.ndarray:
    """transformers' log-softmax on TOKENS for the tiny config `name` with `changes`, same weights."""
    import torch
    import transformers

    config_cls, model_cls, kwargs = tiny_hf.TINY[name]
    original = tiny_hf.make_model(name, random_vectors=True)
    config = getattr(transformers, config_cls)(**{**kwargs, **changes})
    config._attn_implementation = "eager"
    variant = getattr(transformers, model_cls)(config).to(torch.float32).eval()
    variant.load_state_dict(original.state_dict())
    return tiny_hf.hf_log_softmax(variant, TOKENS)


@pytest.mark.parametrize("change", [
    dict(layer_types=["full_attention"] * 3),  # the sliding window
    dict(attn_logit_softcapping=None),
    dict(final_logit_softcapping=None),
    dict(query_pre_attn_scalar=12),  # = head_dim: the default 1/sqrt(d_head) scale
], ids=["window", "attn_softcap", "final_softcap", "query_scale"])
def test_gemma2_features_bind(change, hf_models):
    """Each Gemma 2 feature changes transformers' own output on the tiny config by far more than
    the parity bound, so matching it within TOL means implementing that feature."""
    reference = tiny_hf.hf_log_softmax(hf_models["gemma2"], TOKENS)
    assert np.abs(_hf_variant("gemma2", **change) - reference).max() > 0.1


def test_alibi_slopes_match_bloom():
    """Slopes for power-of-two and other head counts equal transformers' BLOOM slopes."""
    import torch
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

    from jaxcirc.models.common import alibi_slopes

    for n_heads in range(1, 21):
        expected = _get_alibi_slopes(n_heads, torch.device("cpu")).numpy()
        np.testing.assert_allclose(alibi_slopes(n_heads), expected, rtol=1e-6, err_msg=f"{n_heads} heads")


def test_interleaved_rope_matches_gptj():
    """apply_rope(interleaved=True) is GPT-J's rotate-every-two (and differs from rotate-half)."""
    import torch
    from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb, create_sinusoidal_positions

    from jaxcirc.models.common import apply_rope, rope_tables

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 7, 3, 6)).astype(np.float32)  # [batch, pos, head, rotary_dim]
    positions = np.tile(np.arange(7, dtype=np.int32), (2, 1))
    sincos = create_sinusoidal_positions(16, 6)[torch.as_tensor(positions, dtype=torch.long)]
    sin, cos = torch.split(sincos, 3, dim=-1)
    expected = apply_rotary_pos_emb(torch.as_tensor(x), sin, cos).numpy()
    rope = jaxcirc.RopeConfig(theta=10000.0, rotary_dim=6, interleaved=True)
    ours = np.asarray(apply_rope(x, *rope_tables(rope, positions), interleaved=True))
    np.testing.assert_allclose(ours, expected, atol=1e-6)
    half = jaxcirc.RopeConfig(theta=10000.0, rotary_dim=6)
    assert np.abs(np.asarray(apply_rope(x, *rope_tables(half, positions))) - expected).max() > 0.1


def _gptj_spelling(config: dict) -> None:
    for old, new in (("n_embd", "hidden_size"), ("n_layer", "num_hidden_layers"), ("n_head", "num_attention_heads"),
                     ("n_positions", "max_position_embeddings")):
        config[new] = config.pop(old)


def _bloom_spelling(config: dict) -> None:
    for old, new in (("hidden_size", "n_embed"), ("n_layer", "num_hidden_layers"), ("n_head", "num_attention_heads")):
        config[new] = config.pop(old)


def _old_gemma2_spelling(config: dict) -> None:
    """Before transformers 4.53: no layer_types (even layers slide), top-level rope_theta, hidden_act."""
    del config["layer_types"]
    config["rope_theta"] = config.pop("rope_parameters")["rope_theta"]
    config["hidden_act"] = config.pop("hidden_activation")


@pytest.mark.parametrize("name,change", [("gptj", _gptj_spelling), ("bloom", _bloom_spelling),
                                         ("gemma2", _old_gemma2_spelling)])
def test_alternative_config_spellings(name, change, hf_models, loaded, tmp_path):
    """The other spelling gives the same config as the `save_pretrained` one (so its weights run
    through that checkpoint's compiled forward), and matches transformers reading the rewritten
    directory itself."""
    import torch
    import transformers

    directory = tiny_hf.save(hf_models[name], tmp_path)
    tiny_hf.rewrite_config(directory, change)
    model = jaxcirc.load(directory)
    reference = loaded(name)
    assert model.config == reference.config
    hf_reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="eager").eval()
    diff = max_diff(reference.with_params(model.params), hf_reloaded)
    print(f"{name} (alternative config spelling): max |log_softmax diff| = {diff:.2e}")
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
