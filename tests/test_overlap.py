"""Overlap of hand-built circuits whose Jaccard values are known by construction."""

import math

import numpy as np
import pytest

from jaxcirc.circuit import Circuit, Edge, Node
from jaxcirc.overlap import depth_bin, jaccard, overlap, overlap_matrix


def node(name, n_layers):
    if name in ("input", "logits"):
        return Node(name, name, -1 if name == "input" else n_layers)
    if name.startswith("m"):
        return Node(name, "mlp", int(name[1:]))
    layer, head = name[1:].split(".h")
    return Node(name, "attn", int(layer), int(head))


def circuit(edges, n_layers, n_heads=4):
    names = {n for s, d, _ in edges for n in (s, d)}
    nodes = tuple(sorted((node(n, n_layers) for n in names), key=lambda n: n.sort_key))
    return Circuit(nodes, tuple(Edge(s, d, p, 1.0) for s, d, p in edges), n_layers, n_heads, n_heads)


A = circuit([("input", "a0.h1", "q"), ("a0.h1", "m2", ""), ("m2", "logits", ""), ("input", "a3.h0", "v"),
             ("a3.h0", "logits", "")], n_layers=6)
B = circuit([("input", "a0.h1", "q"), ("a0.h1", "m2", ""), ("m2", "logits", ""), ("input", "a4.h2", "k"),
             ("a4.h2", "logits", "")], n_layers=6)


def test_index_overlap_by_construction():
    result = overlap(A, B, rule="index")
    # Nodes: A = {input, a0.h1, m2, logits, a3.h0}, B = {input, a0.h1, m2, logits, a4.h2}: 4 shared of 6.
    assert (result.nodes_a, result.nodes_b, result.nodes_shared) == (5, 5, 4)
    assert result.node_jaccard == pytest.approx(4 / 6)
    # Edges: 3 shared of 7.
    assert result.edge_jaccard == pytest.approx(3 / 7)
    assert result.matching["rule"] == "index"
    assert overlap(A, A).node_jaccard == 1.0 and overlap(A, A).edge_jaccard == 1.0


def test_ports_distinguish_edges():
    q = circuit([("input", "a1.h0", "q")], 2)
    k = circuit([("input", "a1.h0", "k")], 2)
    result = overlap(q, k)
    assert result.node_jaccard == 1.0 and result.edge_jaccard == 0.0


def test_depth_bins_match_models_of_different_depth():
    # The same circuit shape in a 6-layer and a 12-layer model (layer l <-> 2l), different heads.
    shallow = circuit([("input", "a1.h0", "q"), ("a1.h0", "m3", ""), ("m3", "logits", "")], n_layers=6)
    deep = circuit([("input", "a2.h5", "q"), ("a2.h5", "m6", ""), ("m6", "logits", "")], n_layers=12, n_heads=8)
    exact = overlap(shallow, deep, rule="index")
    assert exact.node_jaccard == pytest.approx(2 / 6)  # only input and logits coincide
    binned = overlap(shallow, deep, rule="depth", bins=6)
    assert binned.node_jaccard == 1.0 and binned.edge_jaccard == 1.0
    assert binned.matching == {"rule": "depth", "bins": 6, "binning": "round", "bin": "floor(B*l/L + 1/2)",
                               "node_key": "(depth bin, type in attn|mlp|input|logits); head index dropped",
                               "edge_key": "(src key, dst key, port)"}
    # Heads of one bin collapse to one key: two heads in layer 1 of the shallow model count once.
    two_heads = circuit([("input", "a1.h0", "q"), ("input", "a1.h3", "q")], n_layers=6)
    result = overlap(two_heads, two_heads, rule="depth", bins=6)
    assert result.nodes_a == 2 and result.edges_a == 1


def test_depth_bin_formulas():
    assert [depth_bin(l, 6, 6) for l in range(6)] == list(range(6))
    # round half up (not banker's rounding): 3 * 1 / 2 = 1.5 -> 2
    assert depth_bin(1, 2, 3) == 2
    assert [depth_bin(l, 30, 6) for l in (0, 2, 3, 29)] == [0, 0, 1, 6]
    assert [depth_bin(l, 30, 6, "centre") for l in (0, 4, 5, 29)] == [0, 0, 1, 5]
    assert max(depth_bin(l, 24, 10, "centre") for l in range(24)) == 9
    with pytest.raises(ValueError, match="outside"):
        depth_bin(6, 6, 6)


def test_matrix_and_jaccard_edge_cases():
    nodes, edges = overlap_matrix([A, B, A])
    np.testing.assert_allclose(nodes, nodes.T)
    np.testing.assert_allclose(np.diag(nodes), 1.0)
    assert nodes[0, 1] == pytest.approx(4 / 6) and edges[0, 2] == 1.0
    assert math.isnan(jaccard([], []))
    assert jaccard([1, 2], [3]) == 0.0
    with pytest.raises(ValueError, match="rule must be"):
        overlap(A, B, rule="fuzzy")
