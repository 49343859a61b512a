"""Position perturbations and LM-Infinite-style attention.

    perm, moved = shuffle_permutation(256, 0.05, np.random.default_rng(0))   # 5 % of tokens moved
    curve = perturbation_curve(model, tokens, fractions=(0, .01, .02, .05, .1, .2))
    windowed = with_attention_window(model, AttentionWindow(n_global=4, n_local=64, max_distance=64))

Three perturbations ("modes"): "tokens" feeds the tokens in a permuted order (x'[t] = x[perm[t]])
where the moved tokens pass around one random cycle (so they travel far); "adjacent" moves the same
number of tokens by swapping disjoint neighbouring pairs (a local transposition: every moved token
travels one position); "position_ids" keeps the tokens in order and gives token t the position id
perm[t] of the "tokens" permutation, so the only thing that changes is what RoPE sees.

Metrics are next-token negative log-likelihoods. "Unperturbed targets" are the positions whose
target token was not moved; their loss is compared with the clean run's loss on the same targets,
so the curve measures how much corrupting the context hurts predictions that are otherwise the
same task.

LM-Infinite (Han et al. 2023) is a model option (`jaxcirc.models.config.AttentionWindow`, computed
inside the attention of every layer in one pass): each query sees a global prefix of `n_global`
tokens plus a local window of its `n_local` most recent tokens, and relative distances beyond
`max_distance` (the trained length) are treated as `max_distance`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcirc.hooks import Hooks
from jaxcirc.models.config import AttentionWindow
from jaxcirc.models.transformer import make_forward

Array = jax.Array
MODES = ("tokens", "adjacent", "position_ids")
STYLES = ("cycle", "adjacent")


# ----------------------------------------------------------------------------- permutations


def shuffle_permutation(n: int, fraction: float, rng: np.random.Generator, *, keep_first: int = 1,
                        style: str = "cycle") -> tuple[np.ndarray, np.ndarray]:
    """A permutation of n positions that moves round(fraction * (n - keep_first)) of them.

    style "cycle": the chosen positions pass their tokens around a random cycle, so every chosen
    position receives another position's token (a single chosen position could not move: one
    becomes two). style "adjacent": disjoint neighbouring pairs are swapped (an odd count is
    rounded up to even). The first `keep_first` positions (the BOS / attention-sink token) never
    move. Returns (perm [n] source index of each position, moved [n] bool)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}.")
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}.")
    if not 0 <= keep_first <= n:
        raise ValueError(f"keep_first={keep_first} must be between 0 and the length {n}.")
    eligible = np.arange(keep_first, n)
    k = int(round(fraction * eligible.size))
    if k == 1:
        k = 2
    k = min(k, eligible.size)
    perm = np.arange(n)
    if k >= 2 and style == "cycle":
        chosen = rng.choice(eligible, size=k, replace=False)  # random order: the cycle is random too
        perm[chosen] = np.roll(chosen, -1)
    elif k >= 2:
        # Tile the eligible positions with pairs (random phase) and swap a random subset of them.
        offset = int(rng.integers(2)) if eligible.size % 2 == 0 and eligible.size > 2 else 0
        starts = eligible[offset:eligible.size - 1:2]
        starts = starts[starts + 1 < n]
        pairs = rng.choice(starts, size=min((k + 1) // 2, starts.size), replace=False)
        perm[pairs], perm[pairs + 1] = pairs + 1, pairs
    return perm, perm != np.arange(n)


def permutations(n_texts: int, n: int, fraction: float, seed: int, *, keep_first: int = 1,
                 style: str = "cycle") -> np.ndarray:
    """[n_texts, n] permutations for one (fraction, seed, style), reproducible from the seed alone."""
    out = np.empty((n_texts, n), np.int64)
    for t in range(n_texts):
        rng = np.random.default_rng([seed, t, int(round(fraction * 1_000_000)), STYLES.index(style)])
        out[t] = shuffle_permutation(n, fraction, rng, keep_first=keep_first, style=style)[0]
    return out


def apply_permutation(tokens: Array, perm: np.ndarray) -> Array:
    """tokens [batch, n] rearranged so that position t holds tokens[perm[t]]."""
    return jnp.take_along_axis(jnp.asarray(tokens), jnp.asarray(perm, jnp.int32), axis=-1)


# ----------------------------------------------------------------------------- losses


@functools.partial(jax.jit, static_argnames=("forward",))
def _nll(forward, params, tokens: Array, position_ids: Array, hooks: Hooks | None) -> tuple[Array, Array]:
    logits, _ = forward(params, tokens, hooks, position_ids=position_ids)
    return _nll_from_logits(logits, tokens)


def _nll_from_logits(logits: Array, tokens: Array) -> tuple[Array, Array]:
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    target = tokens[:, 1:]
    nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
    return nll, (jnp.argmax(logp, axis=-1) == target)


def token_nll(model, tokens: Array, *, position_ids: Array | None = None, hooks: Hooks | None = None,
              params: dict | None = None, batch_size: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Next-token loss of `model` on tokens [batch, n]: (nll [batch, n-1], top-1 correct [batch, n-1]);
    entry t scores the prediction of token t+1. Runs `batch_size` sequences at a time."""
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [batch, n] with n >= 2, got {tuple(tokens.shape)}.")
    if position_ids is None:
        position_ids = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    position_ids = jnp.asarray(position_ids, jnp.int32)
    params = model.params if params is None else params
    nlls, hits = [], []
    for start in range(0, tokens.shape[0], batch_size):
        # Pad the last chunk to batch_size so every chunk reuses one compilation.
        chunk = slice(start, start + batch_size)
        t, p = tokens[chunk], position_ids[chunk]
        short = batch_size - t.shape[0]
        if short:
            t = jnp.concatenate([t, jnp.repeat(t[-1:], short, 0)])
            p = jnp.concatenate([p, jnp.repeat(p[-1:], short, 0)])
        nll, hit = _nll(model.forward, params, t, p, hooks)
        nlls.append(np.asarray(nll)[: batch_size - short])
        hits.append(np.asarray(hit)[: batch_size - short])
    return np.concatenate(nlls), np.concatenate(hits)


@dataclasses.dataclass(frozen=True)
class PerturbationCurve:
    """Losses versus the perturbed fraction. Arrays are [mode, fraction, seed] (means over texts
    and target positions), with mode in `modes` ("tokens", "adjacent", "position_ids").

    ppl: perplexity over every target of the perturbed input.
    ppl_unmoved / accuracy_unmoved: perplexity / top-1 accuracy on targets that were not moved.
    clean_ppl_unmoved / clean_accuracy_unmoved: the clean run on the same targets.
    moved_fraction: the fraction of eligible positions actually moved."""

    fractions: np.ndarray
    seeds: np.ndarray
    modes: tuple[str, ...]
    ppl: np.ndarray
    ppl_unmoved: np.ndarray
    accuracy_unmoved: np.ndarray
    clean_ppl_unmoved: np.ndarray
    clean_accuracy_unmoved: np.ndarray
    moved_fraction: np.ndarray


def perturbation_curve(model, tokens: Array, fractions: Sequence[float] = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2), *,
                       seeds: Sequence[int] = (0,), modes: Sequence[str] = MODES, keep_first: int = 1,
                       params: dict | None = None, batch_size: int = 4, progress=None) -> PerturbationCurve:
    """Shuffle a fraction of the tokens of each text (tokens [texts, n]), or permute their position
    ids the same way, and measure the next-token loss (see the module docstring)."""
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"Unknown perturbation modes {bad}; choose from {MODES}.")
    tokens = np.asarray(tokens)
    n_texts, n = tokens.shape
    clean_nll, clean_hit = token_nll(model, tokens, params=params, batch_size=batch_size)
    shape = (len(modes), len(fractions), len(seeds))
    out = {k: np.zeros(shape) for k in ("ppl", "ppl_unmoved", "accuracy_unmoved", "clean_ppl_unmoved",
                                         "clean_accuracy_unmoved")}
    moved_fraction = np.zeros(shape)
    jobs = [(fi, si) for fi in range(len(fractions)) for si in range(len(seeds))]
    for fi, si in (jobs if progress is None else progress(jobs, "perturbations")):
        for mi, mode in enumerate(modes):
            style = "adjacent" if mode == "adjacent" else "cycle"
            perm = permutations(n_texts, n, float(fractions[fi]), int(seeds[si]), keep_first=keep_first, style=style)
            moved = perm != np.arange(n)
            moved_fraction[mi, fi, si] = moved[:, keep_first:].mean()
            keep = ~moved[:, 1:]  # targets (token t+1) that stay where they were
            if not moved.any():  # nothing perturbed: the clean run
                nll, hit = clean_nll, clean_hit
            elif mode == "position_ids":
                nll, hit = token_nll(model, tokens, position_ids=perm, params=params, batch_size=batch_size)
            else:
                nll, hit = token_nll(model, apply_permutation(tokens, perm), params=params, batch_size=batch_size)
            out["ppl"][mi, fi, si] = np.exp(nll.mean())
            out["ppl_unmoved"][mi, fi, si] = np.exp(nll[keep].mean())
            out["accuracy_unmoved"][mi, fi, si] = hit[keep].mean()
            out["clean_ppl_unmoved"][mi, fi, si] = np.exp(clean_nll[keep].mean())
            out["clean_accuracy_unmoved"][mi, fi, si] = clean_hit[keep].mean()
    return PerturbationCurve(fractions=np.asarray(fractions, float), seeds=np.asarray(seeds), modes=tuple(modes),
                             moved_fraction=moved_fraction, **out)


# ----------------------------------------------------------------------------- LM-Infinite


def with_attention_window(model, window: AttentionWindow | None):
    """`model` with LM-Infinite attention in every layer (None: plain causal attention).

    The window is part of the config, so the returned model has its own compiled forward: build
    it once and reuse it across texts."""
    cfg = model.config.replace(attention_window=window)
    return dataclasses.replace(model, config=cfg, forward=make_forward(cfg))


def windowed_nll(model, tokens: Array, window: AttentionWindow | None, *, batch_size: int = 1
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Next-token (nll, correct) [batch, n-1] of `tokens` [batch, n] with LM-Infinite attention
    (None: the plain model). n may exceed the model's context: RoPE models run at any length."""
    windowed = with_attention_window(model, window)
    return token_nll(windowed, jnp.asarray(tokens, jnp.int32), batch_size=batch_size)
