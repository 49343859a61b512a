"""Component overlap between two circuits (experiments.md A.9): Jaccard of nodes and of edges.

    result = overlap(circuit_a, circuit_b, rule="index")        # exact (layer, head) identity
    result = overlap(circuit_a, circuit_b, rule="depth", bins=6) # models of different depth
    result.node_jaccard, result.edge_jaccard, result.matching    # the rule, recorded

Matching rules (the key each node is mapped to; an edge's key is (src key, dst key, port)):
  * "index": the node name itself, i.e. (layer, head) for heads, layer for MLPs; `input` and
    `logits` match each other. Models of different depth compare; nodes past the shallower model's
    depth simply find no partner.
  * "depth": (depth bin, type) with type in attn | mlp | input | logits and the head index dropped
    (a kv node counts as attn). Bin of layer l in an L-layer model:
        binning="round"  (default, A.9): floor(B * l / L + 1/2), bins 0..B (round half up);
        binning="centre": floor(B * (l + 1/2) / L), bins 0..B-1 (the bin holding the layer's centre).
    `input` and `logits` are one node each regardless of depth.
Keys are sets: several nodes falling into one bin count once. Jaccard |A & B| / |A | B| is NaN when
both sets are empty.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable, Iterable, Sequence
from typing import Any, Literal

import numpy as np

from jaxcirc.circuit import Circuit, Node

Rule = Literal["index", "depth"]
Binning = Literal["round", "centre"]


def jaccard(a: Iterable[Hashable], b: Iterable[Hashable]) -> float:
    """|A & B| / |A | B| of two sets (NaN when both are empty)."""
    a, b = set(a), set(b)
    union = a | b
    return len(a & b) / len(union) if union else float("nan")


def depth_bin(layer: int, n_layers: int, bins: int, binning: Binning = "round") -> int:
    """Normalised depth bin of a layer (rules in the module docstring)."""
    if n_layers < 1 or bins < 1:
        raise ValueError(f"Depth bins need n_layers >= 1 and bins >= 1, got {n_layers} and {bins}.")
    if not 0 <= layer < n_layers:
        raise ValueError(f"Layer {layer} is outside 0..{n_layers - 1}.")
    if binning == "round":
        return math.floor(bins * layer / n_layers + 0.5)
    if binning == "centre":
        return math.floor(bins * (layer + 0.5) / n_layers)
    raise ValueError(f"binning must be 'round' or 'centre', got {binning!r}.")


def node_key(node: Node, n_layers: int, rule: Rule = "index", bins: int = 10,
             binning: Binning = "round") -> Hashable:
    """The key a node is matched by under `rule`."""
    if rule == "index":
        return node.name
    if rule != "depth":
        raise ValueError(f"rule must be 'index' or 'depth', got {rule!r}.")
    if node.kind in ("input", "logits"):
        return (node.kind,)
    kind = "attn" if node.kind in ("attn", "kv") else node.kind
    return (depth_bin(node.layer, n_layers, bins, binning), kind)


def _keys(circuit: Circuit, rule: Rule, bins: int, binning: Binning) -> tuple[set, set]:
    keyed = {n.name: node_key(n, circuit.n_layers, rule, bins, binning) for n in circuit.nodes}
    return set(keyed.values()), {(keyed[e.src], keyed[e.dst], e.port) for e in circuit.edges}


def matching_rule(rule: Rule, bins: int = 10, binning: Binning = "round") -> dict[str, Any]:
    """The matching rule as JSON data (stored with every result)."""
    if rule == "index":
        return {"rule": "index", "node_key": "node name: (layer, head) for heads, layer for MLPs",
                "edge_key": "(src key, dst key, port)"}
    if rule != "depth":
        raise ValueError(f"rule must be 'index' or 'depth', got {rule!r}.")
    formula = "floor(B*l/L + 1/2)" if binning == "round" else "floor(B*(l + 1/2)/L)"
    return {"rule": "depth", "bins": bins, "binning": binning, "bin": formula,
            "node_key": "(depth bin, type in attn|mlp|input|logits); head index dropped",
            "edge_key": "(src key, dst key, port)"}


@dataclasses.dataclass(frozen=True)
class Overlap:
    """Node and edge Jaccard between circuits a and b under one matching rule (`matching`)."""

    node_jaccard: float
    edge_jaccard: float
    nodes_a: int
    nodes_b: int
    nodes_shared: int
    edges_a: int
    edges_b: int
    edges_shared: int
    matching: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def overlap(a: Circuit, b: Circuit, rule: Rule = "index", bins: int = 10, binning: Binning = "round") -> Overlap:
    """Jaccard of matched nodes and edges of two circuits (counts are of distinct keys)."""
    matching = matching_rule(rule, bins, binning)
    nodes_a, edges_a = _keys(a, rule, bins, binning)
    nodes_b, edges_b = _keys(b, rule, bins, binning)
    return Overlap(jaccard(nodes_a, nodes_b), jaccard(edges_a, edges_b), len(nodes_a), len(nodes_b),
                   len(nodes_a & nodes_b), len(edges_a), len(edges_b), len(edges_a & edges_b), matching)


def overlap_matrix(circuits: Sequence[Circuit], rule: Rule = "index", bins: int = 10,
                   binning: Binning = "round") -> tuple[np.ndarray, np.ndarray]:
    """(node Jaccard [n, n], edge Jaccard [n, n]) between every pair of circuits."""
    keys = [_keys(c, rule, bins, binning) for c in circuits]
    n = len(keys)
    nodes, edges = np.ones((n, n)), np.ones((n, n))
    for i in range(n):
        for j in range(n):
            nodes[i, j] = jaccard(keys[i][0], keys[j][0])
            edges[i, j] = jaccard(keys[i][1], keys[j][1])
    return nodes, edges
