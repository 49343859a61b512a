"""Attention-logit decomposition (Han & Ji): exact additive logits, noise, a direct least-squares
solve, the dummy-distance test, and the logits rebuilt from hooked q/k."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcirc.attention_logits import (MASKED, dummy_distance_logits, expand_kv, logits_at_distance,
                                      logits_from_qk, qk_cache_names, stack_qk)
from jaxcirc.hooks import Hooks
from jaxcirc.model import Model
from jaxcirc.models.common import apply_rope, rope_tables
from jaxcirc.models.config import ModelConfig, RopeConfig
from jaxcirc.models.transformer import init_params
from jaxcirc.position_decomposition import (causal_mask, decompose, decomposition_terms, fit_additive,
                                            two_axis_fit)

CFG = ModelConfig(family="llama", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_head=8, d_mlp=64,
                  d_vocab=50, n_ctx=64, norm="rmsnorm", activation="silu", gated_mlp=True, positional="rotary",
                  rope=RopeConfig(theta=10000.0, rotary_dim=8), tied_embeddings=False, initializer_range=0.3)


def _additive(n, rng, batch=()):
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    a, b, c = (rng.normal(size=batch + (n,)) for _ in range(3))
    logits = a[..., (i - j) % n] + b[..., :, None] + c[..., None, :]
    return np.where(j <= i, logits, MASKED), (a, b, c)


def _design(mask, use=(True, True, True)):
    """The one-hot design matrix of the additive model on `mask` (the direct solve's input)."""
    n = mask.shape[0]
    ii, jj = np.nonzero(mask)
    blocks = []
    for on, index in zip(use, (ii - jj, ii, jj)):
        if on:
            block = np.zeros((ii.size, n))
            block[np.arange(ii.size), index] = 1
            blocks.append(block)
    return np.concatenate(blocks, 1), ii, jj


def _affine_residual(x, t):
    """Largest deviation of x from its best line in t, and the line's slope."""
    design = np.stack([np.ones_like(t), t], 1).astype(float)
    coef, *_ = np.linalg.lstsq(design, x, rcond=None)
    return np.abs(design @ coef - x).max(), coef[1]


@pytest.mark.parametrize("sink", ["include", "exclude", "separate"])
def test_exactly_additive_logits_give_r_one_and_recover_terms(sink):
    n = 24
    logits, (a, b, c) = _additive(n, np.random.default_rng(0), batch=(2, 3))
    dec = decompose(jnp.asarray(logits, jnp.float32), sink=sink)
    assert dec.r.shape == (2, 3)
    np.testing.assert_allclose(dec.r, 1.0, atol=1e-5)
    np.testing.assert_allclose(dec.r_within_query, 1.0, atol=1e-5)
    # The terms are identified up to constants and one shared linear trend (a + alpha d,
    # b - alpha i, c + alpha j): the differences must be affine with matching slopes.
    start = 0 if sink == "include" else 1
    d_idx = np.arange(n - 1 if sink != "include" else n)  # distance n-1 only occurs in the sink column
    for h in np.ndindex(2, 3):
        da, slope_a = _affine_residual(np.asarray(dec.distance[h])[d_idx] - a[h][d_idx], d_idx.astype(float))
        rows = np.arange(start, n)
        db, slope_b = _affine_residual(np.asarray(dec.query[h])[rows] - b[h][rows], rows.astype(float))
        cols = np.arange(1, n)
        dc, slope_c = _affine_residual(np.asarray(dec.key[h])[cols] - c[h][cols], cols.astype(float))
        assert max(da, db, dc) < 1e-4
        np.testing.assert_allclose([slope_a, slope_c], [-slope_b, -slope_b], atol=1e-4)
    # Convention: query term without (count-weighted) constant, key term with weighted mean zero.
    fit_mask = causal_mask(n, sink="include" if sink == "include" else "exclude")
    rows, cols = fit_mask.sum(1), fit_mask.sum(0)
    assert np.abs((np.asarray(dec.query) * rows).sum(-1)).max() < 1e-3
    if sink != "separate":  # "separate" puts the sink offset into c(0)
        assert np.abs((np.asarray(dec.key) * cols).sum(-1)).max() < 1e-3


def test_random_qk_give_low_r():
    rng = np.random.default_rng(1)
    n, d_head = 96, 16
    cfg = CFG.replace(d_head=d_head, rope=RopeConfig(theta=10000.0, rotary_dim=d_head))
    q, k = rng.normal(size=(4, n, 1, d_head)), rng.normal(size=(4, n, 1, d_head))
    cos, sin = rope_tables(cfg.rope, jnp.broadcast_to(jnp.arange(n), (4, n)))
    logits = logits_from_qk(apply_rope(jnp.asarray(q, jnp.float32), cos, sin), apply_rope(jnp.asarray(k, jnp.float32), cos, sin))
    dec = decompose(logits)
    # Pure noise still fits 3n parameters to ~n^2/2 entries: r ~ sqrt(6/n) ~ 0.25.
    assert float(dec.r.max()) < 0.4
    additive, _ = _additive(n, rng, batch=(4, 1))
    assert float(decompose(jnp.asarray(additive, jnp.float32)).r.min()) > 0.9999


@pytest.mark.parametrize("terms", [("distance", "query", "key"), ("query", "key"), ("distance", "key"), ("distance",)])
def test_backfitting_equals_direct_least_squares(terms):
    rng = np.random.default_rng(2)
    n = 11
    for mask in (causal_mask(n, sink="include"), causal_mask(n, sink="exclude")):
        w = rng.normal(size=(n, n))
        fit = fit_additive(jnp.asarray(w, jnp.float32), mask, terms, tol=1e-7)
        use = tuple(t in terms for t in ("distance", "query", "key"))
        design, ii, jj = _design(mask, use)
        theta, *_ = np.linalg.lstsq(design, w[ii, jj], rcond=None)
        np.testing.assert_allclose(np.asarray(fit.fitted)[ii, jj], design @ theta, atol=2e-5)
        expected_r = np.corrcoef(w[ii, jj], design @ theta)[0, 1]
        np.testing.assert_allclose(float(fit.r), expected_r, atol=1e-5)
        assert bool(fit.converged)


def test_unique_shares_match_nested_least_squares():
    rng = np.random.default_rng(3)
    n = 12
    w = rng.normal(size=(n, n)) + np.add.outer(np.arange(n), -0.5 * np.arange(n)) ** 2 / 20
    dec = decompose(jnp.asarray(w, jnp.float32), sink="exclude")
    mask = causal_mask(n, sink="exclude")

    def r2(use):
        design, ii, jj = _design(mask, use)
        design = np.concatenate([design, np.ones((ii.size, 1))], 1)
        fitted = design @ np.linalg.lstsq(design, w[ii, jj], rcond=None)[0]
        return np.corrcoef(w[ii, jj], fitted)[0, 1] ** 2

    full = r2((True, True, True))
    np.testing.assert_allclose(float(dec.r) ** 2, full, atol=1e-5)
    # Within-query r: correlation after removing each row's mean from logits and fit alike.
    design, ii, jj = _design(mask)
    fitted = design @ np.linalg.lstsq(design, w[ii, jj], rcond=None)[0]
    row_mean = lambda v: np.bincount(ii, v, minlength=n)[ii] / np.bincount(ii, minlength=n)[ii]
    expected = np.corrcoef(w[ii, jj] - row_mean(w[ii, jj]), fitted - row_mean(fitted))[0, 1]
    np.testing.assert_allclose(float(dec.r_within_query), expected, atol=1e-5)
    np.testing.assert_allclose(float(dec.distance_share), full - r2((False, True, True)), atol=1e-4)
    np.testing.assert_allclose(float(dec.query_share), full - r2((True, False, True)), atol=1e-4)
    np.testing.assert_allclose(float(dec.key_share), full - r2((True, True, False)), atol=1e-4)
    np.testing.assert_allclose(float(dec.r_distance_only) ** 2, r2((True, False, False)), atol=1e-4)


def test_sink_modes():
    n = 24  # the shapes of the test above, so the compiled fits are reused
    rng = np.random.default_rng(4)
    logits, _ = _additive(n, rng, batch=(2, 3))
    logits[..., :, 0] += 5 * rng.normal(size=n)  # a non-additive sink column
    w = jnp.asarray(logits, jnp.float32)
    exclude, include, separate = (decompose(w, sink=s) for s in ("exclude", "include", "separate"))
    np.testing.assert_allclose(exclude.r, 1.0, atol=1e-5)
    assert float(include.r.max()) < 0.99
    # "separate" estimates the terms without the sink, then measures r with it.
    np.testing.assert_allclose(separate.query, exclude.query, atol=1e-5)
    np.testing.assert_allclose(separate.key[..., 1:], exclude.key[..., 1:], atol=1e-5)
    assert float(separate.r.max()) < 0.999 and np.isfinite(np.asarray(separate.sink_offset)).all()
    maps = decomposition_terms(exclude, n)
    assert maps[0].shape == (2, 3, n, n) and np.isnan(np.asarray(maps[0])[..., 0, 1]).all()


def test_dummy_distance_on_a_constructed_case():
    # Keys that vary only in the slowest rotary pair and share everything else: the logit is a
    # distance term (fast pairs, token-invariant keys) plus a content term (slow pair, ~no rotation).
    cfg = CFG.replace(d_head=16, rope=RopeConfig(theta=1e6, rotary_dim=16))
    rng = np.random.default_rng(5)
    half = 8
    q = rng.normal(size=16)
    shared = rng.normal(size=16)
    keys = np.tile(shared, (30, 1))
    keys[:, half - 1] += 3 * rng.normal(size=30)  # pair 7 (theta ~ 1e-5.25): content lives here
    keys[:, 2 * half - 1] += 3 * rng.normal(size=30)
    m = dummy_distance_logits(jnp.asarray(q, jnp.float32), jnp.asarray(keys, jnp.float32), jnp.arange(40), cfg)
    fit = two_axis_fit(m)
    assert float(fit.r) > 0.999 and float(fit.key_rank_invariance) > 0.99
    # Content in the fastest pair instead: the key ranking depends on the distance.
    keys_fast = np.tile(shared, (30, 1))
    keys_fast[:, 0] += 3 * rng.normal(size=30)
    keys_fast[:, half] += 3 * rng.normal(size=30)
    fast = two_axis_fit(dummy_distance_logits(jnp.asarray(q, jnp.float32), jnp.asarray(keys_fast, jnp.float32),
                                              jnp.arange(40), cfg))
    assert float(fast.r) < 0.9 and float(fast.key_rank_invariance) < 0.5
    # Against the core's own rotation: M[d, j] = (R_d q) . (R_0 k_j) / sqrt(d_head).
    cos, sin = rope_tables(cfg.rope, jnp.arange(40)[None])
    rq = apply_rope(jnp.broadcast_to(jnp.asarray(q, jnp.float32), (1, 40, 1, 16)), cos, sin)[0, :, 0]
    expected = rq @ jnp.asarray(keys, jnp.float32).T / 4.0
    np.testing.assert_allclose(m, expected, atol=2e-4)
    # Balanced table: f, g and r as row/column means and an ordinary least-squares fit.
    table = np.asarray(m, np.float64)
    np.testing.assert_allclose(fit.f, table.mean(1), atol=1e-4)
    np.testing.assert_allclose(fit.g, table.mean(0) - table.mean(), atol=1e-4)


@pytest.fixture(scope="module")
def tiny():
    model = Model(CFG, init_params(CFG, 0))
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, CFG.d_vocab)
    names = qk_cache_names(CFG) + tuple(f"blocks.{l}.attn.hook_attn_scores" for l in range(CFG.n_layers))
    _, cache = model.forward(model.params, tokens, Hooks(cache=names))
    return model, tokens, cache


def test_logits_from_hooked_qk_equal_hook_attn_scores(tiny):
    model, tokens, cache = tiny
    qk = stack_qk(CFG, cache)
    assert qk.q.shape == (2, 2, 12, 4, 8) and qk.k.shape == (2, 2, 12, 2, 8)
    scores = np.stack([cache[f"blocks.{l}.attn.hook_attn_scores"] for l in range(CFG.n_layers)])
    np.testing.assert_allclose(logits_from_qk(qk.rot_q, qk.rot_k), scores, rtol=1e-5, atol=1e-5)
    # The same from pre-RoPE q/k at the relative distance alone (GQA: head h reads kv head h // 2).
    i, j = np.arange(12)[:, None], np.arange(12)[None, :]
    q = qk.q[1][:, :, None]  # [b, q, 1, head, d]
    k = expand_kv(qk.k[1], CFG.n_heads)[:, None]  # [b, 1, k, head, d]
    rebuilt = jnp.moveaxis(logits_at_distance(q, k, (i - j)[None, :, :, None], CFG), -1, 1)
    np.testing.assert_allclose(np.where(j <= i, rebuilt, 0), np.where(j <= i, scores[1], 0), rtol=1e-4, atol=1e-4)


# Query scale, attention soft cap and partial interleaved (GPT-J) rotary: the logits must still be
# the scores the model's softmax sees, and rebuildable from pre-RoPE q/k at the distance alone.
CAPPED = CFG.replace(query_scale=0.3, attn_softcap=2.0, d_head=12,
                     rope=RopeConfig(theta=10000.0, rotary_dim=8, interleaved=True))


def test_logits_follow_query_scale_soft_cap_and_interleaved_rotary():
    model = Model(CAPPED, init_params(CAPPED, 1))
    tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, CAPPED.d_vocab)
    names = qk_cache_names(CAPPED) + tuple(f"blocks.{l}.attn.hook_attn_scores" for l in range(CAPPED.n_layers))
    _, cache = model.forward(model.params, tokens, Hooks(cache=names))
    qk = stack_qk(CAPPED, cache)
    scores = np.stack([cache[f"blocks.{l}.attn.hook_attn_scores"] for l in range(CAPPED.n_layers)])
    assert np.abs(scores[np.isfinite(scores) & (scores > -1e30)]).max() < 2.0  # the cap is active
    np.testing.assert_allclose(logits_from_qk(qk.rot_q, qk.rot_k, cfg=CAPPED), scores, rtol=1e-5, atol=1e-5)
    assert not np.allclose(logits_from_qk(qk.rot_q, qk.rot_k), scores, atol=1e-3)  # 1/sqrt(d) would be wrong
    i, j = np.arange(10)[:, None], np.arange(10)[None, :]
    q = qk.q[0][:, :, None]
    k = expand_kv(qk.k[0], CAPPED.n_heads)[:, None]
    rebuilt = jnp.moveaxis(logits_at_distance(q, k, (i - j)[None, :, :, None], CAPPED), -1, 1)
    np.testing.assert_allclose(np.where(j <= i, rebuilt, 0), np.where(j <= i, scores[0], 0), rtol=1e-4, atol=1e-4)
    # The dummy-distance table at distance i - j is the same logit.
    table = dummy_distance_logits(qk.q[0][0, 9], expand_kv(qk.k[0], CAPPED.n_heads)[0].swapaxes(0, 1),
                                  jnp.arange(10), CAPPED)  # [head, D, key]
    np.testing.assert_allclose(table[:, 9 - np.arange(10), np.arange(10)], scores[0][0, :, 9], rtol=1e-4, atol=1e-4)
