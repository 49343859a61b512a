"""Emergence: per-pair EAP-IG, node sets, Jaccard, consolidation time, change-point fits and their rule."""

from __future__ import annotations

import numpy as np
import pytest

from jaxcirc.circuit import Circuit
from jaxcirc.eap import eap_ig
from jaxcirc.edge_patch import EdgeLayout
from jaxcirc.emergence import (NodeIndex, analyse_role, bootstrap_counts, chance_jaccard, checkpoint_nodes,
                               classify_trajectory, consolidation_time, fit_change_point, jaccard_trajectories,
                               log_step, per_pair_edge_scores, top_k_edges, top_k_nodes)
from jaxcirc.models.config import ModelConfig, RopeConfig
from jaxcirc.models.transformer import init_params
from jaxcirc.pairs import from_tokens

GQA = ModelConfig(family="llama", n_layers=2, d_model=16, n_heads=4, n_kv_heads=2, d_head=4, d_mlp=32, d_vocab=30,
                  n_ctx=16, norm="rmsnorm", activation="silu", gated_mlp=True, positional="rotary",
                  rope=RopeConfig(theta=10000., rotary_dim=4), tied_embeddings=False, initializer_range=0.3)
STEPS = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000, 2000, 4000]


# ----------------------------------------------------------------------------- per-pair EAP-IG


@pytest.fixture(scope="module")
def tiny():
    params = init_params(GQA, seed=3)
    rng = np.random.default_rng(0)
    clean = rng.integers(1, GQA.d_vocab, size=(5, 6))
    corrupt = clean.copy()
    corrupt[:, -1] = rng.integers(1, GQA.d_vocab, size=5)
    pairs = from_tokens(clean, corrupt, rng.integers(0, GQA.d_vocab, 5), rng.integers(0, GQA.d_vocab, 5))
    return params, pairs


def test_per_pair_scores_average_to_eap_ig(tiny):
    params, pairs = tiny
    per_pair = per_pair_edge_scores(GQA, params, pairs, steps=3, metric="logprob", batch_size=2)
    assert per_pair.shape == (5,) + EdgeLayout.canonical(GQA).valid().shape
    mean = eap_ig(GQA, params, pairs, steps=3, metric="logprob", batch_size=1).scores  # one compilation
    np.testing.assert_allclose(per_pair.mean(0), np.asarray(mean), rtol=1e-4, atol=1e-6)
    single = eap_ig(GQA, params, pairs[3], steps=3, metric="logprob").scores
    np.testing.assert_allclose(per_pair[3], np.asarray(single), rtol=1e-4, atol=1e-6)
    assert not per_pair[:, ~EdgeLayout.canonical(GQA).valid()].any()


# ----------------------------------------------------------------------------- node sets


def test_top_k_nodes_match_circuits():
    layout = EdgeLayout.canonical(GQA)
    index = NodeIndex.from_layout(layout)
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(2, 3, layout.n_src, layout.n_dst))
    for k in (1, 7, 40, 10_000):
        presence = top_k_nodes(scores, index, k)
        edges = top_k_edges(scores, index, k)
        assert presence.shape == (2, 3, len(index.names))
        for i in range(2):
            for j in range(3):
                circuit = Circuit.from_scores(scores[i, j], layout, top_k=k)
                assert set(np.array(index.names)[presence[i, j]]) == set(circuit.node_names)
                assert edges[i, j].sum() == len(circuit)
    assert "a0.kv1" in index.names and "logits" in index.names


def test_jaccard_trajectories():
    presence = np.array([[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1]], bool)
    prev, final = jaccard_trajectories(presence)
    assert np.isnan(prev[0])
    np.testing.assert_allclose(prev[1:], [2 / 3, 2 / 4])
    np.testing.assert_allclose(final, [1 / 4, 2 / 4, 1.0])


def test_checkpoint_nodes_bootstrap_uses_resampled_means():
    layout = EdgeLayout.canonical(GQA)
    index = NodeIndex.from_layout(layout)
    rng = np.random.default_rng(2)
    scores = rng.normal(size=(6, layout.n_src, layout.n_dst)).astype(np.float32)
    counts = bootstrap_counts(6, 4, seed=0)
    assert counts.shape == (4, 6) and (counts.sum(1) == 6).all()
    mean, nodes, boot = checkpoint_nodes(scores, counts, index, 10)
    np.testing.assert_allclose(mean, scores.mean(0), rtol=1e-6)
    for b in range(4):
        resampled = np.repeat(scores, counts[b].astype(int), axis=0).mean(0)
        assert (boot[b] == top_k_nodes(resampled, index, 10)).all()


# ----------------------------------------------------------------------------- consolidation


@pytest.mark.parametrize("jaccard, hold, expected", [
    ([0.2, 0.7, 0.5, 0.65, 0.8, 1.0], 2, 8),            # 0.7 alone does not hold; 0.65, 0.8 does
    ([0.6, 0.6, 0.1, 0.9, 0.9, 1.0], 2, 0),             # the threshold itself counts
    ([0.1, 0.2, 0.3, 0.4, 0.5, 1.0], 2, None),          # only the last point: the window leaves the series
    ([np.nan, 0.9, 0.9, 0.2, 0.9, 0.9], 2, 1),          # NaN (no previous checkpoint) fails
    ([0.2, 0.7, 0.7, 0.1, 0.7, 0.7], 3, None),
    ([0.2, 0.7, 0.7, 0.7, 0.1, 0.7], 3, 1),
])
def test_consolidation_time(jaccard, hold, expected):
    assert consolidation_time([0, 1, 2, 8, 16, 32], jaccard, threshold=0.6, hold=hold) == expected


def test_consolidation_time_checks_lengths():
    with pytest.raises(ValueError, match="steps"):
        consolidation_time([0, 1], [0.5])


# ----------------------------------------------------------------------------- change points


def _per_pair_trajectories(mean: np.ndarray, n_pairs: int, noise: float, seed: int) -> np.ndarray:
    """[n_pairs, T] noisy per-pair values around a mean trajectory."""
    rng = np.random.default_rng(seed)
    return mean[None] + rng.normal(0, noise, size=(n_pairs, mean.size))


def _bootstrap(per_pair: np.ndarray, n_boot: int = 200, seed: int = 0) -> np.ndarray:
    counts = bootstrap_counts(per_pair.shape[0], n_boot, seed)
    return counts @ per_pair / per_pair.shape[0]


def test_change_point_recovers_a_planted_step():
    x = log_step(STEPS)
    planted = 7                                             # the jump happens between STEPS[6] and STEPS[7]
    mean = np.where(np.arange(len(STEPS)) >= planted, 0.9, 0.2)
    per_pair = _per_pair_trajectories(mean, 40, 0.1, seed=0)
    y = per_pair.mean(0)
    fit = fit_change_point(x, y)
    assert fit.split == planted
    assert fit.breakpoint == pytest.approx((x[planted - 1] + x[planted]) / 2)
    assert fit.jump == pytest.approx(0.7, abs=0.1)
    assert fit.sse < fit.sse_linear
    result = classify_trajectory(STEPS, y, _bootstrap(per_pair))
    assert result.classification == "phase transition"
    lo, hi = result.ci
    assert lo <= fit.breakpoint <= hi
    assert STEPS[planted - 1] <= result.breakpoint_step <= STEPS[planted]


def test_change_point_says_gradual_for_a_linear_trend():
    x = log_step(STEPS)
    mean = 0.1 + 0.8 * (x - x[0]) / (x[-1] - x[0])
    per_pair = _per_pair_trajectories(mean, 40, 0.1, seed=1)
    result = classify_trajectory(STEPS, per_pair.mean(0), _bootstrap(per_pair))
    assert result.classification == "gradual refinement"
    assert result.jump_share < 0.5 or result.relative_ci_width > 0.25


def test_exact_line_has_no_jump():
    x = np.arange(10.0)
    fit = fit_change_point(x, 2 * x + 1)
    assert abs(fit.jump) < 1e-9 and fit.slope_left == pytest.approx(2) and fit.slope_right == pytest.approx(2)


def test_flat_and_short_trajectories():
    assert classify_trajectory(STEPS, np.full(len(STEPS), 0.5)).classification == "flat"
    assert classify_trajectory([0, 1, 2, 4], [0.0, 0.1, 0.9, 1.0]).classification == "too few checkpoints"
    with pytest.raises(ValueError, match="at least 6"):
        fit_change_point(np.arange(4.0), np.zeros(4))


def test_analyse_role_on_constructed_sets():
    T, N, n = 8, 10, 5
    steps = [0, 1, 2, 4, 8, 16, 32, 64]
    presence = np.zeros((T, N), bool)
    presence[:, :3] = True
    presence[4:, 3:6] = True                                # the node set settles at checkpoint 4
    boot = np.repeat(presence[:, None], 3, axis=1)
    correct = np.zeros((T, n), bool)
    correct[5:] = True
    logprob = np.zeros((T, n))
    em = analyse_role(steps, presence, boot, correct, logprob, bootstrap_counts(n, 3, 0), n_valid=100, top_k=20)
    np.testing.assert_allclose(em.jaccard_final, [0.5] * 4 + [1.0] * 4)
    assert em.t_cons_final == 8 and em.t_cons_prev == 1
    np.testing.assert_allclose(em.accuracy, [0] * 5 + [1] * 3)
    assert em.functional.classification == "phase transition"
    assert not em.whole_graph and not em.spans_all_nodes


def test_chance_jaccard_matches_the_formula_for_edges():
    layout = EdgeLayout.canonical(GQA)
    index = NodeIndex.from_layout(layout)
    k, n = 30, index.n_valid
    nodes, edges = chance_jaccard(index, k, n_draws=400, seed=0)
    overlap = k * k / n                                     # expected shared edges of two random k-subsets
    assert edges == pytest.approx(overlap / (2 * k - overlap), rel=0.1)
    assert edges < nodes <= 1.0
    assert chance_jaccard(index, n) == (1.0, 1.0)           # the whole graph, twice
