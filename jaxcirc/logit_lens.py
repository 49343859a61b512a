"""Logit lens: decode every layer's residual stream through the final norm and the unembedding.

    result = logit_lens(model, ["Q: What is the capital of Poland?\\nA:"], token_ids=[[poland, warsaw]])
    result.rr[result.site("resid_post"), 0, :, 1]      # reciprocal rank of " Warsaw" per layer

Sites (per layer l, read at one position per prompt):
  * `resid_pre`:  the block's input (layer 0: the embeddings).
  * `pre_ffn`:    the residual the FFN reads and adds to, i.e. `resid_post - mlp_out`. For sequential
                  blocks (GPT-2, Llama) this is `hook_resid_mid` (after attention, before the FFN). For
                  parallel-residual blocks (GPT-NeoX/Pythia), where attention and FFN both read
                  `resid_pre`, it is `resid_pre + attn_out`: the block's output without its FFN update,
                  which is the paper's "subtract the FFN output" reading (experiments.md B.4).
  * `resid_post`: the block's output; at the last layer its decoding is the model's output.

Decoding applies the model's own final norm and unembedding (bias included when the model has
one), via the bound NNX module, so the last layer's `resid_post` decodes to exactly the model's
logits. Per layer we keep, for chosen tokens, the rank (number of tokens with a strictly larger
logit, so 0 = top-1), the reciprocal rank 1 / (rank + 1), the probability and the logit, plus the
top-k tokens. Only the read position is ever unembedded; layers are decoded one at a time
(`lax.map`) so memory stays at [batch, d_vocab]. A batch of prompts is one jitted call per chunk.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcirc.hooks import Hooks, as_hooks
from jaxcirc.models.config import ModelConfig
from jaxcirc.models.transformer import Run, bind
from jaxcirc.sharding import DATA, shard_along_batch, shard_params, to_host

Array = jax.Array
SITES = ("resid_pre", "pre_ffn", "resid_post")
HooksArg = Hooks | Callable[[np.ndarray, int], Hooks] | None


# --------------------------------------------------------------------------- pure pieces

def decode(cfg: ModelConfig, params: dict, resid: Array) -> Array:
    """Residual [..., d_model] -> logits [..., d_vocab] through the final norm and unembedding."""
    module = bind(cfg, params)
    return module.unembed(module.ln_final(resid))


def token_stats(logits: Array, token_ids: Array) -> dict[str, Array]:
    """Rank, reciprocal rank, probability and logit of chosen tokens.

    logits [..., d_vocab], token_ids [..., n] -> each [..., n]. rank = number of tokens with a
    strictly larger logit (0 = top-1; ties share the better rank); rr = 1 / (rank + 1).
    """
    logits = logits.astype(jnp.float32)
    chosen = jnp.take_along_axis(logits, token_ids, axis=-1)
    rank = (logits[..., None, :] > chosen[..., :, None]).sum(-1).astype(jnp.int32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    prob = jnp.exp(jnp.take_along_axis(logp, token_ids, axis=-1))
    return {"rank": rank, "rr": 1.0 / (rank + 1.0), "prob": prob, "logit": chosen}


def site_cache_names(cfg: ModelConfig, sites: Sequence[str]) -> tuple[str, ...]:
    """Hook point patterns the lens must cache for `sites`."""
    names: list[str] = []
    for site in sites:
        if site == "resid_pre":
            names.append("blocks.*.hook_resid_pre")
        elif site == "resid_post":
            names.append("blocks.*.hook_resid_post")
        elif site == "pre_ffn":
            names += (["blocks.*.hook_resid_post", "blocks.*.hook_mlp_out"] if cfg.parallel_residual
                      else ["blocks.*.hook_resid_mid"])
        else:
            raise ValueError(f"Unknown lens site {site!r}; choose from {SITES}.")
    return tuple(dict.fromkeys(names))


def _stacked(cache: Mapping[str, Array], template: str, n_layers: int) -> Array:
    """[layer, batch, pos, ...] from per-layer cache entries."""
    return jnp.stack([cache[f"blocks.{l}.{template}"] for l in range(n_layers)])


def _at(stacked: Array, read_pos: Array) -> Array:
    """[layer, batch, pos, d] at each example's read position -> [batch, layer, d]."""
    picked = stacked[:, jnp.arange(stacked.shape[1]), read_pos]  # [layer, batch, d]
    return jnp.swapaxes(picked, 0, 1)


def site_residuals(cfg: ModelConfig, cache: Mapping[str, Array], read_pos: Array, site: str) -> Array:
    """The residual of `site` at the read position of each example: [batch, layer, d_model]."""
    L = cfg.n_layers
    if site == "pre_ffn" and cfg.parallel_residual:
        post = _at(_stacked(cache, "hook_resid_post", L), read_pos)
        return post - _at(_stacked(cache, "hook_mlp_out", L), read_pos)
    template = {"resid_pre": "hook_resid_pre", "pre_ffn": "hook_resid_mid", "resid_post": "hook_resid_post"}[site]
    return _at(_stacked(cache, template, L), read_pos)


def lens_stats(params: dict, tokens: Array, read_pos: Array, token_ids: Array, hooks: Hooks | None = None, *,
               cfg: ModelConfig, sites: tuple[str, ...] = ("pre_ffn", "resid_post"), top_k: int = 5,
               gather: tuple[str, ...] = ()) -> dict[str, Array]:
    """One forward pass and the lens at the read positions (pure; jit with `lens_program`).

    tokens [batch, pos] int32; read_pos [batch]; token_ids [batch, n] (tokens to track).
    Returns rank/rr/prob/logit [site, batch, layer, n], top_ids/top_probs [site, batch, layer, k]
    (sites=() skips the lens: only the output is decoded and the site axis is empty),
    out_* for the model's own output ([batch, n] / [batch, k]) and, per `gather` block template
    (e.g. "hook_mlp_out"), `at/{t}` [batch, layer, ...] at the read position and `sum/{t}` summed
    over positions 0..read_pos.
    """
    module = bind(cfg, params)
    gather_names = tuple(f"blocks.*.{t}" for t in gather)
    hooks = as_hooks(hooks, site_cache_names(cfg, sites) + gather_names)
    out_logits, cache = module([Run(tokens, hooks, logits_at=read_pos)])[0]

    def stats(logits: Array) -> dict[str, Array]:
        result = token_stats(logits, token_ids)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        result["top_probs"], result["top_ids"] = jax.lax.top_k(probs, top_k)
        return result

    out: dict[str, Array] = {f"out_{k}": v for k, v in stats(out_logits).items()}
    per_site = []
    for site in sites:
        resid = jnp.swapaxes(site_residuals(cfg, cache, read_pos, site), 0, 1)  # [layer, batch, d]
        per_layer = jax.lax.map(lambda r: stats(module.unembed(module.ln_final(r))), resid)
        per_site.append({k: jnp.swapaxes(v, 0, 1) for k, v in per_layer.items()})  # [batch, layer, ...]
    for key in ("rank", "rr", "prob", "logit", "top_ids", "top_probs"):
        if per_site:
            out[key] = jnp.stack([s[key] for s in per_site])
        else:  # output only: keep the documented shapes, with an empty site axis
            width = top_k if key.startswith("top") else token_ids.shape[-1]
            out[key] = jnp.zeros((0, tokens.shape[0], cfg.n_layers, width), out[f"out_{key}"].dtype)
    real = jnp.arange(tokens.shape[1])[None, :] <= read_pos[:, None]  # right padding
    for template in gather:
        stacked = _stacked(cache, template, cfg.n_layers)
        out[f"at/{template}"] = _at(stacked, read_pos)
        mask = real.reshape(real.shape + (1,) * (stacked.ndim - 3)).astype(stacked.dtype)
        out[f"sum/{template}"] = jnp.swapaxes((stacked * mask).sum(2), 0, 1)
    return out


lens_program = jax.jit(lens_stats, static_argnames=("cfg", "sites", "top_k", "gather"))


# --------------------------------------------------------------------------- batching

def pad_prompts(rows: Sequence[Sequence[int]], pad_id: int = 0, multiple: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token rows to a common length (rounded up to `multiple`, so similar batches share
    one compilation) -> tokens [batch, pos] int32, read_pos [batch] (each row's last token)."""
    if not rows:
        raise ValueError("No prompts given.")
    lengths = np.array([len(r) for r in rows])
    if (lengths == 0).any():
        raise ValueError(f"Prompt {int(np.argmin(lengths))} is empty.")
    width = int(-(-lengths.max() // multiple) * multiple)
    tokens = np.full((len(rows), width), pad_id, np.int32)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = r
    return tokens, (lengths - 1).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class LensResult:
    """Lens of a batch. Dims: rank/rr/prob/logit [site, batch, layer, token]; top_ids/top_probs
    [site, batch, layer, k]; out_* the model output ([batch, token] / [batch, k]); `gathered`
    holds the `gather` activations (`at/{t}`, `sum/{t}`, [batch, layer, ...])."""

    sites: tuple[str, ...]
    token_ids: np.ndarray
    rank: np.ndarray
    rr: np.ndarray
    prob: np.ndarray
    logit: np.ndarray
    top_ids: np.ndarray
    top_probs: np.ndarray
    out_rank: np.ndarray
    out_rr: np.ndarray
    out_prob: np.ndarray
    out_logit: np.ndarray
    out_top_ids: np.ndarray
    out_top_probs: np.ndarray
    read_pos: np.ndarray
    gathered: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def site(self, name: str) -> int:
        if name not in self.sites:
            raise KeyError(f"Site {name!r} was not decoded; this result has {self.sites}.")
        return self.sites.index(name)

    @property
    def out_top1(self) -> np.ndarray:
        """[batch] the model's top-1 next token."""
        return self.out_top_ids[:, 0]


def _encode_rows(model: Any, prompts: Sequence[str] | Sequence[Sequence[int]]) -> list[list[int]]:
    if len(prompts) and isinstance(prompts[0], str):
        if model.tokenizer is None:
            raise ValueError("This model has no tokenizer; pass token id rows instead of text.")
        return [list(model.tokenizer.encode(p)) for p in prompts]
    return [list(map(int, r)) for r in prompts]


def chunk_indices(n: int, pos: int, chunk_tokens: int = 2048, fixed: bool = False,
                  multiple: int = 1) -> list[np.ndarray]:
    """Example indices per chunk of about `chunk_tokens` tokens. Every chunk has the same size
    (the last is padded by repeating its first example), so one compilation serves them all;
    `fixed` keeps that size even when n is smaller, so differently sized batches of the same
    length share the compilation too. `multiple`: the chunk size is rounded up to a multiple of
    it (the data-axis size of a mesh, so each chunk splits evenly over the devices)."""
    size = max(1, chunk_tokens // pos)
    size = size if fixed else min(n, size)
    size = -(-size // multiple) * multiple
    chunks = []
    for start in range(0, n, size):
        idx = np.arange(start, start + size)
        chunks.append(np.where(idx < n, idx, start))
    return chunks


def collect_chunks(pieces: Sequence[Mapping[str, Any]], n: int, batch_axis: Callable[[str], int]) -> dict[str, np.ndarray]:
    """Concatenate per-chunk outputs along their batch axis and drop the padding repeats."""
    joined = {k: np.concatenate([np.asarray(p[k]) for p in pieces], axis=batch_axis(k)) for k in pieces[0]}
    return {k: np.take(v, np.arange(n), axis=batch_axis(k)) for k, v in joined.items()}


def lens_batch_axis(key: str) -> int:
    """Batch axis of a `lens_stats` output: 0 for out_*/at/*/sum/*, 1 for per-site arrays."""
    return 0 if key.startswith(("out_", "at/", "sum/")) else 1


def result_from_arrays(arrays: Mapping[str, np.ndarray], sites: tuple[str, ...], token_ids: np.ndarray,
                       read_pos: np.ndarray) -> LensResult:
    arrays = dict(arrays)
    gathered = {k: arrays.pop(k) for k in list(arrays) if k.startswith(("at/", "sum/"))}
    return LensResult(sites=sites, token_ids=token_ids, read_pos=read_pos, gathered=gathered, **arrays)


def check_token_ids(token_ids: Any, n: int, d_vocab: int) -> np.ndarray:
    """[batch, n_tokens] int32 (a [batch] vector becomes one column), range-checked."""
    ids = np.asarray(token_ids, np.int32)
    ids = ids[:, None] if ids.ndim == 1 else ids
    if ids.ndim != 2 or ids.shape[0] != n:
        raise ValueError(f"token_ids must be [batch, n] with batch = {n} prompts; got shape {np.shape(token_ids)}.")
    if (ids < 0).any() or (ids >= d_vocab).any():
        raise ValueError(f"token_ids must lie in 0..{d_vocab - 1}.")
    return ids


def logit_lens(model: Any, prompts: Sequence[str] | Sequence[Sequence[int]], token_ids: Any, *,
               sites: Sequence[str] = ("pre_ffn", "resid_post"), top_k: int = 5, hooks: HooksArg = None,
               gather: Sequence[str] = (), params: dict | None = None, pad_id: int = 0,
               pad_multiple: int = 16, chunk_tokens: int = 2048, mesh: Any = None) -> LensResult:
    """The logit lens of `prompts` (texts or token rows) at each prompt's last token.

    token_ids: [batch, n] (or [batch]) tokens whose rank/rr/prob to track per layer.
    hooks: interventions applied during the pass: a `Hooks` that broadcasts over the batch, or
    `hooks(indices, pos) -> Hooks` for the chunk holding examples `indices` padded to `pos`.
    Prompts run in chunks of about `chunk_tokens` tokens, all of one shape (one compilation).
    mesh (`jaxcirc.sharding.make_mesh`): each chunk over `data` (its size is rounded up to a
    multiple of it; the padding repeats are dropped), large weights over `model`.
    """
    cfg = model.config
    params = model.params if params is None else params
    sites = tuple(sites)
    if not sites or any(s not in SITES for s in sites):
        raise ValueError(f"sites must be a non-empty subset of {SITES}; got {sites}.")
    rows = _encode_rows(model, prompts)
    ids = check_token_ids(token_ids, len(rows), cfg.d_vocab)
    tokens, read_pos = pad_prompts(rows, pad_id, pad_multiple)
    if tokens.shape[1] > cfg.n_ctx:
        raise ValueError(f"Longest prompt has {int(read_pos.max()) + 1} tokens; the model's context is {cfg.n_ctx}.")
    pos = tokens.shape[1]
    pieces = []
    data = 1 if mesh is None else dict(mesh.shape).get(DATA, 1)
    if mesh is not None:
        params = shard_params(params, mesh, cfg)
    for idx in chunk_indices(len(rows), pos, chunk_tokens, multiple=data):
        chunk_hooks = hooks(idx, pos) if callable(hooks) else hooks
        inputs = (jnp.asarray(tokens[idx]), jnp.asarray(read_pos[idx]), jnp.asarray(ids[idx]), chunk_hooks)
        if mesh is not None:
            inputs = shard_along_batch(inputs, mesh, len(idx))
        pieces.append(to_host(lens_program(params, *inputs, cfg=cfg, sites=sites, top_k=top_k,
                                           gather=tuple(gather))))
    return result_from_arrays(collect_chunks(pieces, len(rows), lens_batch_axis), sites, ids, read_pos)


# --------------------------------------------------------------------------- presentation

def top_k_table(result: LensResult, token_str: Callable[[int], str], example: int = 0,
                site: str = "resid_post") -> list[str]:
    """One line per layer: the top-k tokens (with probabilities) of one example at one site."""
    s = result.site(site)
    lines = []
    for layer in range(result.top_ids.shape[2]):
        cells = [f"{token_str(int(t))!r} {p:.2f}" for t, p in zip(result.top_ids[s, example, layer],
                                                                    result.top_probs[s, example, layer])]
        lines.append(f"{layer:>3}: " + ", ".join(cells))
    return lines


def rank_figure(curves: Mapping[str, np.ndarray], title: str = "", ylabel: str = "reciprocal rank",
                marks: Mapping[str, float] | None = None):
    """Lines over layers. curves: label -> [batch, layer] (mean drawn, interquartile band) or [layer].
    marks: label -> layer drawn as a vertical dashed line (e.g. a stage layer)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    for label, values in curves.items():
        values = np.asarray(values, float)
        if values.ndim == 2 and values.shape[0] == 0:
            continue
        layers = np.arange(values.shape[-1])
        if values.ndim == 2:
            line, = ax.plot(layers, values.mean(0), label=label)
            lo, hi = np.percentile(values, [25, 75], axis=0)
            ax.fill_between(layers, lo, hi, color=line.get_color(), alpha=0.15)
        else:
            ax.plot(layers, values, label=label)
    top = ax.get_ylim()[1]
    for i, (label, layer) in enumerate((marks or {}).items()):
        if layer is not None and np.isfinite(layer):
            ax.axvline(layer, ls="--", lw=1, color="grey")
            ax.text(layer, top * (1 - 0.07 * i), f" {label}", va="top", fontsize=8, color="grey")
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig
