"""Circuit: names from the layout, top-k / threshold / greedy selection against brute force, masks,
node-level views, exact JSON round trip, drawing."""

import json

import numpy as np
import pytest

from jaxcirc.circuit import (Circuit, Edge, Node, draw_circuit, edge_ranks, graph_names, select_greedy,
                             select_threshold, select_top_k)
from jaxcirc.edge_patch import EdgeLayout
from jaxcirc.models.config import ModelConfig, RopeConfig


def _config(n_layers=3, n_heads=4, n_kv_heads=2, parallel=False) -> ModelConfig:
    return ModelConfig(family="llama", n_layers=n_layers, d_model=16, n_heads=n_heads, n_kv_heads=n_kv_heads,
                       d_head=4, d_mlp=32, d_vocab=20, n_ctx=16, norm="rmsnorm", activation="silu",
                       gated_mlp=True, positional="rotary", rope=RopeConfig(theta=10000.0, rotary_dim=4),
                       tied_embeddings=False, parallel_residual=parallel)


@pytest.fixture(scope="module", params=["gqa", "mha", "parallel"])
def layout(request):
    if request.param == "gqa":
        return EdgeLayout.canonical(_config())
    if request.param == "mha":
        return EdgeLayout.canonical(_config(n_kv_heads=4))
    return EdgeLayout.canonical(_config(n_kv_heads=4, parallel=True))


def _scores(layout, seed=0):
    return np.random.default_rng(seed).normal(size=(layout.n_src, layout.n_dst))


def test_names_follow_the_layout(layout):
    names = graph_names(layout)
    sources = [n.name for n in names.sources]
    assert len(set(sources)) == layout.n_src
    assert sources[layout.input_src] == "input" and sources[layout.mlp_src[1]] == "m1"
    assert sources[layout.head_src[2][3]] == "a2.h3"
    assert names.destinations[layout.q_dst[1][2]][0].name == "a1.h2"
    assert names.destinations[layout.q_dst[1][2]][1] == "q"
    assert names.destinations[layout.logits_dst][0].name == "logits"
    k_node, port = names.destinations[layout.k_dst[2][1]]
    assert port == "k"
    assert k_node.name == ("a2.kv1" if names.n_kv_heads < names.n_heads else "a2.h1")
    assert len(set(names.destinations)) == layout.n_dst


def test_top_k_and_threshold_match_brute_force(layout):
    scores = _scores(layout)
    valid = layout.valid()
    scores[~valid] = 100.0  # invalid edges must never be selected, however large
    entries = sorted(((abs(scores[i, j]), i, j) for i, j in zip(*np.nonzero(valid))), key=lambda t: -t[0])
    for k in (0, 1, 7, int(valid.sum()), int(valid.sum()) + 5):
        expected = np.zeros_like(valid)
        for _, i, j in entries[:k]:
            expected[i, j] = True
        np.testing.assert_array_equal(select_top_k(scores, layout, k), expected)
    t = np.median(np.abs(scores[valid]))
    np.testing.assert_array_equal(select_threshold(scores, layout, t), valid & (np.abs(scores) >= t))
    ranks = edge_ranks(scores, layout)
    assert sorted(ranks[valid].tolist()) == list(range(int(valid.sum())))


def test_top_k_ties_follow_flat_order(layout):
    scores = np.ones((layout.n_src, layout.n_dst))
    mask = select_top_k(scores, layout, 3)
    flat_valid = np.flatnonzero(layout.valid())
    assert np.flatnonzero(mask).tolist() == flat_valid[:3].tolist()


def _greedy_reference(scores, layout, k):
    """O(k * edges) re-implementation from the documented rule, on node names."""
    names = graph_names(layout)
    groups = names.groups()
    valid = layout.valid()
    connected, chosen = {"logits"}, np.zeros_like(valid)

    def dst_connected(col):
        node = names.destinations[col][0].name
        return node in connected or any(h in connected for h in groups.get(node, ()))

    for _ in range(k):
        best = None
        for i, j in zip(*np.nonzero(valid & ~chosen)):
            if dst_connected(j) and (best is None or abs(scores[i, j]) > abs(scores[best])):
                best = (i, j)
        if best is None:
            break
        chosen[best] = True
        connected.add(names.sources[best[0]].name)
    return chosen


def test_greedy_matches_reference_and_reaches_logits(layout):
    scores = _scores(layout, seed=3)
    for k in (1, 5, 30):
        mask = select_greedy(scores, layout, k)
        np.testing.assert_array_equal(mask, _greedy_reference(scores, layout, k))
        assert mask.sum() == k
        circuit = Circuit.from_mask(scores, mask, layout)
        # Every source must reach the logits through chosen edges (kv nodes pass to their heads).
        groups = graph_names(layout).groups()
        reach = {"logits"}
        for _ in range(10):
            for e in circuit.edges:
                if e.dst in reach or any(h in reach for h in groups.get(e.dst, ())):
                    reach.add(e.src)
        assert {e.src for e in circuit.edges} <= reach
    # Greedy differs from plain top-k: the strongest edge into a head may be chosen before its head joins.
    assert select_greedy(scores, layout, 0).sum() == 0


def test_mask_round_trip_and_provenance(layout):
    scores = _scores(layout, seed=1)
    circuit = Circuit.from_scores(scores, layout, top_k=12, provenance={"model": "tiny", "task": "t"})
    np.testing.assert_array_equal(circuit.edge_mask(layout), select_top_k(scores, layout, 12))
    assert circuit.provenance["selection"] == {"rule": "top_k", "k": 12}
    assert len(circuit) == 12
    assert list(np.abs(circuit.scores)) == sorted(np.abs(circuit.scores), reverse=True)
    assert {n.name for n in circuit.nodes} == {e.src for e in circuit.edges} | {e.dst for e in circuit.edges}
    other = EdgeLayout.canonical(_config(n_layers=2))
    with pytest.raises(ValueError, match="build the layout from the circuit's own model"):
        circuit.edge_mask(other)


def test_json_round_trip_is_exact(tmp_path, layout):
    scores = _scores(layout, seed=2).astype(np.float32) * np.float32(1e-3)
    circuit = Circuit.from_scores(scores, layout, greedy=15,
                                  provenance={"model": "tiny", "model_hash": "abc", "metric": "logprob", "k": [1, 2]})
    again = Circuit.from_json(circuit.to_json())
    assert again == circuit
    assert sorted(again.scores.tolist()) == sorted(float(x) for x in scores[circuit.edge_mask(layout)])
    path = tmp_path / "c.json"
    circuit.to_json(path)
    assert Circuit.from_json(path) == circuit
    np.testing.assert_array_equal(Circuit.from_json(path).edge_mask(layout), circuit.edge_mask(layout))
    numpy_prov = Circuit.from_scores(scores, layout, top_k=3, provenance={"n": np.int64(3), "a": np.arange(2)})
    assert numpy_prov.provenance["n"] == 3 and numpy_prov.provenance["a"] == [0, 1]
    assert Circuit.from_json(numpy_prov.to_json()) == numpy_prov
    bad = json.loads(circuit.to_json())
    bad["format"] = "something else"
    with pytest.raises(ValueError, match="Not a jaxcirc circuit"):
        Circuit.from_dict(bad)


def test_scores_survive_json_bit_exact():
    cfg = _config(n_layers=1, n_heads=2, n_kv_heads=2)
    layout = EdgeLayout.canonical(cfg)
    scores = np.zeros((layout.n_src, layout.n_dst))
    scores[layout.input_src, layout.logits_dst] = 0.1 + 0.2  # not representable "nicely"
    scores[layout.head_src[0][1], layout.logits_dst] = np.float32(1 / 3)
    circuit = Circuit.from_scores(scores, layout, top_k=2)
    again = Circuit.from_json(circuit.to_json())
    assert again.scores.tobytes() == circuit.scores.tobytes()


def test_node_adjacency_collapses_ports():
    nodes = (Node("input", "input", -1), Node("a1.h0", "attn", 1, 0), Node("logits", "logits", 2))
    edges = (Edge("input", "a1.h0", "q", 0.5), Edge("input", "a1.h0", "k", -0.25),
             Edge("a1.h0", "logits", "", 2.0), Edge("input", "logits", "", -1.0))
    circuit = Circuit(nodes, edges, n_layers=2, n_heads=1, n_kv_heads=1)
    names, a = circuit.node_adjacency("abs")
    assert names == ("input", "a1.h0", "logits")
    np.testing.assert_allclose(a, [[0, 0.75, 1.0], [0, 0, 2.0], [0, 0, 0]])
    _, signed = circuit.node_adjacency("signed")
    assert signed[0, 1] == 0.25 and signed[0, 2] == -1.0
    _, binary = circuit.node_adjacency("binary")
    assert binary[0, 1] == 2.0
    assert circuit.edges[0].name == "input->a1.h0<q>" and edges[2].name == "a1.h0->logits"


def test_bad_input_is_refused(layout):
    scores = _scores(layout)
    with pytest.raises(ValueError, match="exactly one selection rule"):
        Circuit.from_scores(scores, layout, top_k=3, greedy=3)
    with pytest.raises(ValueError, match="Edge scores have shape"):
        Circuit.from_scores(scores[:, :3], layout, top_k=3)
    nan = scores.copy()
    nan[layout.input_src, layout.logits_dst] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        select_top_k(nan, layout, 3)
    with pytest.raises(ValueError, match="JSON data"):
        Circuit.from_scores(scores, layout, top_k=3, provenance={"x": object()})
    circuit = Circuit.from_scores(scores, layout, top_k=3)
    with pytest.raises(ValueError, match="duplicate edges"):
        Circuit(circuit.nodes, circuit.edges + circuit.edges[:1], circuit.n_layers, circuit.n_heads, circuit.n_kv_heads)


def test_drawing_writes_a_png(tmp_path):
    layout = EdgeLayout.canonical(_config())
    circuit = Circuit.from_scores(_scores(layout, seed=5), layout, greedy=25, provenance={"model": "tiny"})
    path = draw_circuit(circuit, tmp_path / "circuit.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
