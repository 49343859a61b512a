"""Position perturbations and LM-Infinite-style attention.

    perm, moved = shuffle_permutation(256, 0.05, np.random.default_rng(0))   # 5 % of tokens moved
    curve = perturbation_curve(model, tokens, fractions=(0, .01, .02, .05, .1, .2))
    logits, _ = lm_infinite_forward(model, tokens, LambdaAttention(n_global=4, n_local=64, max_distance=64))

Three perturbations ("modes"): "tokens" feeds the tokens in a permuted order (x'[t] = x[perm[t]])
where the moved tokens pass around one random cycle (so they travel far); "adjacent" moves the same
number of tokens by swapping disjoint neighbouring pairs (a local transposition: every moved token
travels one position); "position_ids" keeps the tokens in order and gives token t the position id
perm[t] of the "tokens" permutation, so the only thing that changes is what RoPE sees.

Metrics are next-token negative log-likelihoods. "Unperturbed targets" are the positions whose
target token was not moved; their loss is compared with the clean run's loss on the same targets,
so the curve measures how much corrupting the context hurts predictions that are otherwise the
same task.

LM-Infinite (Han et al. 2023): each query sees a global prefix of `n_global` tokens plus a local
window of the `n_local` most recent tokens (a Lambda-shaped mask), and relative distances beyond
`max_distance` (the trained length) are treated as `max_distance`. The mask is exactly a
replacement of `attn.hook_attn_scores`. The distance cap is not a per-layer constant: the capped
logit q_i^T R_cap k_j needs that layer's own q and k, which depend on the earlier layers' capped
attention. `lm_infinite_forward` therefore runs the model once per layer, each pass computing one
more layer's capped logits from the cached pre-RoPE q/k and replacing them; the result is exact,
costs n_layers + 1 forward passes, and compiles once (the interventions keep their structure).
A native option in the core attention would do it in one pass (see the report of issue 8).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcirc.attention_logits import MASKED, expand_kv, rotate
from jaxcirc.hooks import Hooks, replace

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


@dataclasses.dataclass(frozen=True)
class LambdaAttention:
    """LM-Infinite's attention: every query sees the first `n_global` tokens and its `n_local`
    most recent tokens (itself included), with relative distances above `max_distance` (the
    trained length) evaluated at `max_distance`. The paper's Llama-2 setting: n_global=100,
    n_local=4096, max_distance=4096."""

    n_global: int
    n_local: int
    max_distance: int

    def __post_init__(self):
        if self.n_global < 0 or self.n_local < 1 or self.max_distance < 0:
            raise ValueError(f"Need n_global >= 0, n_local >= 1, max_distance >= 0; got {self}.")


def lambda_mask(n: int, spec: LambdaAttention) -> np.ndarray:
    """[n, n] bool: which key j each query i may attend to (causal, global prefix or local window)."""
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    return (j <= i) & ((i - j < spec.n_local) | (j < spec.n_global))


def _capped_scores(q: Array, k: Array, cap: int, cfg) -> Array:
    """q_i^T R_cap k_j / sqrt(d_head) from pre-RoPE q [b, n, head, d], k [b, n, kv, d] -> [b, head, n, n]."""
    rq = rotate(q, jnp.asarray(cap), cfg)
    kk = expand_kv(k.astype(jnp.float32), cfg.n_heads)
    return jnp.einsum("bqhd,bkhd->bhqk", rq, kk) / np.sqrt(cfg.d_head)


def lm_infinite_forward(model, tokens: Array, spec: LambdaAttention, *, params: dict | None = None,
                        position_ids: Array | None = None, logits_at: Array | None = None,
                        cache: Sequence[str] = ()) -> tuple[Array, dict[str, Array]]:
    """The model's forward with LM-Infinite attention (see the module docstring): (logits, cache).

    tokens [batch, n]; `position_ids` [batch, n] default 0..n-1 (distances are differences of
    position ids). Exact; n_layers + 1 passes when some allowed distance exceeds max_distance,
    one pass otherwise."""
    cfg = model.config
    if cfg.positional != "rotary":
        raise ValueError("LM-Infinite's distance cap applies to rotary models only.")
    params = model.params if params is None else params
    tokens = jnp.asarray(tokens, jnp.int32)
    batch, n = tokens.shape
    if position_ids is None:
        position_ids = np.broadcast_to(np.arange(n), (batch, n))
    position_ids = np.asarray(position_ids)
    allowed = lambda_mask(n, spec)[None]  # [1, n, n]
    distance = position_ids[:, :, None] - position_ids[:, None, :]
    needs_cap = allowed & (distance > spec.max_distance)  # [batch, n, n]
    blocked = jnp.asarray(~allowed[:, None])  # [1, 1, n, n]
    names = [f"blocks.{l}.attn.hook_attn_scores" for l in range(cfg.n_layers)]
    forward_options = dict(position_ids=jnp.asarray(position_ids, jnp.int32))
    if not needs_cap.any():
        hooks = Hooks({name: replace(jnp.float32(MASKED), blocked) for name in names}, cache=tuple(cache))
        return model.forward(params, tokens, hooks, logits_at=logits_at, **forward_options)
    mask = jnp.asarray(~allowed[:, None] | needs_cap[:, None])  # [batch, 1, n, n]
    values = [jnp.full((batch, cfg.n_heads, n, n), MASKED, jnp.float32) for _ in names]
    qk_cache = ("blocks.*.attn.hook_q", "blocks.*.attn.hook_k")
    first = jnp.zeros(batch, jnp.int32)
    for layer in range(cfg.n_layers):
        # Layers below `layer` already hold their exact capped logits, so this pass's q/k at
        # `layer` are exact too.
        hooks = Hooks({name: replace(v, mask) for name, v in zip(names, values)}, cache=qk_cache)
        _, qk = model.forward(params, tokens, hooks, logits_at=first, **forward_options)
        capped = _capped_scores(qk[f"blocks.{layer}.attn.hook_q"], qk[f"blocks.{layer}.attn.hook_k"],
                                spec.max_distance, cfg)
        values[layer] = jnp.where(blocked, MASKED, capped)
    hooks = Hooks({name: replace(v, mask) for name, v in zip(names, values)}, cache=tuple(cache))
    return model.forward(params, tokens, hooks, logits_at=logits_at, **forward_options)


def lm_infinite_nll(model, tokens: Array, spec: LambdaAttention | None, *, params: dict | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Next-token (nll, correct) [batch, n-1] with LM-Infinite attention (None: the plain model)."""
    tokens = jnp.asarray(tokens, jnp.int32)
    if spec is None:
        return token_nll(model, tokens, params=params, batch_size=tokens.shape[0])
    logits, _ = lm_infinite_forward(model, tokens, spec, params=params)
    nll, hit = _nll_from_logits(logits, tokens)
    return np.asarray(nll), np.asarray(hit)
