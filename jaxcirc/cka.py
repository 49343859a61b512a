"""Representation similarity: linear and unbiased CKA between activations of two models or checkpoints.

    x = token_activations(cache_a["blocks.3.hook_resid_post"], pairs.mask)     # [n, d1]
    y = token_activations(cache_b["blocks.5.hook_resid_post"], pairs.mask)     # [n, d2]
    linear_cka(x, y), unbiased_cka(x, y)
    grid = cka_grid(xs, ys, unbiased=True)      # xs [L1, n, d1], ys [L2, n, d2] -> [L1, L2]

Rows are examples (the same n inputs for both), columns features. Features are centred first.
With K = X X^T, L = Y Y^T:
  * linear CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with the biased HSIC tr(K H L H), which in
    feature space is ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) for centred X, Y (Kornblith et al. 2019).
  * unbiased CKA uses the unbiased HSIC estimator of Song et al. (2012) with zero-diagonal K~, L~:
        HSIC_1 = [tr(K~ L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n (n-3)),
    evaluated in feature space (no n x n Gram matrix): for centred X with row norms a_i = ||x_i||^2,
    A = sum a_i (and b, B for Y), n(n-3) HSIC_1 = ||Y^T X||_F^2 - n/(n-2) a.b + A B / ((n-1)(n-2)).
    It needs n >= 4; independent representations give values near 0 (the biased one does not when
    features are many relative to n). It can be slightly negative.
Both are invariant to orthogonal transforms and isotropic scaling of either side.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def _centre(x: Array) -> Array:
    return x - x.mean(axis=0, keepdims=True)


def _check_pair(x: Any, y: Any, unbiased: bool) -> tuple[Array, Array]:
    x, y = jnp.asarray(x), jnp.asarray(y)
    if x.ndim != 2 or y.ndim != 2:
        raise ValueError(f"CKA takes activations [n, d]; got shapes {x.shape} and {y.shape} "
                         "(flatten batch and position first, e.g. with token_activations).")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"Both activations need the same examples (rows): {x.shape[0]} vs {y.shape[0]}.")
    if unbiased and x.shape[0] < 4:
        raise ValueError(f"Unbiased CKA needs at least 4 examples, got {x.shape[0]}.")
    return x, y


def _stats(x: Array) -> tuple[Array, Array]:
    """Centred x and its row squared norms [n]."""
    x = _centre(x.astype(jnp.float32))
    return x, (x * x).sum(-1)


def _cross(x: Array, y: Array) -> Array:
    """||Y^T X||_F^2 via the smaller of the feature-space and Gram-space products."""
    n, d1, d2 = x.shape[0], x.shape[1], y.shape[1]
    if n * n < d1 * d2:
        return jnp.sum((x @ x.T) * (y @ y.T))
    return jnp.sum((x.T @ y) ** 2)


def _hsic(x: Array, a: Array, y: Array, b: Array, unbiased: bool) -> Array:
    """HSIC of centred x, y up to a factor that cancels in CKA."""
    cross = _cross(x, y)
    if not unbiased:
        return cross
    n = x.shape[0]
    return cross - n / (n - 2) * jnp.dot(a, b) + a.sum() * b.sum() / ((n - 1) * (n - 2))


def _cka(x: Array, y: Array, unbiased: bool) -> Array:
    x, a = _stats(x)
    y, b = _stats(y)
    xy, xx, yy = _hsic(x, a, y, b, unbiased), _hsic(x, a, x, a, unbiased), _hsic(y, b, y, b, unbiased)
    denominator = xx * yy
    return jnp.where(denominator > 0, xy / jnp.sqrt(jnp.where(denominator > 0, denominator, 1.0)), jnp.nan)


_cka_jit = jax.jit(_cka, static_argnames=("unbiased",))


def linear_cka(x: Any, y: Any) -> float:
    """Linear CKA between x [n, d1] and y [n, d2] (NaN if either side is constant)."""
    x, y = _check_pair(x, y, False)
    return float(_cka_jit(x, y, unbiased=False))


def unbiased_cka(x: Any, y: Any) -> float:
    """Unbiased (debiased-HSIC) linear CKA between x [n, d1] and y [n, d2], n >= 4."""
    x, y = _check_pair(x, y, True)
    return float(_cka_jit(x, y, unbiased=True))


def _grid(xs: Array, ys: Array, unbiased: bool) -> Array:
    xs, a = jax.vmap(_stats)(xs)
    ys, b = jax.vmap(_stats)(ys)
    self_x = jax.vmap(lambda x, ax: _hsic(x, ax, x, ax, unbiased))(xs, a)
    self_y = jax.vmap(lambda y, by: _hsic(y, by, y, by, unbiased))(ys, b)

    def row(args):
        x, ax = args  # one layer of xs against every layer of ys (vmapped); rows run in sequence
        return jax.vmap(lambda y, by: _hsic(x, ax, y, by, unbiased))(ys, b)

    cross = jax.lax.map(row, (xs, a))
    denominator = self_x[:, None] * self_y[None, :]
    return jnp.where(denominator > 0, cross / jnp.sqrt(jnp.where(denominator > 0, denominator, 1.0)), jnp.nan)


_grid_jit = jax.jit(_grid, static_argnames=("unbiased",))


def cka_grid(xs: Any, ys: Any, unbiased: bool = False) -> np.ndarray:
    """[L1, L2] CKA between every layer of xs [L1, n, d1] and every layer of ys [L2, n, d2]
    (one compiled program: vmapped over ys, mapped over xs to bound memory)."""
    xs, ys = jnp.asarray(xs), jnp.asarray(ys)
    if xs.ndim != 3 or ys.ndim != 3:
        raise ValueError(f"cka_grid takes stacked activations [layers, n, d]; got {xs.shape} and {ys.shape}.")
    _check_pair(xs[0], ys[0], unbiased)
    return np.asarray(_grid_jit(xs, ys, unbiased=unbiased), np.float64)


def token_activations(activation: Any, mask: Any = None) -> np.ndarray:
    """[n, features] rows from activations [batch, pos, ...] (trailing dims flattened), keeping the
    positions where mask [batch, pos] is true (all when mask is None)."""
    act = np.asarray(activation)
    if act.ndim < 3:
        raise ValueError(f"Expected activations [batch, pos, ...], got shape {act.shape}.")
    act = act.reshape(act.shape[0], act.shape[1], -1)
    if mask is None:
        return act.reshape(-1, act.shape[-1])
    mask = np.asarray(mask, bool)
    if mask.shape != act.shape[:2]:
        raise ValueError(f"mask has shape {mask.shape}; expected the activations' [batch, pos] {act.shape[:2]}.")
    return act[mask]
