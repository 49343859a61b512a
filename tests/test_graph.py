"""The edge-attribution graph: sizes, names, index arithmetic and which edges exist."""

import numpy as np
import pytest

from jaxcirc.graph import DST_KINDS, Graph, graph_of
from tiny_models import llama_gqa, neox


CONFIGS = {"llama_gqa": llama_gqa(), "neox_parallel": neox()}


def _parse_dst(name: str) -> tuple[int, str]:
    """(layer, kind) from a destination name, independently of the index tables."""
    if name == "logits":
        return 10**6, "logits"
    if name.startswith("m"):
        return int(name[1:]), "mlp"
    layer = int(name[1:name.index(".")])
    return layer, name[name.index("<") + 1:-1]


def _parse_src(name: str) -> tuple[int, str]:
    if name == "input":
        return -1, "input"
    if name.startswith("m"):
        return int(name[1:]), "mlp"
    return int(name[1:name.index(".")]), "head"


@pytest.mark.parametrize("name", CONFIGS)
def test_sizes_names_and_index_arithmetic(name):
    cfg = CONFIGS[name]
    g = Graph.from_config(cfg)
    L, H, K = cfg.n_layers, cfg.n_heads, cfg.n_kv_heads
    assert g.n_src == 1 + L * (H + 1)
    assert g.n_dst == L * (H + 2 * K + 1) + 1
    assert len(set(g.node_names)) == g.n_src and len(set(g.dst_names)) == g.n_dst
    assert g.valid.shape == (g.n_src, g.n_dst) and g.valid.dtype == bool
    kv = "kv" if K < H else "h"
    for l in range(L):
        for h in range(H):
            assert g.node_names[g.head_src(l, h)] == f"a{l}.h{h}"
            assert g.dst_names[g.q_dst(l, h)] == f"a{l}.h{h}<q>"
            assert g.src_index(f"a{l}.h{h}") == g.head_src(l, h)
        for j in range(K):
            assert g.dst_names[g.k_dst(l, j)] == f"a{l}.{kv}{j}<k>"
            assert g.dst_names[g.v_dst(l, j)] == f"a{l}.{kv}{j}<v>"
            assert g.dst_index(f"a{l}.{kv}{j}<v>") == g.v_dst(l, j)
        assert g.node_names[g.mlp_src(l)] == f"m{l}" and g.dst_names[g.mlp_dst(l)] == f"m{l}"
    assert g.node_names[g.input_src] == "input" and g.dst_names[g.logits_dst] == "logits"
    # The arrays agree with the names.
    for d, dst in enumerate(g.dst_names):
        layer, kind = _parse_dst(dst)
        assert DST_KINDS[g.dst_kind[d]] == kind
        assert g.dst_layer[d] == (L if kind == "logits" else layer)
    with pytest.raises(ValueError):
        g.valid[0, 0] = False  # read-only tables


@pytest.mark.parametrize("name", CONFIGS)
def test_validity_follows_the_residual_stream(name):
    cfg = CONFIGS[name]
    g = graph_of(cfg)
    for s, src in enumerate(g.node_names):
        s_layer, s_kind = _parse_src(src)
        for d, dst in enumerate(g.dst_names):
            d_layer, d_kind = _parse_dst(dst)
            expected = s_layer < d_layer or (
                s_layer == d_layer and s_kind == "head" and d_kind == "mlp" and not cfg.parallel_residual)
            assert g.valid[s, d] == expected, (src, dst)
    # Spot checks of the rules stated in the issue.
    assert g.valid[g.input_src].all()
    assert g.valid[:, g.logits_dst].all()
    assert not g.valid[g.head_src(1, 0), g.q_dst(1, 1)]          # no head -> head inside a layer
    assert not g.valid[g.mlp_src(0), g.mlp_dst(0)]
    assert g.valid[g.head_src(0, 0), g.mlp_dst(0)] == (not cfg.parallel_residual)
    L, H, K = cfg.n_layers, cfg.n_heads, cfg.n_kv_heads
    per_layer = H + 2 * K + 1
    n_edges = sum((1 + l * (H + 1)) * per_layer + (0 if cfg.parallel_residual else H) for l in range(L)) + g.n_src
    assert g.n_edges == n_edges == len(g.edge_names())


@pytest.mark.parametrize("name", CONFIGS)
def test_same_order_as_edge_patching_layout(name):
    edge_patch = pytest.importorskip("jaxcirc.edge_patch")
    cfg = CONFIGS[name]
    g, layout = Graph.from_config(cfg), edge_patch.EdgeLayout.canonical(cfg)
    assert (layout.n_src, layout.n_dst) == (g.n_src, g.n_dst)
    np.testing.assert_array_equal(layout.valid(), g.valid)
    for l in range(cfg.n_layers):
        assert list(layout.head_src[l]) == [g.head_src(l, h) for h in range(cfg.n_heads)]
        assert layout.mlp_src[l] == g.mlp_src(l) and layout.mlp_dst[l] == g.mlp_dst(l)
        assert list(layout.q_dst[l]) == [g.q_dst(l, h) for h in range(cfg.n_heads)]
        assert list(layout.k_dst[l]) == [g.k_dst(l, j) for j in range(cfg.n_kv_heads)]
        assert list(layout.v_dst[l]) == [g.v_dst(l, j) for j in range(cfg.n_kv_heads)]
    assert layout.logits_dst == g.logits_dst and layout.input_src == g.input_src


def test_edge_masks_totals_and_top_edges():
    g = graph_of(CONFIGS["llama_gqa"])
    mask = g.edge_mask(["a0.h1->a2.kv0<k>", "input->logits"])
    assert mask.sum() == 2 and mask[g.head_src(0, 1), g.k_dst(2, 0)] and mask[0, g.logits_dst]
    with pytest.raises(ValueError, match="not upstream"):
        g.edge_mask(["a2.h0->a1.h0<q>"])
    with pytest.raises(ValueError, match="src->dst"):
        g.edge_mask(["a0.h1"])
    with pytest.raises(KeyError, match="No node"):
        g.edge_mask(["a9.h0->logits"])
    with pytest.raises(KeyError, match="No destination"):
        g.dst_index("a0.h0<k>")  # under GQA key destinations are kv heads
    scores = np.arange(g.n_src * g.n_dst, dtype=float).reshape(g.n_src, g.n_dst)
    totals = g.node_totals(scores)
    assert totals[0] == scores[0].sum()
    assert totals[-1] == scores[-1, g.logits_dst]  # the last MLP only feeds the logits
    (best, value), = g.top_edges(-scores, k=1)
    assert best == f"m{2}->logits" and value == -scores[-1, g.logits_dst]
    names = g.edge_names()
    assert names[0] == f"input->{g.dst_names[0]}" and len(names) == len(g.edge_index())
