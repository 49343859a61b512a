"""CKA against Gram-matrix reference formulas (float64 numpy), invariances, and the layer grid."""

import numpy as np
import pytest

from jaxcirc.cka import cka_grid, linear_cka, token_activations, unbiased_cka


def reference_linear_cka(x, y):
    """Biased HSIC tr(K H L H) with linear kernels, from Gram matrices."""
    n = len(x)
    h = np.eye(n) - 1 / n
    k, l = h @ (x @ x.T) @ h, h @ (y @ y.T) @ h
    return np.sum(k * l) / np.sqrt(np.sum(k * k) * np.sum(l * l))


def reference_unbiased_hsic(k, l):
    """Song et al. (2012) unbiased HSIC estimator on raw (uncentred) Gram matrices."""
    n = len(k)
    k, l = k - np.diag(np.diag(k)), l - np.diag(np.diag(l))
    one = np.ones(n)
    return (np.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
            - 2 / (n - 2) * (one @ k @ l @ one)) / (n * (n - 3))


def reference_unbiased_cka(x, y):
    k, l = x @ x.T, y @ y.T
    return reference_unbiased_hsic(k, l) / np.sqrt(reference_unbiased_hsic(k, k) * reference_unbiased_hsic(l, l))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 12)) + 3.0  # not centred: the estimators must handle the offset
    y = np.tanh(x @ rng.normal(size=(12, 9))) + 0.3 * rng.normal(size=(60, 9))
    return x, y


def test_matches_reference_formulas(data):
    x, y = data
    assert linear_cka(x, y) == pytest.approx(reference_linear_cka(x, y), rel=1e-4)
    assert unbiased_cka(x, y) == pytest.approx(reference_unbiased_cka(x, y), rel=1e-3)
    # Fewer examples than features switches to Gram-space products: same numbers.
    wide_x, wide_y = x[:10] @ np.ones((12, 40)) * 0.1 + np.random.default_rng(1).normal(size=(10, 40)), y[:10]
    assert linear_cka(wide_x, wide_y) == pytest.approx(reference_linear_cka(wide_x, wide_y), rel=1e-4)
    assert unbiased_cka(wide_x, wide_y) == pytest.approx(reference_unbiased_cka(wide_x, wide_y), rel=1e-3)


def test_invariances(data):
    x, _ = data
    rng = np.random.default_rng(2)
    q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    for transformed in (x @ q, 7.5 * x, x + 4.0, 0.2 * x @ q - 1.0):
        assert linear_cka(x, transformed) == pytest.approx(1.0, abs=1e-5)
        assert unbiased_cka(x, transformed) == pytest.approx(1.0, abs=1e-4)
    # Not invariant to anisotropic scaling (a sanity check that the test can fail).
    assert linear_cka(x, x * np.linspace(0.1, 10, 12)) < 0.99


def test_independent_representations():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(300, 200)), rng.normal(size=(300, 200))
    assert abs(unbiased_cka(x, y)) < 0.03
    assert linear_cka(x, y) > 0.3  # the biased estimator is pulled up by many features per example


def test_grid_matches_pairwise(data):
    rng = np.random.default_rng(4)
    xs = rng.normal(size=(3, 40, 8))
    xs[1] = xs[0] @ np.linalg.qr(rng.normal(size=(8, 8)))[0]
    ys = np.stack([2.0 * xs[0] @ np.linalg.qr(rng.normal(size=(8, 8)))[0], rng.normal(size=(40, 8))])[..., :6]
    for unbiased, fn in ((False, reference_linear_cka), (True, reference_unbiased_cka)):
        grid = cka_grid(xs, ys, unbiased=unbiased)
        assert grid.shape == (3, 2)
        expected = np.array([[fn(a, b) for b in ys] for a in xs])
        np.testing.assert_allclose(grid, expected, atol=1e-5)
    # Layers 0 and 1 of xs are the same representation up to a rotation.
    np.testing.assert_allclose(grid[0], grid[1], atol=1e-5)


def test_token_activations_and_errors():
    act = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    mask = np.array([[True, True, False], [True, False, False]])
    rows = token_activations(act, mask)
    np.testing.assert_array_equal(rows, np.stack([act[0, 0], act[0, 1], act[1, 0]]))
    assert token_activations(np.zeros((2, 3, 2, 5))).shape == (6, 10)
    with pytest.raises(ValueError, match="same examples"):
        linear_cka(np.zeros((5, 2)), np.zeros((6, 2)))
    with pytest.raises(ValueError, match="at least 4"):
        unbiased_cka(np.ones((3, 2)), np.ones((3, 2)))
    assert np.isnan(linear_cka(np.ones((5, 2)), np.random.default_rng(0).normal(size=(5, 2))))
