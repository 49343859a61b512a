"""The computational graph that edge attribution scores: nodes, destinations, edges.

Every destination reads the residual stream, which is the sum of the outputs of the nodes
upstream of it (plus constant biases). An edge u -> v is node u's output as it enters
destination v; patching it changes v's input by (z'_u - z_u) and nothing else.

Nodes (sources; what writes to the residual stream), index order:

    0                          input       embeddings (hook_embed + hook_pos_embed)
    1 + l*(H+1) + h            a{l}.h{h}   head h of layer l (attn.hook_result[:, :, h], no b_O)
    1 + l*(H+1) + H            m{l}        MLP of layer l (hook_mlp_out)

    n_src = 1 + L*(H+1)

Destinations (what reads it), index order, with D = H + 2K + 1 per layer (K = n_kv_heads):

    l*D + h                    a{l}.h{h}<q>   query input of head h          (blocks.{l}.hook_q_input[:, :, h])
    l*D + H + j                a{l}.h{j}<k>   key input of kv head j         (blocks.{l}.hook_k_input[:, :, j])
    l*D + H + K + j            a{l}.h{j}<v>   value input of kv head j       (blocks.{l}.hook_v_input[:, :, j])
    l*D + H + 2K               m{l}           MLP input                      (blocks.{l}.hook_mlp_in)
    L*D                        logits         final residual                 (blocks.{L-1}.hook_resid_post)

    n_dst = L*D + 1

Under grouped-query attention (K < H) key and value destinations are per *kv head* and named
`a{l}.kv{j}<k>` / `a{l}.kv{j}<v>` (query head h reads kv head h // (H/K), HF's repeat_kv order);
without it they are `a{l}.h{j}<k>`, the names of hannamw/EAP-IG. An edge score or edge mask is
an `[n_src, n_dst]` array in exactly this order (the same order as
`jaxcirc.edge_patch.EdgeLayout.canonical`); edge names are `"{src}->{dst}"`.

Valid edges (`Graph.valid`): u -> v when u is computed before v reads the residual stream:
  * the input feeds every destination;
  * a node of layer l feeds every destination of layers > l and the logits;
  * heads of layer l feed the MLP of layer l, except with a parallel residual (Pythia/GPT-NeoX),
    where attention and MLP of a layer both read resid_pre;
  * heads of layer l never feed heads of layer l, and m{l} never feeds m{l}.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxcirc.edge_patch import check_edge_decomposable
from jaxcirc.models.config import ModelConfig

NODE_KINDS: tuple[str, ...] = ("input", "head", "mlp")
DST_KINDS: tuple[str, ...] = ("q", "k", "v", "mlp", "logits")


def _readonly(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


@dataclasses.dataclass(frozen=True, eq=False)
class Graph:
    """Node and destination tables of one model configuration (see the module docstring for order).

    Arrays (numpy, read-only):
      node_layer [n_src]   layer that writes the node (-1 for the input)
      node_kind  [n_src]   index into NODE_KINDS (0 input, 1 head, 2 mlp)
      node_head  [n_src]   head index (-1 unless a head)
      dst_layer  [n_dst]   layer that reads (n_layers for the logits)
      dst_kind   [n_dst]   index into DST_KINDS (0 q, 1 k, 2 v, 3 mlp, 4 logits)
      dst_head   [n_dst]   query head for q, kv head for k and v, -1 otherwise
      valid      [n_src, n_dst] bool
    """

    n_layers: int
    n_heads: int
    n_kv_heads: int
    parallel_residual: bool
    node_names: tuple[str, ...]
    dst_names: tuple[str, ...]
    node_layer: np.ndarray
    node_kind: np.ndarray
    node_head: np.ndarray
    dst_layer: np.ndarray
    dst_kind: np.ndarray
    dst_head: np.ndarray
    valid: np.ndarray

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "Graph":
        check_edge_decomposable(cfg)
        L, H, K = cfg.n_layers, cfg.n_heads, cfg.n_kv_heads
        kv = "kv" if K < H else "h"
        node_names, node_layer, node_kind, node_head = ["input"], [-1], [0], [-1]
        for l in range(L):
            for h in range(H):
                node_names.append(f"a{l}.h{h}"); node_layer.append(l); node_kind.append(1); node_head.append(h)
            node_names.append(f"m{l}"); node_layer.append(l); node_kind.append(2); node_head.append(-1)
        dst_names, dst_layer, dst_kind, dst_head = [], [], [], []
        for l in range(L):
            for kind, n, prefix in ((0, H, "h"), (1, K, kv), (2, K, kv)):
                for i in range(n):
                    dst_names.append(f"a{l}.{prefix}{i}<{DST_KINDS[kind]}>")
                    dst_layer.append(l); dst_kind.append(kind); dst_head.append(i)
            dst_names.append(f"m{l}"); dst_layer.append(l); dst_kind.append(3); dst_head.append(-1)
        dst_names.append("logits"); dst_layer.append(L); dst_kind.append(4); dst_head.append(-1)

        nl, nk = np.array(node_layer), np.array(node_kind)
        dl, dk = np.array(dst_layer), np.array(dst_kind)
        earlier = nl[:, None] < dl[None, :]
        same_layer_head_to_mlp = (nl[:, None] == dl[None, :]) & (nk[:, None] == 1) & (dk[None, :] == 3)
        valid = earlier | (same_layer_head_to_mlp & (not cfg.parallel_residual))
        arrays = [np.array(a, np.int32) for a in (node_layer, node_kind, node_head, dst_layer, dst_kind, dst_head)]
        return cls(L, H, K, cfg.parallel_residual, tuple(node_names), tuple(dst_names),
                   *map(_readonly, arrays), _readonly(valid))

    # Sizes -------------------------------------------------------------------------------
    @property
    def n_src(self) -> int:
        return len(self.node_names)

    @property
    def n_dst(self) -> int:
        return len(self.dst_names)

    @property
    def per_layer_dst(self) -> int:
        """Destinations per layer: H query + K key + K value + 1 MLP."""
        return self.n_heads + 2 * self.n_kv_heads + 1

    @property
    def n_edges(self) -> int:
        """Number of valid edges."""
        return int(self.valid.sum())

    # Index arithmetic (module docstring) -------------------------------------------------
    @property
    def input_src(self) -> int:
        return 0

    def head_src(self, layer: int, head: int) -> int:
        return 1 + layer * (self.n_heads + 1) + head

    def mlp_src(self, layer: int) -> int:
        return 1 + layer * (self.n_heads + 1) + self.n_heads

    def q_dst(self, layer: int, head: int) -> int:
        return layer * self.per_layer_dst + head

    def k_dst(self, layer: int, kv_head: int) -> int:
        return layer * self.per_layer_dst + self.n_heads + kv_head

    def v_dst(self, layer: int, kv_head: int) -> int:
        return layer * self.per_layer_dst + self.n_heads + self.n_kv_heads + kv_head

    def mlp_dst(self, layer: int) -> int:
        return layer * self.per_layer_dst + self.n_heads + 2 * self.n_kv_heads

    @property
    def logits_dst(self) -> int:
        return self.n_layers * self.per_layer_dst

    def src_index(self, name: str) -> int:
        try:
            return self.node_names.index(name)
        except ValueError:
            raise KeyError(f"No node {name!r}; nodes are 'input', 'a{{l}}.h{{h}}', 'm{{l}}' "
                           f"(l < {self.n_layers}, h < {self.n_heads}).") from None

    def dst_index(self, name: str) -> int:
        try:
            return self.dst_names.index(name)
        except ValueError:
            example = self.dst_names[self.k_dst(0, 0)]
            raise KeyError(f"No destination {name!r}; destinations look like 'a0.h0<q>', "
                           f"{example!r}, 'm0', 'logits'.") from None

    # Edges ---------------------------------------------------------------------------------
    def edge_index(self) -> np.ndarray:
        """[n_edges, 2] (src, dst) of the valid edges, row-major (by source, then destination)."""
        return np.argwhere(self.valid)

    def edge_names(self) -> list[str]:
        """`"{src}->{dst}"` for every valid edge, in `edge_index` order."""
        return [f"{self.node_names[s]}->{self.dst_names[d]}" for s, d in self.edge_index()]

    def edge_mask(self, names: list[str] | tuple[str, ...]) -> np.ndarray:
        """[n_src, n_dst] bool mask with the named edges (`"a0.h1->m2"`) set; refuses invalid ones."""
        mask = np.zeros((self.n_src, self.n_dst), bool)
        for name in names:
            src, sep, dst = name.partition("->")
            if not sep:
                raise ValueError(f"Edge {name!r} is not of the form 'src->dst' (e.g. 'a0.h1->m2').")
            s, d = self.src_index(src), self.dst_index(dst)
            if not self.valid[s, d]:
                raise ValueError(f"Edge {name!r} does not exist: {src} is not upstream of {dst}.")
            mask[s, d] = True
        return mask

    def node_totals(self, edge_scores: np.ndarray) -> np.ndarray:
        """[n_src] sum over each node's valid outgoing edges of `[..., n_src, n_dst]` scores."""
        return np.where(self.valid, np.asarray(edge_scores), 0).sum(-1)

    def top_edges(self, edge_scores: np.ndarray, k: int = 20, by_abs: bool = True) -> list[tuple[str, float]]:
        """The k valid edges with the largest |score| (or score), as (name, score)."""
        scores = np.asarray(edge_scores, np.float64)
        key = np.where(self.valid, np.abs(scores) if by_abs else scores, -np.inf).reshape(-1)
        order = np.argsort(-key, kind="stable")[:min(k, self.n_edges)]
        return [(f"{self.node_names[i // self.n_dst]}->{self.dst_names[i % self.n_dst]}",
                 float(scores.reshape(-1)[i])) for i in order]


def graph_of(cfg: ModelConfig) -> Graph:
    """The edge-attribution graph of `cfg` (same as `Graph.from_config`)."""
    return Graph.from_config(cfg)
