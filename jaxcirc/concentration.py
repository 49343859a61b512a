"""Attribution concentration (experiments.md A.6): how much of a circuit's edge mass sits on few nodes.

    conc = concentration(Circuit.from_scores(scores, layout, top_k=200))
    conc.share(20), conc.n_nodes        # the paper's "89-92 % within <= 28 nodes"
    plot_concentration(conc, "concentration.png")

Procedure: w_e = |s_e| / sum_{e in circuit} |s_e|; node mass M(n) = sum of the w_e of the edges
incident to n, renormalised to sum to 1; nodes sorted by mass; cumulative share of the top-n nodes.

Aggregation rules (recorded in the result):
  * "both" (default, A.6): each edge's mass goes to both endpoints, then renormalised. Because every
    edge has exactly two endpoints this is identical to "split" (half to each endpoint): both give
    M(n) = sum_{e incident to n} w_e / 2. Either name may be used; the numbers are the same.
  * "source" / "destination": the whole mass goes to one endpoint (outgoing / incoming attribution).
Nodes are node-level (a head's q, k, v inputs are one node); `input` and `logits` count as nodes.
This is a share of attribution mass, not of causally explained behaviour (see faithfulness).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

import numpy as np

from jaxcirc.circuit import Circuit
from jaxcirc.edge_patch import EdgeLayout

Aggregation = Literal["both", "split", "source", "destination"]


@dataclasses.dataclass(frozen=True)
class Concentration:
    """Node mass of a circuit, sorted descending.

    nodes: [n_nodes] names; mass: [n_nodes] shares summing to 1; cumulative: [n_nodes] share of the
    top-n nodes (cumulative[n-1]); n_edges: edges in the circuit; aggregation: the rule used.
    """

    nodes: tuple[str, ...]
    mass: np.ndarray
    cumulative: np.ndarray
    n_edges: int
    aggregation: str

    @property
    def n_nodes(self) -> int:
        """Number of nodes the circuit spans (nodes with any incident edge)."""
        return len(self.nodes)

    def share(self, n: int) -> float:
        """Share of the mass held by the top-n nodes (1.0 once n >= n_nodes)."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}.")
        return 0.0 if n == 0 else float(self.cumulative[min(n, self.n_nodes) - 1])

    def nodes_for(self, share: float) -> int:
        """Smallest number of top nodes holding at least `share` of the mass."""
        if not 0 <= share <= 1:
            raise ValueError(f"share must be in [0, 1], got {share}.")
        # A tiny tolerance so that share=1.0 is reached despite rounding in the cumulative sum.
        return int(np.searchsorted(self.cumulative, share - 1e-12) + 1) if share > 0 else 0

    def summary(self, top: tuple[int, ...] = (5, 10, 20, 28), shares: tuple[float, ...] = (0.5, 0.8, 0.9)) -> dict[str, Any]:
        """Headline numbers as JSON data."""
        return {
            "n_edges": self.n_edges, "n_nodes": self.n_nodes, "aggregation": self.aggregation,
            "share_of_top_nodes": {str(n): self.share(n) for n in top},
            "nodes_for_share": {str(s): self.nodes_for(s) for s in shares},
            "top_nodes": [[name, float(m)] for name, m in zip(self.nodes[:10], self.mass[:10])],
        }


def concentration(circuit: Circuit, aggregation: Aggregation = "both") -> Concentration:
    """Concentration of a circuit's |score| mass on its nodes (rule in the module docstring)."""
    if aggregation not in ("both", "split", "source", "destination"):
        raise ValueError(f"aggregation must be 'both', 'split', 'source' or 'destination', got {aggregation!r}.")
    if not circuit.edges:
        raise ValueError("The circuit has no edges; select some (e.g. top_k=200) before measuring concentration.")
    weights = np.abs(circuit.scores)
    if weights.sum() == 0:
        raise ValueError("Every edge of the circuit has score 0, so there is no mass to distribute.")
    weights = weights / weights.sum()
    index = {name: i for i, name in enumerate(circuit.node_names)}
    mass = np.zeros(len(index))
    for e, w in zip(circuit.edges, weights):
        if aggregation in ("both", "split", "source"):
            mass[index[e.src]] += w
        if aggregation in ("both", "split", "destination"):
            mass[index[e.dst]] += w
    keep = mass > 0 if aggregation in ("source", "destination") else np.ones(len(mass), bool)
    # One-endpoint rules leave the other endpoints without mass; they are not "spanned" by the rule.
    names = np.array(circuit.node_names, dtype=object)[keep]
    mass = mass[keep] / mass[keep].sum()
    order = np.argsort(-mass, kind="stable")
    return Concentration(tuple(names[order]), mass[order], np.cumsum(mass[order]), len(circuit.edges), aggregation)


def concentration_from_scores(scores: Any, layout: EdgeLayout, k: int = 200,
                              aggregation: Aggregation = "both") -> Concentration:
    """Concentration of the top-k edges of a score array [n_src, n_dst] (A.6 uses k = 200)."""
    return concentration(Circuit.from_scores(scores, layout, top_k=k), aggregation)


def plot_concentration(conc: Concentration | dict[str, Concentration], path: str | Path,
                       marks: tuple[int, ...] = (20, 28), title: str | None = None) -> Path:
    """PNG of the cumulative share vs number of top nodes (one curve per entry of a dict)."""
    from matplotlib.figure import Figure

    curves = conc if isinstance(conc, dict) else {"": conc}
    fig = Figure(figsize=(5.5, 3.8))
    ax = fig.add_subplot()
    for label, c in curves.items():
        n = np.arange(0, c.n_nodes + 1)
        share = np.concatenate([[0.0], c.cumulative])
        ax.plot(n, share, marker=".", markersize=3, label=label or f"{c.n_edges} edges")
    for m in marks:
        ax.axvline(m, color="0.6", linewidth=0.7, linestyle="--")
    ax.set_xlabel("top-n nodes")
    ax.set_ylabel("cumulative share of |score| mass")
    ax.set_ylim(0, 1.02)
    ax.grid(linewidth=0.3, alpha=0.5)
    ax.legend(fontsize=7)
    first = next(iter(curves.values()))
    ax.set_title(title or f"Attribution concentration ({first.aggregation})", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path
