"""Faithfulness by exact edge patching on a tiny random model with a real corrupted run.

Checked against independent computations: the clean and corrupted runs themselves, a node-level
hook patch (all outgoing edges of one head = replacing that head's z), direct single-mask forwards,
and a numpy per-position mean for mean ablation.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcirc.circuit import select_top_k
from jaxcirc.edge_patch import EdgeLayout, EdgePatch, node_output_cache_names, node_outputs
from jaxcirc.faithfulness import chunk_for_budget, curve_area, faithfulness, faithfulness_curve, plot_faithfulness_curve
from jaxcirc.hooks import Hooks, replace
from jaxcirc.metrics import logit_diff
from jaxcirc.model import Model
from jaxcirc.models.config import ModelConfig, RopeConfig
from jaxcirc.models.transformer import param_shapes
from jaxcirc.pairs import from_tokens

CFG = ModelConfig(family="llama", n_layers=2, d_model=16, n_heads=2, n_kv_heads=1, d_head=8, d_mlp=32,
                  d_vocab=20, n_ctx=16, norm="rmsnorm", activation="silu", gated_mlp=True, positional="rotary",
                  rope=RopeConfig(theta=10000.0, rotary_dim=8), tied_embeddings=False)


def random_params(cfg, seed=1, scale=0.5):
    """Normal weights, norm scales at 1 (numpy: much cheaper to build than the NNX initialiser)."""
    rng = np.random.default_rng(seed)

    def leaf(path, shape):
        if "ln" in jax.tree_util.keystr(path):
            return jnp.ones(shape.shape, shape.dtype)
        return jnp.asarray(rng.normal(0.0, scale, shape.shape), shape.dtype)

    return jax.tree_util.tree_map_with_path(leaf, param_shapes(cfg))


@pytest.fixture(scope="module")
def setup():
    model = Model(config=CFG, params=random_params(CFG))
    pairs = from_tokens([[1, 2, 3, 4, 5], [5, 4, 3, 2, 1], [2, 6, 7, 8]],
                        [[1, 9, 3, 14, 11], [5, 15, 12, 2, 1], [2, 16, 13, 8]],
                        answer=[3, 7, 9], foil=[4, 8, 10])
    layout = EdgeLayout.canonical(CFG)
    names = node_output_cache_names(CFG) + ("blocks.0.attn.hook_z",)
    _, cache = model.forward(model.params, pairs.corrupt, Hooks(cache=names))
    return model, pairs, layout, cache


def direct_metric(model, pairs, hooks=None, tokens=None):
    logits, _ = model.forward(model.params, pairs.clean if tokens is None else tokens, hooks, logits_at=pairs.position)
    return float(np.mean(logit_diff(logits, pairs)))


def edge_metric(model, pairs, layout, mask, source):
    return direct_metric(model, pairs, Hooks(edges=EdgePatch(jnp.asarray(mask, jnp.float32), source, layout)))


@pytest.mark.parametrize("ablation", ["corrupt", "mean", "zero"])
def test_full_graph_is_one_and_empty_graph_is_zero(setup, ablation):
    model, pairs, layout, _ = setup
    valid = layout.valid()
    full = faithfulness(model, pairs, valid, ablation=ablation)
    empty = faithfulness(model, pairs, np.zeros_like(valid), ablation=ablation)
    assert full.faithfulness == pytest.approx(1.0, abs=1e-6) and full.necessity == pytest.approx(1.0, abs=1e-6)
    assert empty.faithfulness == pytest.approx(0.0, abs=1e-6) and empty.ablated == pytest.approx(1.0, abs=1e-6)
    assert full.n_edges == full.n_valid == int(valid.sum()) and empty.n_edges == 0
    clean = direct_metric(model, pairs)
    assert full.full_metric == pytest.approx(clean, abs=1e-4)
    assert abs(full.full_metric - full.null_metric) > 0.1  # the ablation changes the behaviour
    if ablation == "corrupt":
        assert full.null_metric == pytest.approx(direct_metric(model, pairs, tokens=pairs.corrupt), abs=1e-4)


def _outgoing(layout, row):
    mask = np.zeros((layout.n_src, layout.n_dst), bool)
    mask[row] = True
    return mask & layout.valid()


def test_one_node_ablated_equals_a_hook_patch(setup):
    model, pairs, layout, cache = setup
    valid = layout.valid()
    # All outgoing edges of head a0.h1 patched = that head's z replaced by its corrupted value.
    head = _outgoing(layout, layout.head_src[0][1])
    z = cache["blocks.0.attn.hook_z"]
    by_hook = direct_metric(model, pairs, Hooks({"blocks.0.attn.hook_z": replace(z, jnp.array([False, True])[None, None, :, None])}))
    ablated = faithfulness(model, pairs, head)
    assert ablated.ablated_metric == pytest.approx(by_hook, abs=1e-4)
    rest = faithfulness(model, pairs, valid & ~head)  # everything but that head: the same run
    assert rest.circuit_metric == pytest.approx(by_hook, abs=1e-4)
    assert rest.faithfulness == pytest.approx(ablated.ablated, abs=1e-5)
    # A mid-size circuit (every edge except those out of m0): strictly between empty and full.
    mlp = _outgoing(layout, layout.mlp_src[0])
    by_hook = direct_metric(model, pairs, Hooks({"blocks.0.hook_mlp_out": replace(cache["blocks.0.hook_mlp_out"])}))
    result = faithfulness(model, pairs, valid & ~mlp)
    assert result.circuit_metric == pytest.approx(by_hook, abs=1e-4)
    assert 0.1 < result.faithfulness < 0.9
    assert result.faithfulness == pytest.approx((by_hook - result.null_metric) / (result.full_metric - result.null_metric), abs=1e-4)


def test_curve_matches_direct_patching_with_chunks_and_batches(setup, tmp_path):
    model, pairs, layout, cache = setup
    valid = layout.valid()
    scores = np.random.default_rng(0).normal(size=valid.shape)
    n_valid = int(valid.sum())
    counts = [0, 3, 10, n_valid // 2, n_valid]
    curve = faithfulness_curve(model, pairs, scores, edge_counts=counts, chunk=4, batch_size=2)
    source = node_outputs(CFG, cache, layout)
    full = edge_metric(model, pairs, layout, np.zeros_like(valid), source)
    null = edge_metric(model, pairs, layout, valid, source)
    expected = [(edge_metric(model, pairs, layout, valid & ~select_top_k(scores, layout, k), source) - null) / (full - null)
                for k in counts]
    np.testing.assert_allclose(curve.faithfulness, expected, atol=1e-4)
    assert curve.faithfulness[0] == pytest.approx(0.0, abs=1e-6) and curve.faithfulness[-1] == pytest.approx(1.0, abs=1e-6)
    fraction = np.array(counts) / n_valid
    np.testing.assert_allclose(curve.fraction, fraction)
    assert curve.area == pytest.approx(np.sum(np.diff(fraction) * (np.array(expected[1:]) + np.array(expected[:-1])) / 2), abs=1e-4)
    assert curve_area([0, 1], [1, 1]) == 1.0
    assert plot_faithfulness_curve(curve, tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
    default = faithfulness_curve(model, pairs, scores, n_points=5, chunk=4)
    assert default.n_edges[0] == 0 and default.n_edges[-1] == n_valid and len(default.n_edges) == 5


def test_mean_ablation_uses_masked_per_position_means(setup):
    model, pairs, layout, cache = setup
    valid = layout.valid()
    outputs = np.asarray(node_outputs(CFG, cache, layout))  # [n_src, batch, pos, d]
    mask = np.asarray(pairs.mask, np.float64)
    mean = np.einsum("ubpd,bp->upd", outputs, mask) / mask.sum(0)[None, :, None]
    source = jnp.asarray(np.broadcast_to(mean[:, None], outputs.shape), jnp.float32)
    circuit = select_top_k(np.random.default_rng(1).normal(size=valid.shape), layout, 12)
    expected = edge_metric(model, pairs, layout, valid & ~circuit, source)
    assert faithfulness(model, pairs, circuit, ablation="mean").circuit_metric == pytest.approx(expected, abs=1e-4)
    batched = faithfulness(model, pairs, circuit, ablation="mean", batch_size=2)
    assert batched.circuit_metric == pytest.approx(expected, abs=1e-4)
    explicit = faithfulness(model, pairs, circuit, ablation=source)
    assert explicit.circuit_metric == pytest.approx(expected, abs=1e-4) and explicit.ablation == "explicit"


def test_kl_metric_and_bad_input(setup):
    model, pairs, layout, _ = setup
    result = faithfulness(model, pairs, layout.valid(), metric="kl")
    assert result.full_metric == pytest.approx(0.0, abs=1e-5) and result.null_metric > 0
    assert result.faithfulness == pytest.approx(1.0, abs=1e-6) and result.metric == "kl"
    assert chunk_for_budget(model, layout, 3, 5, memory_budget=1) == 1
    per_mask = 4 * 3 * 5 * (3 * layout.n_src * CFG.d_model + 2 * CFG.d_mlp + 4 * CFG.d_model)
    assert chunk_for_budget(model, layout, 3, 5, memory_budget=10 * per_mask) == 10
    with pytest.raises(ValueError, match="ablation must be"):
        faithfulness(model, pairs, layout.valid(), ablation="resample")
    with pytest.raises(ValueError, match="Circuit mask has shape"):
        faithfulness(model, pairs, np.ones((2, 2), bool))
    with pytest.raises(ValueError, match="edge_counts must be"):
        faithfulness_curve(model, pairs, np.zeros((layout.n_src, layout.n_dst)), edge_counts=[5, 3])
