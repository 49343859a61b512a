"""Metrics against NumPy, normalisation edge cases, and that pair_logits reads one position."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcirc.metrics import METRICS, get_metric, kl, logprob, metric_name, normalise, pair_logits, prob_diff
from jaxcirc.pairs import from_tokens

VOCAB = 11


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(0)
    pairs = from_tokens([[1, 2, 3], [4, 5], [6]], [[1, 2, 7], [4, 8], [9]],
                        answer=[3, 0, 10], foil=[4, 5, 1])
    logits = (3 * rng.normal(size=(3, VOCAB))).astype(np.float32)
    clean = (3 * rng.normal(size=(3, VOCAB))).astype(np.float32)
    return pairs, logits, clean


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_metrics_match_numpy(case):
    pairs, logits, clean = case
    rows = np.arange(3)
    answer, foil = np.asarray(pairs.answer), np.asarray(pairs.foil)
    lp, lp_clean = _log_softmax(logits), _log_softmax(clean)
    expected = {
        "logit_diff": logits[rows, answer].astype(np.float64) - logits[rows, foil],
        "logprob": lp[rows, answer],
        "prob_diff": np.exp(lp[rows, answer]) - np.exp(lp[rows, foil]),
        "kl": (np.exp(lp_clean) * (lp_clean - lp)).sum(-1),
    }
    assert set(METRICS) == set(expected)
    # One program for all metrics (eager op-by-op dispatch compiles every op: slower on CPU).
    every = jax.jit(lambda x, c: {name: fn(x, pairs, c) for name, fn in METRICS.items()})(logits, clean)
    for name, value in expected.items():
        got = every[name]
        assert got.shape == (3,) and got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), value, rtol=1e-5, atol=1e-5, err_msg=name)


def test_kl_is_zero_on_clean_and_fp32_for_bf16(case):
    pairs, _, clean = case

    @jax.jit
    def run(c):
        big = (c * 30).astype(jnp.bfloat16)  # peaked: a bf16 softmax would underflow
        return kl(c, pairs, c), kl(big, pairs, c * 30)

    same, value = run(clean)
    np.testing.assert_allclose(np.asarray(same), 0.0, atol=1e-6)
    assert value.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(value)))


def test_metrics_jit_and_grad(case):
    pairs, logits, clean = case
    grads = jax.jit(lambda x, c: {name: jax.grad(lambda y: fn(y, pairs, c).sum())(x)
                                  for name, fn in METRICS.items()})(logits, clean)
    for name, grad in grads.items():
        assert bool(jnp.all(jnp.isfinite(grad))), name
    # d(logit_diff)/d(logits) is +1 at the answer and -1 at the foil.
    expected = np.zeros_like(logits)
    expected[np.arange(3), np.asarray(pairs.answer)] += 1
    expected[np.arange(3), np.asarray(pairs.foil)] -= 1
    np.testing.assert_array_equal(np.asarray(grads["logit_diff"]), expected)


def test_get_metric_and_names():
    assert get_metric("logprob") is logprob and get_metric(prob_diff) is prob_diff
    assert metric_name(prob_diff) == "prob_diff" and metric_name("kl") == "kl"
    with pytest.raises(ValueError, match="Unknown metric 'accuracy'"):
        get_metric("accuracy")


def test_normalise():
    np.testing.assert_allclose(normalise(np.array([1.0, 3.0, 2.0]), 3.0, 1.0), [0.0, 1.0, 0.5])
    out = normalise(np.array([1.0, 2.0]), np.array([3.0, 5.0]), np.array([1.0, 5.0]))  # pair 1 degenerate
    assert out[0] == 0.0 and np.isnan(out[1])
    assert isinstance(out, np.ndarray)
    # JAX inputs: no NaN gradient leaks into the well-defined entries.
    grad = jax.jit(jax.grad(lambda v: jnp.nansum(normalise(v, jnp.array([3.0, 5.0]), jnp.array([1.0, 5.0])))))(
        np.array([1.0, 2.0], np.float32))
    np.testing.assert_allclose(np.asarray(grad), [0.5, 0.0])
    # Decreasing metrics (KL: clean = 0) still map corrupt -> 0 and clean -> 1.
    np.testing.assert_allclose(normalise(np.array([0.0, 4.0, 1.0]), 0.0, 4.0), [1.0, 0.0, 0.75])


def test_pair_logits_reads_only_the_metric_position():
    pairs = from_tokens([[1, 2, 3], [4, 5]], [[6, 2, 3], [7, 5]], [1, 2], [3, 4])
    calls = []

    def forward(params, tokens, hooks=None, *, logits_at=None):
        calls.append((np.asarray(tokens), hooks, None if logits_at is None else np.asarray(logits_at)))
        return jnp.zeros((tokens.shape[0], VOCAB)), {}

    out = pair_logits(forward, {}, pairs, which="corrupt")
    assert out.shape == (2, VOCAB)
    tokens, hooks, at = calls[-1]
    np.testing.assert_array_equal(tokens, np.asarray(pairs.corrupt))
    np.testing.assert_array_equal(at, [2, 1])
    pair_logits(forward, {}, pairs, hooks="H")
    np.testing.assert_array_equal(calls[-1][0], np.asarray(pairs.clean))
    assert calls[-1][1] == "H"
    with pytest.raises(ValueError, match="which"):
        pair_logits(forward, {}, pairs, which="both")


@pytest.mark.parametrize("changes", [dict(tied_embeddings=True), dict(unembed_bias=True, final_softcap=3.0)],
                         ids=["tied", "untied-bias-softcap"])
def test_logit_diff_from_answer_and_foil_columns_only(changes):
    """`logits_columns` unembeds just the answer and foil; logit_diff on them equals the full one."""
    from jaxcirc.metrics import answer_foil_columns, logit_diff
    from jaxcirc.models.transformer import make_forward
    from tiny_models import llama_gqa, random_pairs, random_params

    cfg = llama_gqa(**changes)
    params, pairs = random_params(cfg, 3), random_pairs(4, 6, 7)
    forward = make_forward(cfg)
    full, _ = forward(params, pairs.clean, None, logits_at=pairs.position)
    columns, view = answer_foil_columns(logit_diff, pairs)
    two, _ = forward(params, pairs.clean, None, logits_at=pairs.position, logits_columns=columns)
    assert two.shape == (6, 2)
    np.testing.assert_allclose(two, np.take_along_axis(np.asarray(full), np.asarray(columns), axis=1), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(logit_diff(two, view), logit_diff(full, pairs), rtol=1e-6, atol=1e-6)
    assert answer_foil_columns(logprob, pairs) == (None, pairs)  # needs the whole vocabulary
    with pytest.raises(ValueError, match="logits_at"):
        forward(params, pairs.clean, None, logits_columns=columns)
