"""Circuits: a selected set of weighted, directed edges of the residual graph, with provenance.

    scores = ...                                    # [n_src, n_dst] edge scores (EAP, EAP-IG)
    layout = EdgeLayout.canonical(cfg)
    circuit = Circuit.from_scores(scores, layout, top_k=200, provenance={"task": "instrument"})
    mask = circuit.edge_mask(layout)                # [n_src, n_dst] bool, for exact edge patching
    Circuit.from_json(circuit.to_json()) == circuit # exact round trip
    draw_circuit(circuit, "circuit.png")

Names follow EAP-IG: sources `input`, `a{l}.h{h}` (attention head), `m{l}` (MLP); destinations are
the same nodes plus `logits`, and an edge into a head names its port: `a0.h1->a2.h3<q>`. Under
grouped-query attention (fewer kv heads than heads) the k and v inputs belong to a kv head, which
becomes its own node `a{l}.kv{j}` (shared by the query heads of its group); with one kv head per
head the k/v inputs are the head's own. Node-level views (adjacency, concentration, overlap,
spectra) collapse the q/k/v ports of a node onto the node; edges keep their port.

Names are derived from an `EdgeLayout` (never from a hard-coded order), so a score array in any
layout converts as long as its layout object describes it.

Selection rules (all over valid edges only, ties broken by the layout's flat edge order):
  * top-k: the k edges with the largest |score|;
  * threshold: every edge with |score| >= threshold;
  * greedy: grow from the logits node backwards. An edge is a candidate when its destination node
    is already in the circuit (at the start only `logits` is; a kv node counts as in the circuit
    once any query head of its group is). Repeatedly add the candidate with the largest |score|,
    which adds its source node, whose own input edges become candidates, until k edges are chosen
    or no candidate is left. Every chosen edge therefore has a directed path to the logits.
"""

from __future__ import annotations

import dataclasses
import heapq
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np

from jaxcirc.edge_patch import EdgeLayout

NodeKind = Literal["input", "attn", "kv", "mlp", "logits"]
_KIND_ORDER = {"input": 0, "kv": 1, "attn": 2, "mlp": 3, "logits": 4}
FORMAT = "jaxcirc.circuit/1"


@dataclasses.dataclass(frozen=True, order=True)
class Node:
    """A graph node. layer is -1 for `input` and n_layers for `logits`; head is the head (or kv
    head) index for attention nodes and None otherwise."""

    name: str
    kind: NodeKind
    layer: int
    head: int | None = None

    @property
    def sort_key(self) -> tuple[int, int, int]:
        return (self.layer, _KIND_ORDER[self.kind], -1 if self.head is None else self.head)


@dataclasses.dataclass(frozen=True)
class Edge:
    """A directed edge src -> dst entering the destination through `port` ("q", "k", "v" for a head's
    inputs, "" for an MLP or the logits), with its score."""

    src: str
    dst: str
    port: str
    score: float

    @property
    def name(self) -> str:
        return f"{self.src}->{self.dst}" + (f"<{self.port}>" if self.port else "")

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.src, self.dst, self.port)


@dataclasses.dataclass(frozen=True)
class GraphNames:
    """Node names of a layout: `sources[i]` is source row i, `destinations[j]` = (node, port) of column j."""

    sources: tuple[Node, ...]
    destinations: tuple[tuple[Node, str], ...]
    n_layers: int
    n_heads: int
    n_kv_heads: int

    def groups(self) -> dict[str, tuple[str, ...]]:
        """kv node name -> names of the query heads that read it (empty without GQA)."""
        if self.n_kv_heads == self.n_heads:
            return {}
        size = self.n_heads // self.n_kv_heads
        return {f"a{l}.kv{j}": tuple(f"a{l}.h{h}" for h in range(j * size, (j + 1) * size))
                for l in range(self.n_layers) for j in range(self.n_kv_heads)}


def graph_names(layout: EdgeLayout) -> GraphNames:
    """Names of every source row and destination column of `layout`."""
    n_layers = len(layout.mlp_src)
    n_heads = len(layout.q_dst[0]) if n_layers else 0
    n_kv = len(layout.k_dst[0]) if n_layers else 0
    if n_kv and n_heads % n_kv:
        raise ValueError(f"{n_heads} heads do not split into {n_kv} kv groups; check the layout.")
    sources: list[Node | None] = [None] * layout.n_src
    dests: list[tuple[Node, str] | None] = [None] * layout.n_dst
    sources[layout.input_src] = Node("input", "input", -1)
    for l in range(n_layers):
        for h in range(n_heads):
            head = Node(f"a{l}.h{h}", "attn", l, h)
            sources[layout.head_src[l][h]] = head
            dests[layout.q_dst[l][h]] = (head, "q")
        for j in range(n_kv):
            kv = Node(f"a{l}.h{j}", "attn", l, j) if n_kv == n_heads else Node(f"a{l}.kv{j}", "kv", l, j)
            dests[layout.k_dst[l][j]] = (kv, "k")
            dests[layout.v_dst[l][j]] = (kv, "v")
        mlp = Node(f"m{l}", "mlp", l)
        sources[layout.mlp_src[l]] = mlp
        dests[layout.mlp_dst[l]] = (mlp, "")
    dests[layout.logits_dst] = (Node("logits", "logits", n_layers), "")
    if any(s is None for s in sources) or any(d is None for d in dests):
        raise ValueError("The edge layout leaves some source rows or destination columns unnamed; "
                         "its index tables must cover every row and column.")
    return GraphNames(tuple(sources), tuple(dests), n_layers, n_heads, n_kv)


def _check_scores(scores: Any, layout: EdgeLayout) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (layout.n_src, layout.n_dst):
        raise ValueError(f"Edge scores have shape {scores.shape}; this model's graph needs "
                         f"[n_src={layout.n_src}, n_dst={layout.n_dst}] (see EdgeLayout.canonical).")
    bad = ~np.isfinite(scores) & layout.valid()
    if bad.any():
        src, dst = np.argwhere(bad)[0]
        raise ValueError(f"Edge scores contain {int(bad.sum())} non-finite values on valid edges "
                         f"(first at [{src}, {dst}]); fix the attribution run before selecting edges.")
    return scores


def edge_ranks(scores: Any, layout: EdgeLayout) -> np.ndarray:
    """[n_src, n_dst] int: rank of each valid edge by |score| (0 = largest; ties in flat order);
    invalid edges get the largest int64, so `ranks < k` is the top-k mask for every k."""
    scores = _check_scores(scores, layout)
    valid = layout.valid()
    flat = np.flatnonzero(valid)
    order = flat[np.argsort(-np.abs(scores.reshape(-1)[flat]), kind="stable")]
    ranks = np.full(scores.size, np.iinfo(np.int64).max, dtype=np.int64)
    ranks[order] = np.arange(len(flat))
    return ranks.reshape(scores.shape)


def select_top_k(scores: Any, layout: EdgeLayout, k: int) -> np.ndarray:
    """[n_src, n_dst] bool: the k valid edges with the largest |score| (all of them if k >= n_valid)."""
    if k < 0:
        raise ValueError(f"top-k needs k >= 0, got {k}.")
    return edge_ranks(scores, layout) < k


def select_threshold(scores: Any, layout: EdgeLayout, threshold: float) -> np.ndarray:
    """[n_src, n_dst] bool: valid edges with |score| >= threshold."""
    if not np.isfinite(threshold) or threshold < 0:
        raise ValueError(f"The threshold applies to |score| and must be a finite number >= 0, got {threshold}.")
    scores = _check_scores(scores, layout)
    return layout.valid() & (np.abs(scores) >= threshold)


def select_greedy(scores: Any, layout: EdgeLayout, k: int) -> np.ndarray:
    """[n_src, n_dst] bool: k edges grown backwards from the logits (rule in the module docstring)."""
    if k < 0:
        raise ValueError(f"greedy selection needs k >= 0, got {k}.")
    scores = _check_scores(scores, layout)
    names = graph_names(layout)
    valid = layout.valid()
    magnitude = np.abs(scores)
    # Which destination columns open up when a node joins the circuit.
    opened_by: dict[str, list[int]] = {}
    for col, (node, _) in enumerate(names.destinations):
        opened_by.setdefault(node.name, []).append(col)
    for kv, heads in names.groups().items():
        for head in heads:
            opened_by.setdefault(head, []).extend(opened_by.get(kv, []))
    chosen = np.zeros_like(valid)
    heap: list[tuple[float, int, int]] = []
    opened: set[int] = set()

    def open_node(name: str) -> None:
        for col in opened_by.get(name, []):
            if col in opened:
                continue
            opened.add(col)
            for row in np.flatnonzero(valid[:, col]):
                heapq.heappush(heap, (-magnitude[row, col], int(row) * layout.n_dst + col, int(row)))

    open_node("logits")
    in_circuit = {"logits"}
    n = 0
    while heap and n < k:
        _, flat, row = heapq.heappop(heap)
        col = flat - row * layout.n_dst
        if chosen[row, col]:
            continue
        chosen[row, col] = True
        n += 1
        src = names.sources[row].name
        if src not in in_circuit:
            in_circuit.add(src)
            open_node(src)
    return chosen


def _json_default(value: Any) -> Any:
    """numpy / jax scalars and arrays and paths become their JSON equivalents."""
    if isinstance(value, (np.generic, np.ndarray)) or hasattr(value, "__array__"):
        return np.asarray(value).tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON data")


def _canonical_provenance(provenance: Mapping[str, Any] | None) -> dict[str, Any]:
    """Provenance as plain JSON data, so export/import round-trips exactly."""
    try:
        return json.loads(json.dumps(dict(provenance or {}), allow_nan=False, default=_json_default))
    except (TypeError, ValueError) as error:
        raise ValueError(f"Circuit provenance must be JSON data (str, numbers, lists, dicts; arrays and "
                         f"paths are converted): {error}.") from None


@dataclasses.dataclass(frozen=True)
class Circuit:
    """Nodes and weighted directed edges of a circuit, plus where it came from.

    nodes: endpoints of the edges, sorted by (layer, kind, head); edges: sorted by |score|
    descending (ties: source, destination, port). n_layers / n_heads / n_kv_heads describe the
    model's graph (depth matching and drawing need them). provenance: JSON data such as
    {"model": source, "model_hash": ..., "task": ..., "method": "eap-ig", "metric": "logprob",
    "selection": {"rule": "top_k", "k": 200}}.
    """

    nodes: tuple[Node, ...]
    edges: tuple[Edge, ...]
    n_layers: int
    n_heads: int
    n_kv_heads: int
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "provenance", _canonical_provenance(self.provenance))
        for n in self.nodes:
            if n.kind not in _KIND_ORDER:
                raise ValueError(f"Node {n.name!r} has kind {n.kind!r}; expected one of {sorted(_KIND_ORDER)}.")
        keys = [e.key for e in self.edges]
        if len(set(keys)) != len(keys):
            raise ValueError("Circuit has duplicate edges (same src, dst and port); merge their scores first.")
        names = {n.name for n in self.nodes}
        missing = {e.src for e in self.edges} | {e.dst for e in self.edges}
        missing -= names
        if missing:
            raise ValueError(f"Circuit edges reference nodes that are not in `nodes`: {sorted(missing)[:5]}.")

    # Construction -------------------------------------------------------------------------------

    @classmethod
    def from_mask(cls, scores: Any, mask: Any, layout: EdgeLayout,
                  provenance: Mapping[str, Any] | None = None) -> "Circuit":
        """The circuit of the valid edges where `mask` [n_src, n_dst] is true, scored by `scores`."""
        scores = _check_scores(scores, layout)
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != scores.shape:
            raise ValueError(f"Edge mask has shape {mask.shape}; expected {scores.shape} like the scores.")
        names = graph_names(layout)
        nodes: dict[str, Node] = {}
        edges = []
        for row, col in np.argwhere(mask & layout.valid()):
            src = names.sources[row]
            dst, port = names.destinations[col]
            nodes[src.name], nodes[dst.name] = src, dst
            edges.append(Edge(src.name, dst.name, port, float(scores[row, col])))
        return cls(_sorted_nodes(nodes.values()), _sorted_edges(edges, nodes), names.n_layers,
                   names.n_heads, names.n_kv_heads, provenance)

    @classmethod
    def from_scores(cls, scores: Any, layout: EdgeLayout, *, top_k: int | None = None,
                    threshold: float | None = None, greedy: int | None = None,
                    provenance: Mapping[str, Any] | None = None) -> "Circuit":
        """Select edges from `scores` [n_src, n_dst] by exactly one rule (top_k=K, threshold=T or
        greedy=K); the rule is recorded under provenance["selection"]."""
        given = {k: v for k, v in (("top_k", top_k), ("threshold", threshold), ("greedy", greedy)) if v is not None}
        if len(given) != 1:
            raise ValueError("Give exactly one selection rule: top_k=K, threshold=T or greedy=K "
                             f"(got {sorted(given) or 'none'}).")
        (rule, value), = given.items()
        if rule == "top_k":
            mask = select_top_k(scores, layout, int(value))
        elif rule == "threshold":
            mask = select_threshold(scores, layout, float(value))
        else:
            mask = select_greedy(scores, layout, int(value))
        provenance = dict(provenance or {})
        provenance["selection"] = {"rule": rule, ("threshold" if rule == "threshold" else "k"): value}
        return cls.from_mask(scores, mask, layout, provenance)

    # Views ----------------------------------------------------------------------------------------

    @property
    def node_names(self) -> tuple[str, ...]:
        return tuple(n.name for n in self.nodes)

    @property
    def edge_names(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.edges)

    @property
    def scores(self) -> np.ndarray:
        """[n_edges] float64 scores in edge order."""
        return np.array([e.score for e in self.edges], dtype=np.float64)

    def __len__(self) -> int:
        return len(self.edges)

    def edge_mask(self, layout: EdgeLayout) -> np.ndarray:
        """[n_src, n_dst] bool mask of this circuit's edges in `layout` (for exact edge patching)."""
        names = graph_names(layout)
        if (names.n_layers, names.n_heads, names.n_kv_heads) != (self.n_layers, self.n_heads, self.n_kv_heads):
            raise ValueError(
                f"This circuit comes from a graph with {self.n_layers} layers, {self.n_heads} heads and "
                f"{self.n_kv_heads} kv heads, but the layout has {names.n_layers}, {names.n_heads} and "
                f"{names.n_kv_heads}; build the layout from the circuit's own model.")
        rows = {n.name: i for i, n in enumerate(names.sources)}
        cols = {(n.name, port): j for j, (n, port) in enumerate(names.destinations)}
        mask = np.zeros((layout.n_src, layout.n_dst), dtype=bool)
        valid = layout.valid()
        for e in self.edges:
            row, col = rows.get(e.src), cols.get((e.dst, e.port))
            if row is None or col is None or not valid[row, col]:
                raise ValueError(f"Edge {e.name} does not exist in this layout's graph.")
            mask[row, col] = True
        return mask

    def node_adjacency(self, weight: Literal["abs", "signed", "binary"] = "abs") -> tuple[tuple[str, ...], np.ndarray]:
        """(node names, A [n_nodes, n_nodes]) directed, A[u, v] = sum over ports of the u -> v edges'
        |score| ("abs"), score ("signed") or count ("binary")."""
        if weight not in ("abs", "signed", "binary"):
            raise ValueError(f"weight must be 'abs', 'signed' or 'binary', got {weight!r}.")
        index = {name: i for i, name in enumerate(self.node_names)}
        adjacency = np.zeros((len(index), len(index)))
        for e in self.edges:
            value = abs(e.score) if weight == "abs" else e.score if weight == "signed" else 1.0
            adjacency[index[e.src], index[e.dst]] += value
        return self.node_names, adjacency

    def subset(self, edges: Any) -> "Circuit":
        """The circuit of some of this circuit's edges (an iterable of Edge), same graph and provenance."""
        edges = tuple(edges)
        used = {e.src for e in edges} | {e.dst for e in edges}
        return Circuit(tuple(n for n in self.nodes if n.name in used), edges, self.n_layers,
                       self.n_heads, self.n_kv_heads, self.provenance)

    # JSON -----------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "graph": {"n_layers": self.n_layers, "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads},
            "provenance": self.provenance,
            "nodes": [{"name": n.name, "kind": n.kind, "layer": n.layer, "head": n.head} for n in self.nodes],
            "edges": [{"src": e.src, "dst": e.dst, "port": e.port, "score": e.score} for e in self.edges],
        }

    def to_json(self, path: str | Path | None = None) -> str:
        """JSON text (floats written with repr, so scores come back bit-exact); also written to `path`."""
        text = json.dumps(self.to_dict(), indent=1, allow_nan=False)
        if path is not None:
            Path(path).write_text(text + "\n", encoding="utf-8")
        return text

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Circuit":
        if data.get("format") != FORMAT:
            raise ValueError(f"Not a jaxcirc circuit: format is {data.get('format')!r}, expected {FORMAT!r}.")
        try:
            graph = data["graph"]
            nodes = tuple(Node(n["name"], n["kind"], int(n["layer"]), n["head"]) for n in data["nodes"])
            edges = tuple(Edge(e["src"], e["dst"], e["port"], float(e["score"])) for e in data["edges"])
            return cls(nodes, edges, int(graph["n_layers"]), int(graph["n_heads"]),
                       int(graph["n_kv_heads"]), data.get("provenance", {}))
        except (KeyError, TypeError) as error:
            raise ValueError(f"Malformed circuit JSON: missing or wrong field {error}.") from None

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "Circuit":
        """A circuit from JSON text or from a file path."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            path = Path(text_or_path)
            if not path.exists():
                raise FileNotFoundError(f"Circuit file {path} does not exist.")
            text = path.read_text(encoding="utf-8")
        return cls.from_dict(json.loads(text))


def _sorted_nodes(nodes: Any) -> tuple[Node, ...]:
    return tuple(sorted(nodes, key=lambda n: n.sort_key))


def _sorted_edges(edges: list[Edge], nodes: Mapping[str, Node]) -> tuple[Edge, ...]:
    port_order = {"q": 0, "k": 1, "v": 2, "": 3}
    return tuple(sorted(edges, key=lambda e: (-abs(e.score), nodes[e.src].sort_key, nodes[e.dst].sort_key,
                                              port_order[e.port])))


# Drawing --------------------------------------------------------------------------------------------

def node_positions(circuit: Circuit) -> dict[str, tuple[float, float]]:
    """(x, y) per node: y is the layer (input at -1, logits at n_layers), heads spread along x, the
    MLP to the right and slightly above its layer's heads, kv nodes under their query heads."""
    H = max(circuit.n_heads, 1)
    group = max(circuit.n_heads // max(circuit.n_kv_heads, 1), 1)
    positions = {}
    for n in circuit.nodes:
        if n.kind in ("input", "logits"):
            positions[n.name] = ((H - 1) / 2, float(n.layer))
        elif n.kind == "attn":
            positions[n.name] = (float(n.head), float(n.layer))
        elif n.kind == "kv":
            positions[n.name] = (n.head * group + (group - 1) / 2, n.layer - 0.35)
        else:
            positions[n.name] = (H + 0.5, n.layer + 0.4)
    return positions


def draw_circuit(circuit: Circuit, path: str | Path, title: str | None = None, max_edges: int | None = None,
                 dpi: int = 120) -> Path:
    """Write a PNG of the circuit: nodes laid out by layer, edge width proportional to |score|,
    blue for positive and red for negative scores; q/k/v edges bend differently. Returns the path."""
    from matplotlib.figure import Figure  # imported here: only drawing needs matplotlib
    from matplotlib.patches import FancyArrowPatch

    edges = circuit.edges if max_edges is None else circuit.edges[:max_edges]
    positions = node_positions(circuit)
    width = max(6.0, 0.7 * (circuit.n_heads + 3))
    height = max(4.0, 0.45 * (circuit.n_layers + 2))
    fig = Figure(figsize=(width, height))
    ax = fig.add_subplot()
    top = max((abs(e.score) for e in edges), default=1.0) or 1.0
    bend = {"q": 0.0, "k": 0.15, "v": -0.15, "": 0.05}
    for e in sorted(edges, key=lambda e: abs(e.score)):  # strongest drawn last, on top
        strength = abs(e.score) / top
        ax.add_patch(FancyArrowPatch(
            positions[e.src], positions[e.dst], arrowstyle="-|>", mutation_scale=6,
            connectionstyle=f"arc3,rad={bend[e.port]}", linewidth=0.3 + 3.5 * strength,
            color="tab:blue" if e.score >= 0 else "tab:red", alpha=0.25 + 0.65 * strength,
            shrinkA=4, shrinkB=4))
    colours = {"input": "0.3", "attn": "tab:orange", "kv": "gold", "mlp": "tab:green", "logits": "0.3"}
    used = {e.src for e in edges} | {e.dst for e in edges}
    for n in circuit.nodes:
        if n.name not in used:
            continue
        x, y = positions[n.name]
        ax.scatter([x], [y], s=60, color=colours[n.kind], zorder=3, edgecolors="black", linewidths=0.5)
        ax.annotate(n.name, (x, y), xytext=(3, 3), textcoords="offset points", fontsize=6, zorder=4)
    ax.set_xlim(-1, circuit.n_heads + 1.5)
    ax.set_ylim(-1.7, circuit.n_layers + 0.7)
    ax.set_yticks(range(-1, circuit.n_layers + 1))
    ax.set_yticklabels(["input"] + [str(l) for l in range(circuit.n_layers)] + ["logits"], fontsize=7)
    ax.set_xticks(range(circuit.n_heads))
    ax.set_xlabel("head (MLP at right)")
    ax.set_ylabel("layer")
    ax.grid(axis="y", linewidth=0.3, alpha=0.5)
    prov = circuit.provenance
    ax.set_title(title or " / ".join(str(prov[k]) for k in ("model", "task", "method") if k in prov)
                 + f"  ({len(edges)} edges; blue +, red -)", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    return path
