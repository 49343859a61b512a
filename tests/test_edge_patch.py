"""Exact edge patching: no edges = clean run, all edges = corrupted run, one edge = a hand-built patch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcirc.edge_patch import EdgeLayout, EdgePatch, node_output_cache_names, node_outputs
from jaxcirc.hooks import Hooks, add, replace
from jaxcirc.models.config import ModelConfig, RopeConfig
from jaxcirc.models.transformer import init_params, make_forward

CLEAN = jnp.array([[1, 2, 3, 4, 5], [5, 4, 3, 2, 1]])
CORRUPT = jnp.array([[1, 7, 3, 4, 9], [5, 4, 8, 2, 1]])


def _config(parallel: bool) -> ModelConfig:
    return ModelConfig(family="llama", n_layers=3, d_model=32, n_heads=4, n_kv_heads=2, d_head=8,
                       d_mlp=64, d_vocab=50, n_ctx=64, norm="rmsnorm", activation="silu", gated_mlp=True,
                       positional="rotary", rope=RopeConfig(theta=10000.0, rotary_dim=8),
                       tied_embeddings=False, parallel_residual=parallel, initializer_range=0.3)


@pytest.fixture(scope="module", params=[False, True], ids=["sequential", "parallel"])
def setup(request):
    cfg = _config(request.param)
    params, forward = init_params(cfg), make_forward(cfg)
    layout = EdgeLayout.canonical(cfg)
    names = node_output_cache_names(cfg) + ("blocks.0.hook_mlp_in", "blocks.1.hook_q_input")
    clean_logits, clean_cache = forward(params, CLEAN, Hooks(cache=names))
    corrupt_logits, corrupt_cache = forward(params, CORRUPT, Hooks(cache=names))
    source = node_outputs(cfg, corrupt_cache, layout)
    return cfg, params, forward, layout, source, clean_logits, clean_cache, corrupt_logits, corrupt_cache


def test_no_edges_is_clean_all_edges_is_corrupt(setup):
    cfg, params, forward, layout, source, clean_logits, _, corrupt_logits, _ = setup
    zeros = jnp.zeros((layout.n_src, layout.n_dst))
    none, _ = forward(params, CLEAN, Hooks(edges=EdgePatch(zeros, source, layout)))
    every, _ = forward(params, CLEAN, Hooks(edges=EdgePatch(jnp.ones_like(zeros), source, layout)))
    assert np.abs(corrupt_logits - clean_logits).max() > 0.1
    np.testing.assert_allclose(none, clean_logits, atol=2e-5)
    np.testing.assert_allclose(every, corrupt_logits, atol=2e-5)


def test_single_edges_match_hand_built_patches(setup):
    cfg, params, forward, layout, source, clean_logits, clean_cache, _, corrupt_cache = setup
    zeros = jnp.zeros((layout.n_src, layout.n_dst))
    embed_delta = corrupt_cache["hook_embed"] - clean_cache["hook_embed"]

    mask = zeros.at[layout.input_src, layout.mlp_dst[0]].set(1)
    patched, _ = forward(params, CLEAN, Hooks(edges=EdgePatch(mask, source, layout)))
    by_hand, _ = forward(params, CLEAN, Hooks({"blocks.0.hook_mlp_in": replace(clean_cache["blocks.0.hook_mlp_in"] + embed_delta)}))
    np.testing.assert_allclose(patched, by_hand, atol=2e-5)
    assert np.abs(patched - clean_logits).max() > 1e-2

    # Edge from head 0 of layer 0 into the query of head 2 of layer 1, and nothing else.
    head_delta = corrupt_cache["blocks.0.attn.hook_result"][:, :, 0] - clean_cache["blocks.0.attn.hook_result"][:, :, 0]
    mask = zeros.at[layout.head_src[0][0], layout.q_dst[1][2]].set(1)
    patched, _ = forward(params, CLEAN, Hooks(edges=EdgePatch(mask, source, layout)))
    q_input = clean_cache["blocks.1.hook_q_input"].at[:, :, 2].add(head_delta)
    by_hand, _ = forward(params, CLEAN, Hooks({"blocks.1.hook_q_input": replace(q_input)}))
    np.testing.assert_allclose(patched, by_hand, atol=2e-5)


def test_invalid_edges_are_ignored_and_vmap_over_masks(setup):
    cfg, params, forward, layout, source, clean_logits, *_ = setup
    valid = layout.valid()
    assert not valid[layout.head_src[1][0], layout.q_dst[0][0]]  # no edge backwards in depth
    assert valid[layout.head_src[1][0], layout.mlp_dst[1]] == (not cfg.parallel_residual)
    invalid_only = jnp.asarray(~valid, jnp.float32)
    masks = jnp.stack([invalid_only, jnp.zeros_like(invalid_only)])
    logits, _ = jax.vmap(lambda m: forward(params, CLEAN, Hooks(edges=EdgePatch(m, source, layout))))(masks)
    np.testing.assert_allclose(logits[0], clean_logits, atol=2e-5)
    np.testing.assert_allclose(logits[1], clean_logits, atol=2e-5)


def test_bad_edge_shapes_are_refused(setup):
    cfg, params, forward, layout, source, *_ = setup
    with pytest.raises(ValueError, match="Edge mask has shape"):
        forward(params, CLEAN, Hooks(edges=EdgePatch(jnp.zeros((3, 3)), source, layout)))
    with pytest.raises(ValueError, match="Edge patch source"):
        forward(params, CLEAN, Hooks(edges=EdgePatch(jnp.zeros((layout.n_src, layout.n_dst)), source[:, :1], layout)))


def test_stacked_all_layer_intervention_equals_per_layer(setup):
    cfg, params, forward, *_ = setup
    delta = jax.random.normal(jax.random.key(1), (cfg.n_layers, 1, 1, cfg.d_model))
    stacked, _ = forward(params, CLEAN, Hooks({"blocks.*.hook_resid_pre": add(delta)}))
    per_layer, _ = forward(params, CLEAN, Hooks({f"blocks.{l}.hook_resid_pre": add(delta[l]) for l in range(cfg.n_layers)}))
    np.testing.assert_allclose(stacked, per_layer, atol=1e-5)
    with pytest.raises(ValueError, match="leading|shape"):
        forward(params, CLEAN, Hooks({"blocks.*.hook_resid_pre": add(delta[:1])}))
