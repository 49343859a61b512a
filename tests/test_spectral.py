"""Spectra of hand-built graphs against closed forms; padding, direction and size independence."""

import numpy as np
import pytest

from jaxcirc.circuit import Circuit, Edge, Node
from jaxcirc.spectral import (compare_spectra, curve_distances, heat_trace, laplacian_eigenvalues,
                              magnetic_laplacian, normalized_laplacian, padded_adjacency, spectra,
                              spectral_density, top_k_eigenvalues)


def path_graph(n, directed=False):
    a = np.zeros((n, n))
    for i in range(n - 1):
        a[i, i + 1] = 1
    return a if directed else a + a.T


def cycle_graph(n, directed=False):
    a = path_graph(n, directed=True)
    a[n - 1, 0] = 1
    return a if directed else a + a.T


def star_graph(n):
    a = np.zeros((n, n))
    a[0, 1:] = a[1:, 0] = 1
    return a


def complete_graph(n):
    return np.ones((n, n)) - np.eye(n)


def eig(a, kind="normalized", q=0.25):
    return np.asarray(laplacian_eigenvalues(np.asarray(a, np.float32)[None], kind=kind, q=q))[0]


def closed_forms():
    n = 7
    return {
        "path": (path_graph(n), 1 - np.cos(np.pi * np.arange(n) / (n - 1))),
        "cycle": (cycle_graph(n), 1 - np.cos(2 * np.pi * np.arange(n) / n)),
        "star": (star_graph(n), np.array([0.0] + [1.0] * (n - 2) + [2.0])),
        "complete": (complete_graph(n), np.array([0.0] + [n / (n - 1)] * (n - 1))),
    }


@pytest.mark.parametrize("name", ["path", "cycle", "star", "complete"])
def test_normalized_laplacian_closed_forms(name):
    adjacency, expected = closed_forms()[name]
    np.testing.assert_allclose(eig(adjacency), np.sort(expected)[::-1], atol=2e-6)
    # Direction and scale do not matter to the symmetrised, normalised Laplacian.
    np.testing.assert_allclose(eig(3.0 * np.triu(adjacency)), np.sort(expected)[::-1], atol=2e-6)


def test_all_closed_forms_in_one_vmapped_batch_with_padding():
    graphs = closed_forms()
    size = 10
    batch = np.zeros((len(graphs), size, size), np.float32)
    for i, (a, _) in enumerate(graphs.values()):
        batch[i, :len(a), :len(a)] = a
    values = np.asarray(laplacian_eigenvalues(batch))
    for row, (a, expected) in zip(values, graphs.values()):
        padded = np.concatenate([expected, np.zeros(size - len(a))])  # isolated padding nodes -> 0
        np.testing.assert_allclose(row, np.sort(padded)[::-1], atol=2e-6)


def test_weighted_laplacian_matches_numpy_and_isolated_nodes():
    rng = np.random.default_rng(0)
    a = np.triu(rng.uniform(0.1, 2.0, (6, 6)) * (rng.uniform(size=(6, 6)) < 0.6), 1)
    a[:, 5] = a[5, :] = 0  # node 5 isolated
    s = (a + a.T) / 2
    d = s.sum(1)
    inv = np.where(d > 0, 1 / np.sqrt(np.where(d > 0, d, 1)), 0)
    reference = np.diag(inv) @ (np.diag(d) - s) @ np.diag(inv)
    np.testing.assert_allclose(np.asarray(normalized_laplacian(a.astype(np.float32))), reference, atol=1e-6)
    np.testing.assert_allclose(eig(a), np.sort(np.linalg.eigvalsh(reference))[::-1], atol=2e-6)
    assert abs(reference[5, 5]) == 0  # isolated node: eigenvalue 0, no division by zero


@pytest.mark.parametrize("q", [0.0, 0.1, 0.25])
def test_magnetic_laplacian_of_directed_cycle(q):
    n = 6
    expected = 1 - np.cos(2 * np.pi * q + 2 * np.pi * np.arange(n) / n)
    lap = np.asarray(magnetic_laplacian(cycle_graph(n, directed=True).astype(np.float32), q))
    np.testing.assert_allclose(lap, lap.conj().T, atol=1e-7)  # Hermitian
    np.testing.assert_allclose(eig(cycle_graph(n, directed=True), "magnetic", q), np.sort(expected)[::-1], atol=3e-6)


def test_magnetic_laplacian_sees_direction_only_where_it_matters():
    # A tree has no cycles, so the phases gauge away: same spectrum as the undirected graph.
    tree = path_graph(5, directed=True)
    np.testing.assert_allclose(eig(tree, "magnetic", 0.25), eig(tree), atol=2e-6)
    # A directed cycle and the same cycle with one edge reversed differ; the normalized Laplacian cannot tell.
    cycle = cycle_graph(4, directed=True)
    flipped = cycle.copy()
    flipped[3, 0], flipped[0, 3] = 0, 1
    np.testing.assert_allclose(eig(cycle), eig(flipped), atol=2e-6)
    assert np.abs(eig(cycle, "magnetic") - eig(flipped, "magnetic")).max() > 0.5


def test_top_k_is_zero_padded():
    values = np.array([[1.5, 1.0, 0.5]])
    np.testing.assert_array_equal(top_k_eigenvalues(values, 5), [[1.5, 1.0, 0.5, 0.0, 0.0]])
    np.testing.assert_array_equal(top_k_eigenvalues(values, 2), [[1.5, 1.0]])


def test_density_and_heat_trace_are_size_independent():
    cycle = cycle_graph(6)
    twice = np.zeros((12, 12))
    twice[:6, :6] = twice[6:, 6:] = cycle  # two disjoint copies: same spectrum, each eigenvalue twice
    batch = np.zeros((3, 14, 14), np.float32)
    batch[0, :6, :6], batch[1, :12, :12], batch[2, :6, :6] = cycle, twice, path_graph(6)
    n = np.array([6, 12, 6])
    values = np.asarray(laplacian_eigenvalues(batch))
    grid = np.linspace(0, 2, 401)
    density = spectral_density(values, n, grid, bandwidth=0.05)
    heat = heat_trace(values, n, np.geomspace(0.1, 30, 20))
    np.testing.assert_allclose(density[0], density[1], atol=1e-4)
    np.testing.assert_allclose(heat[0], heat[1], atol=1e-6)
    assert np.abs(top_k_eigenvalues(values[0:1], 12) - top_k_eigenvalues(values[1:2], 12)).max() > 0.5
    # Padding is removed exactly: the density of the unpadded cycle is the same.
    alone = np.asarray(laplacian_eigenvalues(cycle[None].astype(np.float32)))
    np.testing.assert_allclose(spectral_density(alone, [6], grid, 0.05)[0], density[0], atol=1e-4)
    # Reference density and heat trace from the closed-form eigenvalues.
    lam = 1 - np.cos(2 * np.pi * np.arange(6) / 6)
    ref = np.exp(-0.5 * ((grid[:, None] - lam) / 0.05) ** 2).sum(1) / (0.05 * np.sqrt(2 * np.pi)) / 6
    np.testing.assert_allclose(density[0], ref, atol=1e-3)
    np.testing.assert_allclose(heat[0], np.exp(-np.geomspace(0.1, 30, 20)[:, None] * lam).mean(1), atol=1e-5)
    distances = curve_distances(density, grid)
    assert distances[0, 1] < 1e-3 and distances[0, 2] > 0.1


def _circuit(edges, n_layers=2):
    """A circuit from (src, dst) name pairs with scores; nodes inferred from names."""
    def node(name):
        if name in ("input", "logits"):
            return Node(name, name, -1 if name == "input" else n_layers)
        if name.startswith("m"):
            return Node(name, "mlp", int(name[1:]))
        layer, head = name[1:].split(".h")
        return Node(name, "attn", int(layer), int(head))
    names = {n for e in edges for n in e[:2]}
    nodes = tuple(sorted((node(n) for n in names), key=lambda n: n.sort_key))
    return Circuit(nodes, tuple(Edge(s, d, "q" if d.startswith("a") else "", w) for s, d, w in edges),
                   n_layers, 2, 2)


def test_circuits_compare_in_one_batch():
    chain = _circuit([("input", "a0.h0", 1.0), ("a0.h0", "m0", 2.0), ("m0", "logits", -1.0)])
    fan = _circuit([("input", "a0.h0", 1.0), ("input", "a0.h1", 1.0), ("input", "m1", 1.0),
                    ("a0.h0", "logits", 0.5), ("a0.h1", "logits", 0.5), ("m1", "logits", 1.0)])
    adjacency, n = padded_adjacency([chain, fan])
    assert adjacency.shape == (2, 5, 5) and n.tolist() == [4, 5]
    # The unweighted chain is a path graph on 4 nodes.
    spec = spectra([chain, fan], weight="binary")
    np.testing.assert_allclose(spec.eigenvalues[0, :4], np.sort(1 - np.cos(np.pi * np.arange(4) / 3))[::-1], atol=2e-6)
    assert abs(spec.eigenvalues[0, 4]) < 1e-6
    result = compare_spectra([chain, fan, chain], k=4)
    np.testing.assert_allclose(result.distance, result.distance.T)
    np.testing.assert_allclose(np.diag(result.similarity), 1.0)
    assert result.distance[0, 2] == 0 and result.distance[0, 1] > 0
    assert result.similarity[0, 1] == pytest.approx(1 / (1 + result.distance[0, 1]))
    assert result.settings["k"] == 4 and result.top_k.shape == (3, 4)
    magnetic = compare_spectra([chain, fan], k=4, kind="magnetic", q=0.2)
    assert magnetic.settings["q"] == 0.2
    with pytest.raises(ValueError, match="no edges"):
        spectra([_circuit([]), chain])
