"""Concentration of edge mass on nodes, on a hand-made score matrix with hand-computed shares."""

import numpy as np
import pytest

from jaxcirc.circuit import Circuit
from jaxcirc.concentration import concentration, concentration_from_scores, plot_concentration
from jaxcirc.edge_patch import EdgeLayout
from jaxcirc.models.config import ModelConfig


@pytest.fixture(scope="module")
def layout():
    cfg = ModelConfig(family="gpt2", n_layers=2, d_model=8, n_heads=2, d_head=4, d_mlp=16, d_vocab=10, n_ctx=8)
    return EdgeLayout.canonical(cfg)


@pytest.fixture(scope="module")
def scores(layout):
    """Three strong edges and small noise elsewhere, so top-3 picks exactly the strong ones."""
    s = np.random.default_rng(0).uniform(-0.01, 0.01, (layout.n_src, layout.n_dst))
    s[layout.input_src, layout.mlp_dst[0]] = 2.0          # input -> m0
    s[layout.mlp_src[0], layout.logits_dst] = -1.0        # m0 -> logits
    s[layout.input_src, layout.logits_dst] = 1.0          # input -> logits
    s[layout.head_src[1][0], layout.q_dst[0][0]] = 50.0   # invalid (backwards): ignored
    return s


def test_hand_computed_shares(layout, scores):
    # w = [0.5, 0.25, 0.25]; mass to both endpoints: input .75, m0 .75, logits .5 -> / 2.
    conc = concentration_from_scores(scores, layout, k=3)
    assert conc.nodes == ("input", "m0", "logits")
    np.testing.assert_allclose(conc.mass, [0.375, 0.375, 0.25])
    np.testing.assert_allclose(conc.cumulative, [0.375, 0.75, 1.0])
    assert conc.n_nodes == 3 and conc.n_edges == 3 and conc.aggregation == "both"
    assert conc.share(1) == pytest.approx(0.375) and conc.share(2) == pytest.approx(0.75)
    assert conc.share(0) == 0.0 and conc.share(10) == pytest.approx(1.0)
    assert conc.nodes_for(0.7) == 2 and conc.nodes_for(1.0) == 3 and conc.nodes_for(0.375) == 1


def test_split_equals_both_and_one_endpoint_rules(layout, scores):
    circuit = Circuit.from_scores(scores, layout, top_k=3)
    both, split = concentration(circuit, "both"), concentration(circuit, "split")
    assert both.nodes == split.nodes
    np.testing.assert_allclose(both.mass, split.mass)
    source = concentration(circuit, "source")
    assert source.nodes == ("input", "m0") and source.aggregation == "source"
    np.testing.assert_allclose(source.mass, [0.75, 0.25])
    dest = concentration(circuit, "destination")
    assert set(dest.nodes) == {"m0", "logits"}
    np.testing.assert_allclose(dest.mass, [0.5, 0.5])


def test_ports_collapse_and_top_k_larger_circuit(layout, scores):
    # q and k edges into the same head add up on that head.
    s = np.zeros_like(scores)
    s[layout.input_src, layout.q_dst[1][1]] = 1.0
    s[layout.input_src, layout.k_dst[1][1]] = 1.0
    s[layout.head_src[1][1], layout.logits_dst] = 2.0
    conc = concentration_from_scores(s, layout, k=3)
    # w = [.25, .25, .5]: input .5, a1.h1 .25+.25+.5 = 1.0, logits .5 -> / 2
    assert conc.nodes == ("a1.h1", "input", "logits")
    np.testing.assert_allclose(conc.mass, [0.5, 0.25, 0.25])
    many = concentration_from_scores(scores, layout, k=40)
    assert many.n_edges == 40 and many.n_nodes <= layout.n_src + 1
    assert many.cumulative[-1] == pytest.approx(1.0) and np.all(np.diff(many.mass) <= 0)
    summary = many.summary()
    assert summary["n_edges"] == 40 and set(summary["share_of_top_nodes"]) == {"5", "10", "20", "28"}


def test_errors_and_plot(tmp_path, layout, scores):
    with pytest.raises(ValueError, match="no edges"):
        concentration_from_scores(scores, layout, k=0)
    with pytest.raises(ValueError, match="aggregation"):
        concentration(Circuit.from_scores(scores, layout, top_k=3), "edges")
    path = plot_concentration({"a": concentration_from_scores(scores, layout, k=3),
                               "b": concentration_from_scores(scores, layout, k=20)}, tmp_path / "c.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
