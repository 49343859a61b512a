"""Weight processing (fold_ln, center_writing_weights, center_unembed, fold_value_biases) leaves the
log-softmax unchanged on tiny random models with non-trivial norms and biases, does what it says
to the weights, is recorded in the config, and refuses what it cannot do exactly."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcirc
from jaxcirc.models.config import ModelConfig, RopeConfig
from jaxcirc.models.transformer import init_params, make_forward
from jaxcirc.weight_processing import OPTIONS, process, process_params

COMMON = dict(n_layers=2, d_model=16, d_mlp=32, d_vocab=29, n_ctx=16, initializer_range=0.2)
CONFIGS = {
    # LayerNorm, learned positions, tied head, biases everywhere.
    "gpt2": ModelConfig(family="gpt2", n_heads=2, d_head=8, norm="layernorm", positional="learned",
                        tied_embeddings=True, qkv_bias=True, o_bias=True, mlp_bias=True, **COMMON),
    # Parallel residual (ln1 and ln2 both read resid_pre), partial rotary, untied head.
    "neox": ModelConfig(family="gpt_neox", n_heads=2, d_head=8, norm="layernorm", activation="gelu",
                        parallel_residual=True, positional="rotary", rope=RopeConfig(rotary_dim=4),
                        tied_embeddings=False, qkv_bias=True, o_bias=True, mlp_bias=True, **COMMON),
    # RMSNorm, GQA 4/2, gated MLP, q/k/v and MLP biases without an o bias, tied head.
    "llama": ModelConfig(family="llama", n_heads=4, n_kv_heads=2, d_head=4, norm="rmsnorm", activation="silu",
                         gated_mlp=True, positional="rotary", rope=RopeConfig(rotary_dim=4), tied_embeddings=True,
                         qkv_bias=True, o_bias=False, mlp_bias=True, **COMMON),
    # GPT-J-like: one LayerNorm for attention and MLP, no attention biases (fold_ln creates them).
    "gptj": ModelConfig(family="gptj", n_heads=2, d_head=8, norm="layernorm", parallel_residual=True,
                        shared_norm=True, positional="rotary", rope=RopeConfig(rotary_dim=4, interleaved=True),
                        tied_embeddings=False, mlp_bias=True, unembed_bias=True, **COMMON),
}
APPLICABLE = {name: tuple(o for o in OPTIONS if not (cfg.norm == "rmsnorm" and o == "center_writing_weights"))
              for name, cfg in CONFIGS.items()}
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 29, (2, 12)), jnp.int32)


@functools.cache
def random_params(name: str) -> dict:
    """init_params with norm scales 1 + noise and every bias random (init_params gives w=1, b=0,
    which would make folding trivially exact)."""
    params = init_params(CONFIGS[name], seed=1)
    rng = np.random.default_rng(2)

    def perturb(path, leaf):
        key = str(path[-1].key)
        noise = 0.3 * rng.standard_normal(leaf.shape).astype(np.float32)
        return jnp.asarray(1.0 + noise if key == "w" else noise if key.startswith("b") else leaf)

    return jax.tree_util.tree_map_with_path(perturb, params)


@functools.cache
def _forward(cfg: ModelConfig):
    return make_forward(cfg)


def log_softmax(cfg: ModelConfig, params: dict) -> np.ndarray:
    # Configs differing only in the processing record run the same program: compile it once.
    logits, _ = _forward(cfg.replace(weight_processing=()))(params, TOKENS)
    return np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))


@functools.cache
def reference(name: str) -> np.ndarray:
    return log_softmax(CONFIGS[name], random_params(name))


CASES = [(name, (option,)) for name in CONFIGS for option in APPLICABLE[name]]
CASES += [(name, APPLICABLE[name]) for name in CONFIGS]


@pytest.mark.parametrize("name,options", CASES, ids=[f"{n}-{'+'.join(o) if len(o) == 1 else 'all'}" for n, o in CASES])
def test_processing_keeps_log_softmax(name, options):
    cfg, params = CONFIGS[name], random_params(name)
    # The pure function, op by op (one program per case would compile 20 times; the compiled
    # path, process_params, runs in the hooks test).
    new_cfg, new = process(cfg, params, **{o: True for o in options})
    assert new_cfg.weight_processing == options  # recorded, in the order applied
    diff = np.abs(log_softmax(new_cfg, new) - reference(name)).max()
    assert diff < 1e-5, f"{name} {options}: max |Δ log-softmax| {diff:.2e}"

    blocks = new["blocks"]
    if "fold_ln" in options:
        norms = [blocks["ln1"], new["ln_final"]] + ([] if cfg.shared_norm else [blocks["ln2"]])
        for norm in norms:
            np.testing.assert_array_equal(norm["w"], 1.0)
            if "b" in norm:
                np.testing.assert_array_equal(norm["b"], 0.0)
        assert not new_cfg.tied_embeddings and "W_U" in new
        if cfg.norm == "layernorm":  # folded readers see only centred inputs: centred too
            assert cfg.qkv_bias or new_cfg.qkv_bias  # a LayerNorm bias needs q/k/v biases to go to
            np.testing.assert_allclose(np.asarray(blocks["attn"]["W_Q"]).mean(axis=1), 0, atol=1e-6)
            np.testing.assert_allclose(np.asarray(new["W_U"]).mean(axis=0), 0, atol=1e-6)
    if "center_writing_weights" in options:
        for w in (new["W_E"], new.get("W_pos"), blocks["attn"]["W_O"], blocks["attn"].get("b_O"),
                  blocks["mlp"]["W_out"], blocks["mlp"]["b_out"]):
            if w is not None:
                np.testing.assert_allclose(np.asarray(w).mean(axis=-1), 0, atol=1e-6)
        if cfg.tied_embeddings:  # the head kept the uncentred embedding
            assert not new_cfg.tied_embeddings
    if "center_unembed" in options:
        np.testing.assert_allclose(np.asarray(new["W_U"]).mean(axis=-1), 0, atol=1e-6)
        if "b_U" in new:
            np.testing.assert_allclose(np.asarray(new["b_U"]).mean(), 0, atol=1e-6)
    if "fold_value_biases" in options and cfg.qkv_bias:
        np.testing.assert_array_equal(blocks["attn"]["b_V"], 0.0)
        assert new_cfg.o_bias and "b_O" in blocks["attn"]


def test_processed_model_runs_with_hooks_and_records_processing():
    """GQA model: fold_ln leaves hook_z alone; fold_value_biases removes b_V (repeated over the
    query heads of each kv head) from it. The processing shows in the config and survives JSON."""
    cfg, params = CONFIGS["llama"], random_params("llama")
    model = jaxcirc.Model(cfg, params)
    names = ["blocks.1.attn.hook_z", "blocks.0.ln1.hook_normalized"]
    _, cache = jaxcirc.run(model, TOKENS, cache=names)
    processed = jaxcirc.process_weights(model, fold_ln=True, fold_value_biases=True)
    assert processed.config.weight_processing == ("fold_ln", "fold_value_biases")
    assert model.config.weight_processing == () and model.params is params  # original untouched
    assert ModelConfig.from_dict(json.loads(processed.config.to_json())) == processed.config
    logits, new_cache = jaxcirc.run(processed, TOKENS, cache=names)
    np.testing.assert_allclose(jax.nn.log_softmax(logits), reference("llama"), atol=1e-5)

    b_V = np.repeat(np.asarray(params["blocks"]["attn"]["b_V"][1]), cfg.group_size, axis=0)  # [head, d_head]
    np.testing.assert_allclose(new_cache["blocks.1.attn.hook_z"] + b_V, cache["blocks.1.attn.hook_z"], atol=2e-5)
    # RMSNorm folded: hook_normalized is the plain x / rms(x).
    normalized = np.asarray(new_cache["blocks.0.ln1.hook_normalized"])
    np.testing.assert_allclose((normalized ** 2).mean(-1), 1.0, atol=1e-3)
    assert jaxcirc.process_weights(model) is model  # nothing asked, nothing done


def test_refuses_what_is_not_exact():
    llama = CONFIGS["llama"]
    with pytest.raises(ValueError, match="rmsnorm.*LayerNorm"):
        process_params(llama, random_params("llama"), center_writing_weights=True)
    with pytest.raises(TypeError, match="fold_layernorm"):
        process_params(llama, random_params("llama"), fold_layernorm=True)
    gemma = llama.replace(family="gemma2", post_norms=True, norm_offset=1.0, final_softcap=30.0, qkv_bias=False)
    params = init_params(gemma)
    with pytest.raises(ValueError, match="post-norms"):
        process_params(gemma, params, fold_ln=True)
    with pytest.raises(ValueError, match="soft-caps"):
        process_params(gemma, params, center_unembed=True)
    bloom = CONFIGS["gpt2"].replace(family="bloom", embed_norm=True, positional="alibi")
    with pytest.raises(ValueError, match="embedding goes through a norm"):
        process_params(bloom, init_params(bloom), center_writing_weights=True)
