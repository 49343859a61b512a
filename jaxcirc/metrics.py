"""Metrics of minimal pairs, read from logits at each pair's metric position.

A metric maps `(logits [batch, vocab], pairs, clean_logits [batch, vocab]) -> [batch]`, where
`logits` are the (possibly patched) run's logits at `pairs.position` and `clean_logits` the clean
run's (only `kl` uses them). Everything is computed in float32.

    clean = pair_logits(model.forward, model.params, pairs, which="clean")
    value = logit_diff(clean, pairs, clean)                      # [batch]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxcirc.pairs import MinimalPairs

Array = jax.Array
Metric = Callable[[Array, MinimalPairs, Array], Array]


def _pick(values: Array, ids: Array) -> Array:
    """values [batch, vocab], ids [batch] -> values[b, ids[b]]."""
    return jnp.take_along_axis(values, ids[:, None].astype(jnp.int32), axis=-1)[:, 0]


def logit_diff(logits: Array, pairs: MinimalPairs, clean_logits: Array | None = None) -> Array:
    """[batch] logit(answer) - logit(foil)."""
    logits = logits.astype(jnp.float32)
    return _pick(logits, pairs.answer) - _pick(logits, pairs.foil)


def logprob(logits: Array, pairs: MinimalPairs, clean_logits: Array | None = None) -> Array:
    """[batch] log p(answer)."""
    return _pick(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), pairs.answer)


def prob_diff(logits: Array, pairs: MinimalPairs, clean_logits: Array | None = None) -> Array:
    """[batch] p(answer) - p(foil)."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return _pick(probs, pairs.answer) - _pick(probs, pairs.foil)


def kl(logits: Array, pairs: MinimalPairs, clean_logits: Array) -> Array:
    """[batch] KL(clean || this run) over the vocabulary at the metric position (0 for the clean run).

    Higher means further from the clean prediction, so unlike the other metrics it is *lower* on
    the clean run; `normalise` still maps the corrupted run to 0 and the clean run to 1.
    """
    if clean_logits is None:
        raise ValueError("The kl metric needs the clean run's logits (clean_logits).")
    log_p = jax.nn.log_softmax(clean_logits.astype(jnp.float32), axis=-1)
    log_q = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    # xlogy-style: terms with p = 0 contribute 0 even if log q is -inf.
    terms = jnp.where(log_p > -jnp.inf, jnp.exp(log_p) * (log_p - log_q), 0.0)
    return terms.sum(axis=-1)


def answer_foil_columns(metric: Metric, pairs: MinimalPairs) -> tuple[Array | None, MinimalPairs]:
    """For a metric that reads only the answer and foil logits (`logit_diff`): the token ids
    [batch, 2] to unembed and pairs whose answer / foil index those two columns, so a caller can
    skip the rest of the unembedding; for any other metric (None, pairs)."""
    if metric is not logit_diff:
        return None, pairs
    n = len(pairs)
    return (jnp.stack([pairs.answer, pairs.foil], axis=1).astype(jnp.int32),
            dataclasses.replace(pairs, answer=jnp.zeros(n, jnp.int32), foil=jnp.ones(n, jnp.int32)))


METRICS: dict[str, Metric] = {
    "logit_diff": logit_diff,
    "logprob": logprob,
    "prob_diff": prob_diff,
    "kl": kl,
}


def get_metric(metric: str | Metric) -> Metric:
    """A metric by name (see METRICS) or a callable passed through."""
    if callable(metric):
        return metric
    if metric not in METRICS:
        raise ValueError(f"Unknown metric {metric!r}; choose one of {sorted(METRICS)} or pass a function "
                         "(logits [batch, vocab], pairs, clean_logits) -> [batch].")
    return METRICS[metric]


def metric_name(metric: str | Metric) -> str:
    """The registered name of a metric, or its function name."""
    if isinstance(metric, str):
        return metric
    for name, fn in METRICS.items():
        if fn is metric:
            return name
    return getattr(metric, "__name__", repr(metric))


def normalise(value: Any, clean_value: Any, corrupt_value: Any) -> Any:
    """(value - corrupt) / (clean - corrupt): the corrupted run maps to 0, the clean run to 1.

    Broadcasts, in float32 (JAX) or float64 (NumPy: plain NumPy inputs give a NumPy result, with no
    XLA compilation). Where clean == corrupt the metric does not separate the runs, so the result
    is NaN there (no error, no division warning, and no NaN gradients in the other entries).
    """
    if any(isinstance(x, jax.Array) for x in (value, clean_value, corrupt_value)):
        xp, dtype = jnp, jnp.float32
    else:
        xp, dtype = np, np.float64
    value, clean_value, corrupt_value = (xp.asarray(x, dtype) for x in (value, clean_value, corrupt_value))
    span = clean_value - corrupt_value
    degenerate = span == 0
    safe = xp.where(degenerate, 1.0, span)
    return xp.where(degenerate, xp.nan, (value - corrupt_value) / safe)


def pair_logits(forward: Callable[..., tuple[Array, Any]], params: Any, pairs: MinimalPairs,
                hooks: Any = None, which: Literal["clean", "corrupt"] = "clean") -> Array:
    """Logits [batch, vocab] at each pair's metric position, from `forward(params, tokens, hooks,
    logits_at=pairs.position)` on the clean or corrupted prompts (only that position is unembedded)."""
    if which not in ("clean", "corrupt"):
        raise ValueError(f"which must be 'clean' or 'corrupt', got {which!r}.")
    tokens = pairs.clean if which == "clean" else pairs.corrupt
    logits, _ = forward(params, tokens, hooks, logits_at=pairs.position)
    return logits
