"""Spectral comparison of circuit graphs (experiments.md A.9), many circuits in one vmapped eigh.

    cmp = compare_spectra([circuit_a, circuit_b, circuit_c], k=16)
    cmp.similarity          # [3, 3] 1 / (1 + ||top-k eigenvalues_i - top-k eigenvalues_j||_2)
    cmp.density_distance    # [3, 3] size-independent: L2 between kernel-smoothed spectral densities
    cmp.heat_distance       # [3, 3] size-independent: L2 between heat traces

Graphs: the node-level circuit graph (a head's q/k/v edges collapse onto the head), weight |score|
summed over ports ("abs") or 1 per connected node pair ("binary"). Weights must be >= 0.

Laplacians (both have eigenvalues in [0, 2]):
  * "normalized": S = (A + A^T) / 2, L = D^-1/2 (D - S) D^-1/2 with D = diag(row sums of S). An
    isolated node has D = 0; its row of L is zero (eigenvalue 0), so the multiplicity of 0 is the
    number of connected components counting isolated nodes. That is also why padding a graph with
    isolated nodes zero-pads its spectrum: many graphs of different sizes share one padded batch.
  * "magnetic" (keeps direction): H = S * exp(i 2 pi q (1[A_uv > 0] - 1[A_vu > 0])),
    L = D^-1/2 (D - H) D^-1/2, Hermitian. Direction enters only through the phase (weights stay in
    the magnitude); q in [0, 1/4] (q = 0 is the normalized Laplacian; 1/4 separates directions most).

Comparisons:
  * top-k: the k largest eigenvalues, descending, zero-padded when a graph has fewer than k nodes;
    distance d = L2 between them, similarity 1 / (1 + d).
  * spectral density rho(x) = (1/n) sum_i N(x; lambda_i, bandwidth^2) on a grid over [0, 2] (n =
    real nodes; padding eigenvalues are subtracted exactly), distance = sqrt(trapezoid of (rho_a -
    rho_b)^2).
  * heat trace h(t) = (1/n) sum_i exp(-t lambda_i) on a t grid, distance = sqrt(mean over the grid of
    (h_a - h_b)^2).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxcirc.circuit import Circuit

Array = jax.Array
Kind = Literal["normalized", "magnetic"]

DEFAULT_GRID = np.linspace(0.0, 2.0, 201)
DEFAULT_TIMES = np.geomspace(0.1, 30.0, 40)


def _symmetric_part(adjacency: Array) -> Array:
    return (adjacency + jnp.swapaxes(adjacency, -1, -2)) / 2


def _inverse_sqrt_degree(weights: Array) -> Array:
    degree = weights.sum(-1)
    return jnp.where(degree > 0, 1.0 / jnp.sqrt(jnp.where(degree > 0, degree, 1.0)), 0.0), degree


def normalized_laplacian(adjacency: Array) -> Array:
    """[..., n, n] L = D^-1/2 (D - S) D^-1/2 of the symmetrised graph S = (A + A^T) / 2 (A >= 0)."""
    adjacency = jnp.asarray(adjacency)
    sym = _symmetric_part(adjacency)
    inv, degree = _inverse_sqrt_degree(sym)
    combined = -sym + degree[..., :, None] * jnp.eye(sym.shape[-1], dtype=sym.dtype)
    return inv[..., :, None] * combined * inv[..., None, :]


def magnetic_laplacian(adjacency: Array, q: float = 0.25) -> Array:
    """[..., n, n] complex Hermitian magnetic Laplacian with phase parameter q (A >= 0, directed)."""
    adjacency = jnp.asarray(adjacency)
    sym = _symmetric_part(adjacency)
    forward = (adjacency > 0).astype(adjacency.dtype)
    direction = forward - jnp.swapaxes(forward, -1, -2)
    hermitian = sym * jnp.exp(1j * 2 * jnp.pi * q * direction)
    inv, degree = _inverse_sqrt_degree(sym)
    combined = -hermitian + degree[..., :, None] * jnp.eye(sym.shape[-1], dtype=sym.dtype)
    return inv[..., :, None] * combined * inv[..., None, :]


@partial(jax.jit, static_argnames=("kind",))
def laplacian_eigenvalues(adjacency: Array, kind: Kind = "normalized", q: float = 0.25) -> Array:
    """[batch, n] eigenvalues, descending, of the Laplacians of adjacency [batch, n, n] (one vmapped eigh)."""
    laplacian = normalized_laplacian(adjacency) if kind == "normalized" else magnetic_laplacian(adjacency, q)
    values = jax.vmap(lambda m: jnp.linalg.eigh(m)[0])(laplacian)
    return jnp.flip(values, axis=-1)


def padded_adjacency(circuits: Sequence[Circuit], weight: Literal["abs", "binary"] = "abs",
                     size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(A [n_circuits, N, N] float32, n_nodes [n_circuits]) node-level adjacency matrices padded with
    isolated nodes to N = max(size, largest circuit)."""
    if weight not in ("abs", "binary"):
        raise ValueError(f"Spectra need non-negative weights: weight must be 'abs' or 'binary', got {weight!r}.")
    if not circuits:
        raise ValueError("No circuits given.")
    mats = []
    for i, c in enumerate(circuits):
        if not c.edges:
            raise ValueError(f"Circuit {i} has no edges; its graph has no spectrum to compare.")
        _, a = c.node_adjacency(weight)
        mats.append(a if weight == "abs" else (a > 0).astype(np.float64))
    n = np.array([m.shape[0] for m in mats])
    width = max(int(n.max()), size or 0)
    out = np.zeros((len(mats), width, width), np.float32)
    for i, m in enumerate(mats):
        out[i, :m.shape[0], :m.shape[0]] = m
    return out, n


@dataclasses.dataclass(frozen=True)
class Spectra:
    """Laplacian eigenvalues of padded graphs: eigenvalues [n_graphs, N] descending (padding gives
    zeros at the end), n_nodes [n_graphs] real node counts, and how they were computed."""

    eigenvalues: np.ndarray
    n_nodes: np.ndarray
    kind: str
    q: float | None
    weight: str

    def top_k(self, k: int) -> np.ndarray:
        return top_k_eigenvalues(self.eigenvalues, k)


def spectra(circuits: Sequence[Circuit], kind: Kind = "normalized", q: float = 0.25,
            weight: Literal["abs", "binary"] = "abs") -> Spectra:
    """Laplacian spectra of many circuits at once (padded to the largest, one vmapped eigh)."""
    if kind not in ("normalized", "magnetic"):
        raise ValueError(f"kind must be 'normalized' or 'magnetic', got {kind!r}.")
    adjacency, n = padded_adjacency(circuits, weight)
    values = np.asarray(laplacian_eigenvalues(jnp.asarray(adjacency), kind=kind, q=q), np.float64)
    return Spectra(values, n, kind, q if kind == "magnetic" else None, weight)


def top_k_eigenvalues(eigenvalues: Any, k: int) -> np.ndarray:
    """[n_graphs, k] the k largest eigenvalues of each row (descending input), zero-padded."""
    values = np.asarray(eigenvalues, np.float64)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}.")
    values = -np.sort(-values, axis=-1)
    if values.shape[-1] < k:
        values = np.concatenate([values, np.zeros(values.shape[:-1] + (k - values.shape[-1],))], axis=-1)
    return values[..., :k]


def pairwise_l2(rows: Any) -> np.ndarray:
    """[n, n] Euclidean distances between the rows of [n, m]."""
    rows = np.asarray(rows, np.float64)
    return np.sqrt(np.maximum(((rows[:, None] - rows[None]) ** 2).sum(-1), 0.0))


def similarity(distance: Any) -> np.ndarray:
    """1 / (1 + d)."""
    return 1.0 / (1.0 + np.asarray(distance, np.float64))


def spectral_density(eigenvalues: Any, n_nodes: Any, grid: Any = DEFAULT_GRID, bandwidth: float = 0.05) -> np.ndarray:
    """[n_graphs, G] Gaussian-kernel density of each spectrum on `grid`, padding eigenvalues removed."""
    if bandwidth <= 0:
        raise ValueError(f"bandwidth must be > 0, got {bandwidth}.")
    values, n = np.asarray(eigenvalues, np.float64), np.asarray(n_nodes, np.float64)
    grid = np.asarray(grid, np.float64)
    kernel = lambda x: np.exp(-0.5 * (x / bandwidth) ** 2) / (bandwidth * np.sqrt(2 * np.pi))  # noqa: E731
    total = kernel(grid[None, None, :] - values[:, :, None]).sum(1)
    padding = values.shape[-1] - n
    return (total - padding[:, None] * kernel(grid)[None]) / n[:, None]


def heat_trace(eigenvalues: Any, n_nodes: Any, times: Any = DEFAULT_TIMES) -> np.ndarray:
    """[n_graphs, T] h(t) = (1/n) sum_i exp(-t lambda_i) over real eigenvalues."""
    values, n = np.asarray(eigenvalues, np.float64), np.asarray(n_nodes, np.float64)
    times = np.asarray(times, np.float64)
    total = np.exp(-times[None, None, :] * values[:, :, None]).sum(1)
    padding = values.shape[-1] - n
    return (total - padding[:, None]) / n[:, None]


def curve_distances(curves: Any, grid: Any | None = None) -> np.ndarray:
    """[n, n] L2 distances between curves [n, G]: sqrt(trapezoid over grid of squared difference),
    or sqrt(mean squared difference) without a grid."""
    curves = np.asarray(curves, np.float64)
    diff2 = (curves[:, None] - curves[None]) ** 2
    if grid is None:
        return np.sqrt(diff2.mean(-1))
    x = np.asarray(grid, np.float64)
    return np.sqrt(((x[1:] - x[:-1]) * (diff2[..., 1:] + diff2[..., :-1]) / 2).sum(-1))


@dataclasses.dataclass(frozen=True)
class SpectralComparison:
    """Pairwise comparison of circuits. top_k [n, k], distance / similarity [n, n] (top-k L2 and
    1/(1+d)), density [n, G] on grid, density_distance [n, n], heat [n, T] on times, heat_distance
    [n, n], n_nodes [n], and the settings."""

    top_k: np.ndarray
    distance: np.ndarray
    similarity: np.ndarray
    density: np.ndarray
    density_distance: np.ndarray
    heat: np.ndarray
    heat_distance: np.ndarray
    n_nodes: np.ndarray
    grid: np.ndarray
    times: np.ndarray
    settings: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in out.items()}


def compare_spectra(circuits: Sequence[Circuit], k: int = 16, kind: Kind = "normalized", q: float = 0.25,
                    weight: Literal["abs", "binary"] = "abs", bandwidth: float = 0.05,
                    grid: Any = DEFAULT_GRID, times: Any = DEFAULT_TIMES) -> SpectralComparison:
    """Top-k spectral distance/similarity plus density and heat-trace distances between circuits.
    k = 16 follows A.9's main text (its appendix says 20)."""
    spec = spectra(circuits, kind, q, weight)
    top = spec.top_k(k)
    distance = pairwise_l2(top)
    density = spectral_density(spec.eigenvalues, spec.n_nodes, grid, bandwidth)
    heat = heat_trace(spec.eigenvalues, spec.n_nodes, times)
    settings = {"k": k, "laplacian": kind, "q": spec.q, "weight": weight, "bandwidth": bandwidth,
                "similarity": "1/(1+d), d = L2 of top-k eigenvalues (zero-padded)"}
    return SpectralComparison(top, distance, similarity(distance), density, curve_distances(density, grid),
                              heat, curve_distances(heat), spec.n_nodes, np.asarray(grid), np.asarray(times),
                              settings)
