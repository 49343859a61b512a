"""`jaxcirc position MODEL --out DIR`: the position-generalization analyses of Han & Ji, end to end.

    from jaxcirc.position_report import position_command
    position_command("smollm2-135m", "runs/position", n_texts=4, seq_len=256)   # about 4 min on 2 CPU cores

On natural text shipped with jaxcirc (`jaxcirc/data/natural_text.txt`), for the trained model and
randomly initialised copies of its architecture (several initialisations and seeds):
  * the three-term decomposition of every layer's and head's pre-softmax logits (r, the
    within-query r, the unique variance share of each term), `position_decomposition.decompose`;
  * the dummy-distance test (real queries and keys at artificial distances, f_d + g_j);
  * per-frequency query/key statistics (`qk_features`);
and, for the trained model, token-shuffle and position-id perturbation curves and the cost of
LM-Infinite attention inside the trained length. Writes a run directory (`jaxcirc.rundir`).
"""

from __future__ import annotations

import functools
import importlib.resources
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcirc import rundir
from jaxcirc.attention_logits import cache_qk, dummy_distance_logits, expand_kv, logits_from_qk
from jaxcirc.models.config import ModelConfig
from jaxcirc.models.transformer import init_params
from jaxcirc.position_decomposition import _decompose, decomposition_terms, Decomposition, summarize, two_axis_fit
from jaxcirc.models.config import AttentionWindow
from jaxcirc.position_perturbation import perturbation_curve, windowed_nll
from jaxcirc.qk_features import band_summary, frequency_stats

Array = jax.Array

PAPER_R = 0.959
PAPER_SHUFFLE = "little change in perplexity and downstream scores up to 5 % of tokens shuffled, significant degradation beyond 10 %"

INITS = ("hf_normal_0.02", "fan_in", "unit_normal")
INIT_DOC = {
    "hf_normal_0.02": "every matrix normal with std 0.02 (HF `_init_weights` with initializer_range 0.02), norms 1",
    "fan_in": "every matrix normal with std 1/sqrt(fan_in) (unit-variance projections), embedding std 1, norms 1",
    "unit_normal": "every matrix normal with std 1, norms 1",
}


# ----------------------------------------------------------------------------- data


def natural_text() -> str:
    """The English prose shipped with jaxcirc for position analyses (original, CC0), header removed."""
    raw = importlib.resources.files("jaxcirc").joinpath("data/natural_text.txt").read_text(encoding="utf-8")
    return "\n".join(line for line in raw.splitlines() if not line.startswith("#")).strip() + "\n"


def text_chunks(tokenizer, n_texts: int, seq_len: int, text: str | None = None) -> np.ndarray:
    """[n_texts, seq_len] consecutive windows of the tokenized text (no BOS added: the first token of
    each window plays the attention-sink role, and perturbations never move it)."""
    if tokenizer is None:
        raise ValueError("This model has no tokenizer, so the shipped text cannot be tokenized; load a model "
                         "with one (a GGUF file, or an HF directory with tokenizer.json).")
    ids = np.asarray(tokenizer.encode(natural_text() if text is None else text, add_bos=False), np.int32)
    need = n_texts * seq_len
    if ids.size < need:
        raise ValueError(f"The text has {ids.size} tokens, fewer than n_texts * seq_len = {n_texts} * {seq_len} = "
                         f"{need}; lower n_texts or seq_len (at most {ids.size // seq_len} texts of {seq_len}).")
    return ids[:need].reshape(n_texts, seq_len)


# ----------------------------------------------------------------------------- random baselines


def random_params(cfg: ModelConfig, init: str, seed: int) -> dict:
    """Random parameters of `cfg`'s architecture under a named initialisation (see INIT_DOC)."""
    if init == "hf_normal_0.02":
        return init_params(cfg.replace(initializer_range=0.02), seed)
    if init not in INITS:
        raise ValueError(f"Unknown initialisation {init!r}; choose from {INITS}.")
    params = init_params(cfg.replace(initializer_range=1.0), seed)
    if init == "unit_normal":
        return params
    fan_in = {"W_Q": 1, "W_K": 1, "W_V": 1, "W_in": 1, "W_gate": 1, "W_out": 1}  # axis after the layer axis

    def scale(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "W_O":  # [layer, head, d_head, d_model]
            return leaf / math.sqrt(leaf.shape[1] * leaf.shape[2])
        if name in fan_in:
            return leaf / math.sqrt(leaf.shape[fan_in[name]])
        if name == "W_U":  # [d_model, vocab]
            return leaf / math.sqrt(leaf.shape[0])
        return leaf  # W_E (unit variance), norm weights (1), biases (0)

    return jax.tree_util.tree_map_with_path(scale, params)


# ----------------------------------------------------------------------------- per-layer analysis


@functools.partial(jax.jit, static_argnames=("cfg", "sink", "n_distances"))
def _layer(q: Array, k: Array, rot_q: Array, rot_k: Array, query_pos: Array, *, cfg: ModelConfig, sink: str,
           n_distances: int) -> dict[str, Array]:
    """One layer's analyses. q, rot_q [text, pos, head, d_head]; k, rot_k [text, pos, kv, d_head]."""
    logits = logits_from_qk(rot_q, rot_k, cfg=cfg)  # [text, head, q, k]
    dec = _decompose(logits, sink=sink, max_iter=500, tol=1e-6, shares=True)
    # Dummy-distance test: a real query of this text against every real key (sink key left out)
    # placed at every distance 0..n_distances-1.
    queries = jnp.moveaxis(q[:, query_pos], 1, 2)  # [text, head, query, d_head]
    keys = jnp.moveaxis(expand_kv(k, cfg.n_heads), 1, 2)[:, :, None, 1:]  # [text, head, 1, key, d_head]
    table = dummy_distance_logits(queries, keys, jnp.arange(n_distances), cfg)  # [text, head, query, D, key]
    two = two_axis_fit(table)
    out = {name: dec[name] for name in ("r", "r_within_query", "distance_share", "query_share", "key_share",
                                         "r_distance_only")}
    out.update(dummy_r=two.r, dummy_distance_share=two.distance_share, dummy_key_share=two.key_share,
               dummy_key_rank=two.key_rank_invariance)
    return out


LAYER_FIELDS = ("r", "r_within_query", "distance_share", "query_share", "key_share", "r_distance_only",
                "dummy_r", "dummy_distance_share", "dummy_key_share", "dummy_key_rank")
LAYER_DIMS = {name: ("layer", "text", "head") for name in LAYER_FIELDS[:6]}
LAYER_DIMS.update({name: ("layer", "text", "head", "query") for name in LAYER_FIELDS[6:]})


def analyze(model, tokens: np.ndarray, *, params: dict | None = None, sink: str = "exclude", n_queries: int = 4,
            n_distances: int | None = None, keep_qk: bool = False) -> dict[str, Any]:
    """Decomposition, dummy-distance and feature statistics of one parameter set on tokens [text, pos].

    Returns arrays by name (LAYER_FIELDS [layer, text, head(, query)], q_/k_ feature statistics
    [layer, head, pair]) and, with keep_qk, the cached `QK` under "qk"."""
    cfg = model.config
    n = tokens.shape[1]
    qk = cache_qk(model, tokens, params=params)
    # Queries from the second half of each text: they have long histories at every distance.
    query_pos = jnp.asarray(np.linspace(n // 2, n - 1, n_queries).round().astype(np.int32))
    per_layer = [_layer(qk.q[l], qk.k[l], qk.rot_q[l], qk.rot_k[l], query_pos, cfg=cfg, sink=sink,
                        n_distances=n_distances or n) for l in range(cfg.n_layers)]
    out: dict[str, Any] = {name: np.stack([np.asarray(p[name]) for p in per_layer]) for name in LAYER_FIELDS}
    for which, x in (("q", qk.q), ("k", qk.k)):
        stats = frequency_stats(x, cfg)
        for field in ("variance_ratio", "concentration", "magnitude"):
            out[f"{which}_{field}"] = np.asarray(getattr(stats, field))
        out[f"{which}_bands"] = band_summary(stats, n)
        out["theta"], out["wavelength"] = stats.theta, stats.wavelength
    out["query_pos"] = np.asarray(query_pos)
    if keep_qk:
        out["qk"] = qk
    return out


def example_heads(r: np.ndarray) -> dict[str, tuple[int, int]]:
    """(layer, head) of the heads with the highest, median and lowest text-averaged r."""
    mean = np.nanmean(r, axis=1)  # [layer, head]
    flat = mean.ravel()
    order = np.argsort(flat)
    pick = {"highest r": order[-1], "median r": order[len(order) // 2], "lowest r": order[0]}
    return {name: tuple(int(v) for v in np.unravel_index(i, mean.shape)) for name, i in pick.items()}


def head_maps(cfg: ModelConfig, qk, layer: int, head: int, text: int, sink: str) -> dict[str, np.ndarray]:
    """Logit map, fitted distance term a(i-j) and key term c(j) of one head [pos, pos] (NaN above the diagonal)."""
    logits = logits_from_qk(qk.rot_q[layer, text], qk.rot_k[layer, text], fill=jnp.nan, cfg=cfg)[head]
    n = logits.shape[-1]
    out = _decompose(jnp.where(jnp.isnan(logits), 0.0, logits)[None], sink=sink, max_iter=500, tol=1e-6, shares=False)
    dec = Decomposition(**{k: v for k, v in out.items() if k != "iterations"}, sink=sink, iterations=0)
    distance, _, key = decomposition_terms(dec, n)
    distance, key = np.array(distance[0]), np.array(key[0])
    if sink == "exclude":  # the sink column was not fitted
        distance[:, 0] = key[:, 0] = np.nan
    return {"logits": np.asarray(logits), "distance_term": distance, "key_term": key}


# ----------------------------------------------------------------------------- the command


def position_command(model: str | Any, out_dir: str | Path, *, n_texts: int = 4, seq_len: int = 256,
                     seeds: Sequence[int] = (0,), inits: Sequence[str] = INITS, random_texts: int | None = None,
                     fractions: Sequence[float] = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2), perturb_texts: int = 4,
                     n_queries: int = 4, sink: str = "exclude", lm_infinite_len: int = 128,
                     dtype: str = "float32", overwrite: bool = False, show_progress: bool = True) -> Path:
    """Run every position analysis on `model` (a name/path for `jaxcirc.load`, or a loaded `Model`)
    and write a run directory to `out_dir`; returns its path.

    n_texts x seq_len tokens of the shipped text are analysed for the trained model; each random
    initialisation in `inits` is analysed once per seed in `seeds` on the first `random_texts`
    texts (default all: the compiled programs are then shared); perturbation curves use `perturb_texts` texts and one permutation per (fraction, seed);
    LM-Infinite is evaluated on one text of `lm_infinite_len` tokens (0 skips it); evaluation
    beyond the trained length is `jaxcirc length` (`jaxcirc.length_generalization`).
    """
    from jaxcirc.progress import progress

    started = time.perf_counter()
    timings: dict[str, float] = {}
    log = progress if show_progress else (lambda items, description, total=None: items)
    if isinstance(model, (str, Path)):
        from jaxcirc.loading import load

        source_name, model = str(model), load(model, dtype=dtype)
    else:
        source_name = model.source
    cfg = model.config
    if cfg.positional != "rotary":
        raise ValueError(f"{source_name} uses {cfg.positional!r} position embeddings; the position analyses need "
                         "a rotary (RoPE) model such as smollm2-135m, Pythia or a Llama-family checkpoint.")
    if seq_len > cfg.n_ctx:
        raise ValueError(f"seq_len={seq_len} exceeds the model's context window of {cfg.n_ctx}.")
    random_texts = n_texts if random_texts is None else random_texts
    if not 1 <= random_texts <= n_texts or not 1 <= perturb_texts <= n_texts:
        raise ValueError(f"random_texts ({random_texts}) and perturb_texts ({perturb_texts}) must be between 1 and "
                         f"n_texts ({n_texts}).")
    bad = [i for i in inits if i not in INITS]
    if bad:
        raise ValueError(f"Unknown initialisations {bad}; choose from {INITS}.")
    if sink not in ("include", "exclude", "separate"):
        raise ValueError(f"sink must be 'include', 'exclude' or 'separate', got {sink!r}.")
    bad = [f for f in fractions if not 0.0 <= f <= 1.0]
    if bad:
        raise ValueError(f"Perturbation fractions must lie in [0, 1] (0.05 = 5 %), got {bad}.")
    if not seeds:
        raise ValueError("Give at least one seed.")
    if lm_infinite_len and not 16 <= lm_infinite_len <= min(n_texts * seq_len, cfg.n_ctx):
        raise ValueError(f"lm_infinite_len={lm_infinite_len} must be 0 (skip) or between 16 and "
                         f"min(n_texts * seq_len, n_ctx) = {min(n_texts * seq_len, cfg.n_ctx)}.")
    if n_queries < 1 or seq_len < 8:
        raise ValueError(f"Need n_queries >= 1 and seq_len >= 8, got {n_queries} and {seq_len}.")
    tokens = text_chunks(model.tokenizer, n_texts, seq_len)
    timings["load"] = time.perf_counter() - started

    # Trained model, then random copies of the architecture on the same texts.
    t0 = time.perf_counter()
    trained = analyze(model, tokens, sink=sink, n_queries=n_queries, keep_qk=True)
    timings["trained_analysis"] = time.perf_counter() - t0
    runs = {"trained": trained}
    t0 = time.perf_counter()
    jobs = [(init, seed) for init in inits for seed in seeds]
    for init, seed in log(jobs, "random initialisations"):
        runs[f"{init}/seed{seed}"] = analyze(model, tokens[:random_texts], params=random_params(cfg, init, seed),
                                             sink=sink, n_queries=n_queries)
    timings["random_analysis"] = time.perf_counter() - t0

    examples = example_heads(trained["r"])
    maps = {name: head_maps(cfg, trained["qk"], layer, head, 0, sink) for name, (layer, head) in examples.items()}
    del trained["qk"]

    t0 = time.perf_counter()
    curve = perturbation_curve(model, tokens[:perturb_texts], fractions, seeds=seeds, progress=log,
                               batch_size=perturb_texts)
    timings["perturbation"] = time.perf_counter() - t0

    lm_inf = None
    if lm_infinite_len:
        t0 = time.perf_counter()
        lm_inf = lm_infinite_check(model, tokens, lm_infinite_len)
        timings["lm_infinite"] = time.perf_counter() - t0

    summary = summarize_runs(runs)
    verdicts = verdict_lines(summary, curve, lm_inf)
    config = {"model": source_name, "n_texts": n_texts, "seq_len": seq_len, "seeds": list(seeds), "inits": list(inits),
              "init_descriptions": {i: INIT_DOC[i] for i in inits}, "random_texts": random_texts,
              "fractions": list(fractions), "perturb_texts": perturb_texts, "n_queries": n_queries, "sink": sink,
              "lm_infinite_len": lm_infinite_len, "dtype": dtype, "text": "jaxcirc/data/natural_text.txt",
              "models": list(runs), "example_heads": {k: list(v) for k, v in examples.items()}}
    arrays = _arrays(runs, curve, maps, lm_inf)
    scalars = {"summary": summary, "paper_r": PAPER_R, "perturbation": _curve_scalars(curve),
               "lm_infinite": lm_inf and {k: v for k, v in lm_inf.items() if not isinstance(v, np.ndarray)},
               "bands": {name: {"q": run["q_bands"], "k": run["k_bands"]} for name, run in runs.items()},
               "verdicts": verdicts}
    figures = make_figures(runs, curve, maps, examples)
    timings["total"] = time.perf_counter() - started
    scalars["seconds"] = timings
    report = render_report(source_name, config, summary, curve, lm_inf, verdicts, examples, timings, list(figures))
    return rundir.write_run(out_dir, command=f"jaxcirc position {source_name}", config=config, arrays=arrays,
                            scalars=scalars, model=model, figures=figures, report=report, overwrite=overwrite)


def lm_infinite_check(model, tokens: np.ndarray, length: int) -> dict[str, Any]:
    """Next-token loss on one text of `length` tokens with full attention, with LM-Infinite's
    Lambda mask only, and with the mask plus the distance cap (n_global 4, window = cap = length/4),
    scored on the positions past the window (the only ones the approximation changes)."""
    flat = tokens.reshape(-1)
    if flat.size < length:
        raise ValueError(f"lm_infinite_len={length} exceeds the {flat.size} tokens available.")
    if length < 16:
        raise ValueError(f"lm_infinite_len={length} is too short for a window and a prefix; use at least 16 (0 skips).")
    text = flat[:length][None]
    window = length // 4
    specs = {"full": None, "lambda_mask": AttentionWindow(4, window), "lm_infinite": AttentionWindow(4, window, window)}
    out: dict[str, Any] = {"length": length, "n_global": 4, "n_local": window, "max_distance": window}
    for name, spec in specs.items():
        nll, _ = windowed_nll(model, text, spec)
        out[f"nll_{name}"] = nll[0]
        out[f"ppl_{name}"] = float(np.exp(nll[0, window:].mean()))
    return out


# ----------------------------------------------------------------------------- summaries


def _model_kind(name: str) -> str:
    return name.split("/")[0]


def summarize_runs(runs: dict[str, dict]) -> dict[str, dict[str, Any]]:
    """Per model kind (trained, each init pooled over seeds): summaries of every layer field."""
    kinds: dict[str, list[dict]] = {}
    for name, run in runs.items():
        kinds.setdefault(_model_kind(name), []).append(run)
    out = {}
    for kind, items in kinds.items():
        entry: dict[str, Any] = {"runs": len(items)}
        for field in LAYER_FIELDS:
            values = np.concatenate([np.asarray(it[field]).ravel() for it in items])
            entry[field] = summarize(values)
        # Per-head r averaged over texts, then the distribution over (layer, head).
        for which in ("q", "k"):
            pooled = {}
            for band in ("fast", "slow"):
                values = [it[f"{which}_bands"][band] for it in items if band in it[f"{which}_bands"]]
                if values:
                    pooled[band] = {f: float(np.median([v[f] for v in values])) for f in values[0]}
            entry[f"{which}_bands"] = pooled
        per_head = np.concatenate([np.nanmean(it["r"], axis=1).ravel() for it in items])
        entry["r_per_head"] = summarize(per_head)
        entry["r_by_layer"] = np.mean([np.nanmean(it["r"], axis=(1, 2)) for it in items], axis=0).tolist()
        out[kind] = entry
    return out


def _curve_scalars(curve) -> dict[str, Any]:
    out = {}
    for mi, mode in enumerate(curve.modes):
        out[mode] = {
            f"{f:g}": {"ppl": float(curve.ppl[mi, fi].mean()), "ppl_unmoved": float(curve.ppl_unmoved[mi, fi].mean()),
                       "clean_ppl_unmoved": float(curve.clean_ppl_unmoved[mi, fi].mean()),
                       "ppl_ratio_unmoved": float((curve.ppl_unmoved[mi, fi] / curve.clean_ppl_unmoved[mi, fi]).mean()),
                       "accuracy_unmoved": float(curve.accuracy_unmoved[mi, fi].mean()),
                       "clean_accuracy_unmoved": float(curve.clean_accuracy_unmoved[mi, fi].mean()),
                       "moved_fraction": float(curve.moved_fraction[mi, fi].mean())}
            for fi, f in enumerate(curve.fractions)}
    return out


def _ratio_at(curve, mode: str, fraction: float) -> float | None:
    if mode not in curve.modes:
        return None
    hits = np.flatnonzero(np.isclose(curve.fractions, fraction))
    if not hits.size:
        return None
    mi, fi = curve.modes.index(mode), hits[0]
    return float((curve.ppl_unmoved[mi, fi] / curve.clean_ppl_unmoved[mi, fi]).mean())


def verdict_lines(summary: dict, curve, lm_inf: dict | None) -> list[str]:
    """Plain statements of which of the paper's claims the measurements support."""
    lines = []
    t = summary["trained"]
    mean_r, median_r = t["r"]["mean"], t["r"]["median"]
    if abs(mean_r - PAPER_R) <= 0.03:
        verdict = "consistent with"
    elif mean_r > PAPER_R:
        verdict = "above"
    else:
        verdict = "below"
    lines.append(f"Three-term fit r (paper: {PAPER_R}): trained mean {mean_r:.3f}, median {median_r:.3f} over "
                 f"{t['r']['n']} (layer, head, text) fits: {verdict} the paper's value (tolerance 0.03).")
    randoms = {k: v for k, v in summary.items() if k != "trained"}
    for kind, s in randoms.items():
        gap = mean_r - s["r"]["mean"]
        lines.append(
            f"Random init {kind}: mean r {s['r']['mean']:.3f} (median {s['r']['median']:.3f}); trained minus random "
            f"{gap:+.3f}. Within-query r: trained {t['r_within_query']['mean']:.3f} vs {s['r_within_query']['mean']:.3f}; "
            f"unique distance share: trained {t['distance_share']['mean']:.3f} vs {s['distance_share']['mean']:.3f}; "
            f"dummy-distance key-rank invariance: trained {t['dummy_key_rank']['mean']:.3f} vs "
            f"{s['dummy_key_rank']['mean']:.3f}.")
    if randoms:
        high_random = [k for k, s in randoms.items() if s["r"]["mean"] >= mean_r - 0.05]
        if high_random:
            lines.append(f"'Random parameters do not show the pattern': NOT supported by the raw r: {', '.join(high_random)} "
                         "reach(es) a mean r within 0.05 of the trained model, so a high r alone does not show that the "
                         "decomposition is learned; judge it by the estimators that separate position from content "
                         "(within-query r, distance share, dummy-distance key ranking).")
        else:
            lines.append("'Random parameters do not show the pattern': supported for the raw r: every random "
                         "initialisation measured stays more than 0.05 below the trained model.")
    bands = {kind: s.get("k_bands") for kind, s in summary.items()}
    if bands.get("trained") and all(b and "fast" in b and "slow" in b for b in bands.values()):
        parts = [f"{kind}: variance ratio fast {b['fast']['variance_ratio']:.2f} vs slow {b['slow']['variance_ratio']:.2f}, "
                 f"phase concentration fast {b['fast']['concentration']:.2f} vs slow {b['slow']['concentration']:.2f}"
                 for kind, b in bands.items()]
        t_b = bands["trained"]
        learned = (t_b["fast"]["variance_ratio"] < t_b["slow"]["variance_ratio"]
                   and all(abs(np.log(b["fast"]["variance_ratio"] / b["slow"]["variance_ratio"]))
                           < abs(np.log(t_b["fast"]["variance_ratio"] / t_b["slow"]["variance_ratio"]))
                           for kind, b in bands.items() if kind != "trained"))
        lines.append("Feature pattern (keys token-invariant in pairs that turn more than once over the text, content in "
                     "pairs that turn less than a radian): " + "; ".join(parts) + ". "
                     + ("The trained model shows the contrast and the random initialisations show a weaker or no "
                        "contrast: consistent with a learned pattern." if learned else
                        "The trained model does not show a stronger fast/slow contrast than the random "
                        "initialisations: the learned-pattern claim is not supported by these statistics."))
    names = {"tokens": "Token shuffling (moved tokens travel around a random cycle)",
             "adjacent": "Adjacent transpositions (each moved token travels one place)",
             "position_ids": "Position-id permutation (tokens in order, RoPE ids permuted as in the token shuffle)"}
    for mode in curve.modes:
        r5, r10, r20 = (_ratio_at(curve, mode, f) for f in (0.05, 0.10, 0.20))
        if r5 is None:
            continue
        grows = r20 is not None and r20 > r5
        lines.append(
            f"{names[mode]}: perplexity on unmoved targets relative to clean = {r5:.3f} at 5 %"
            + (f", {r10:.3f} at 10 %" if r10 is not None else "") + (f", {r20:.3f} at 20 %" if r20 is not None else "")
            + (". 'Little change up to 5 %' is supported (ratio <= 1.10)" if r5 <= 1.10
               else ". 'Little change up to 5 %' is NOT supported (ratio > 1.10)")
            + ("; the damage grows with the fraction." if grows else "."))
    r5, p5 = _ratio_at(curve, "tokens", 0.05), _ratio_at(curve, "position_ids", 0.05)
    if p5 is not None and r5 is not None:
        lines.append(f"Paper: {PAPER_SHUFFLE}, and position-id perturbation has a similar effect to token shuffling. "
                     f"At 5 %: position ids {p5:.3f} vs token shuffle {r5:.3f}: "
                     f"{'similar' if abs(p5 - r5) <= 0.05 * max(r5, 1) else 'not similar'} here (within 5 %).")
    if lm_inf:
        lines.append(
            f"LM-Infinite inside the trained length ({lm_inf['length']} tokens, window = cap = {lm_inf['n_local']}, "
            f"4 global tokens): perplexity past the window {lm_inf['ppl_full']:.2f} with full attention, "
            f"{lm_inf['ppl_lambda_mask']:.2f} with the Lambda mask alone, {lm_inf['ppl_lm_infinite']:.2f} with the "
            "mask and the distance cap. This is the approximation's cost, not length generalization, which needs "
            "texts longer than the model's trained context.")
    return lines


# ----------------------------------------------------------------------------- output


def _arrays(runs, curve, maps, lm_inf) -> dict[str, tuple[Any, tuple[str, ...]]]:
    arrays: dict[str, tuple[Any, tuple[str, ...]]] = {}
    for name, run in runs.items():
        tag = name.replace("/", "_").replace(".", "p")
        for field in LAYER_FIELDS:
            arrays[f"{tag}__{field}"] = (run[field], LAYER_DIMS[field])
        for which in ("q", "k"):
            for field in ("variance_ratio", "concentration", "magnitude"):
                arrays[f"{tag}__{which}_{field}"] = (run[f"{which}_{field}"], ("layer", "head" if which == "q" else "kv_head", "pair"))
    first = next(iter(runs.values()))
    arrays["theta"] = (first["theta"], ("pair",))
    arrays["query_pos"] = (first["query_pos"], ("query",))
    for name, m in maps.items():
        tag = name.replace(" ", "_")
        for field, value in m.items():
            arrays[f"example_{tag}__{field}"] = (value, ("q_pos", "k_pos"))
    for field in ("ppl", "ppl_unmoved", "accuracy_unmoved", "clean_ppl_unmoved", "clean_accuracy_unmoved"):
        arrays[f"perturb__{field}"] = (getattr(curve, field), ("mode", "fraction", "seed"))
    arrays["perturb__moved_fraction"] = (curve.moved_fraction, ("mode", "fraction", "seed"))
    arrays["perturb__fractions"] = (curve.fractions, ("fraction",))
    if lm_inf:
        for name in ("full", "lambda_mask", "lm_infinite"):
            arrays[f"lm_infinite__nll_{name}"] = (lm_inf[f"nll_{name}"], ("target_pos",))
    return arrays


def make_figures(runs, curve, maps, examples) -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = {}
    kinds: dict[str, list[dict]] = {}
    for name, run in runs.items():
        kinds.setdefault(_model_kind(name), []).append(run)
    colors = dict(zip(kinds, plt.rcParams["axes.prop_cycle"].by_key()["color"]))

    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.linspace(-0.2, 1.0, 61)
    for kind, items in kinds.items():
        values = np.concatenate([np.asarray(it["r"]).ravel() for it in items])
        ax.hist(values[np.isfinite(values)], bins=bins, alpha=0.5, label=kind, color=colors[kind], density=True)
    ax.axvline(PAPER_R, color="k", ls="--", lw=1, label=f"paper {PAPER_R}")
    ax.set_xlabel("Pearson r of logits with a(i-j) + b(i) + c(j)")
    ax.set_ylabel("density over (layer, head, text)")
    ax.legend(fontsize=8)
    ax.set_title("Three-term decomposition: r distribution")
    figures["r_histogram"] = fig

    fields = [("r", "r (three-term fit)"), ("r_within_query", "r within query (row-centred)"),
              ("distance_share", "unique distance share of variance"), ("dummy_key_rank", "dummy-distance key-rank invariance")]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    for ax, (field, label) in zip(axes.ravel(), fields):
        for kind, items in kinds.items():
            axis = (1, 2) if np.ndim(items[0][field]) == 3 else (1, 2, 3)
            per_layer = np.mean([np.nanmean(it[field], axis=axis) for it in items], axis=0)
            ax.plot(per_layer, marker="o", ms=3, label=kind, color=colors[kind])
        if field == "r":
            ax.axhline(PAPER_R, color="k", ls="--", lw=1)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("layer")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Per-layer means (over heads and texts)")
    fig.tight_layout()
    figures["r_per_layer"] = fig

    fig, axes = plt.subplots(len(maps), 3, figsize=(12, 3.6 * len(maps)), squeeze=False)
    for row, (name, m) in enumerate(maps.items()):
        layer, head = examples[name]
        for col, (field, title) in enumerate([("logits", "logits"), ("distance_term", "distance term a(i-j)"),
                                              ("key_term", "key term c(j)")]):
            ax = axes[row, col]
            image = ax.imshow(m[field], cmap="viridis", interpolation="nearest")
            fig.colorbar(image, ax=ax, fraction=0.046)
            ax.set_title(f"L{layer} H{head} ({name}): {title}", fontsize=8)
            ax.set_xlabel("key j")
            ax.set_ylabel("query i")
    fig.tight_layout()
    figures["decomposition_examples"] = fig

    theta = next(iter(runs.values()))["theta"]
    contexts = sorted({int(np.asarray(run["query_pos"]).max()) + 1 for run in runs.values()})
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), sharex=True)
    for row, which in enumerate(("q", "k")):
        for col, field in enumerate(("variance_ratio", "concentration", "magnitude")):
            ax = axes[row, col]
            for kind, items in kinds.items():
                values = np.concatenate([np.asarray(it[f"{which}_{field}"]).reshape(-1, theta.size) for it in items])
                ax.plot(theta, np.median(values, axis=0), marker=".", label=kind, color=colors[kind])
                lo, hi = np.percentile(values, [25, 75], axis=0)
                ax.fill_between(theta, lo, hi, alpha=0.15, color=colors[kind])
            ax.set_xscale("log")
            if field == "magnitude":
                ax.set_yscale("log")
            for context in contexts:  # pairs left of the line turn less than once over the text
                ax.axvline(2 * np.pi / context, color="gray", ls=":", lw=1)
            if field == "variance_ratio":
                ax.set_yscale("log")
            ax.set_title(f"{which}: {field.replace('_', ' ')}", fontsize=9)
            ax.set_xlabel("rotary frequency theta_l (rad / position)")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Per-frequency statistics across tokens (median and IQR over layers x heads); "
                 "dotted: one full turn over the analysed text")
    fig.tight_layout()
    figures["qk_frequency_stats"] = fig

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    pct = curve.fractions * 100
    for mi, mode in enumerate(curve.modes):
        ratio = curve.ppl_unmoved[mi] / curve.clean_ppl_unmoved[mi]
        axes[0].plot(pct, ratio.mean(-1), marker="o", label=f"{mode}")
        axes[1].plot(pct, curve.accuracy_unmoved[mi].mean(-1), marker="o", label=f"{mode}")
    axes[1].plot(pct, curve.clean_accuracy_unmoved[0].mean(-1), ls="--", color="gray", label="clean, same targets")
    axes[0].axvline(5, color="k", ls=":", lw=1)
    axes[0].set_ylabel("perplexity on unmoved targets / clean")
    axes[1].set_ylabel("next-token accuracy on unmoved targets")
    for ax in axes:
        ax.set_xlabel("perturbed tokens (%)")
        ax.legend(fontsize=8)
    fig.suptitle("Position perturbations (trained model)")
    fig.tight_layout()
    figures["perturbation_curves"] = fig
    return figures


def _fmt(s: dict[str, float]) -> str:
    return f"{s['mean']:.3f} / {s['median']:.3f}"


def render_report(source: str, config: dict, summary: dict, curve, lm_inf, verdicts: list[str], examples: dict,
                  timings: dict, figures: list[str]) -> str:
    lines = [f"# Position generalization analyses: {source}", "",
             "Reproduces the measurements of Han & Ji, *Computation Mechanism Behind LLM Position Generalization* "
             "(arXiv 2503.13305) on this model, next to random initialisations of the same architecture.", "",
             f"Text: {config['n_texts']} windows of {config['seq_len']} tokens of `jaxcirc/data/natural_text.txt` "
             f"(original English prose shipped with jaxcirc). Random inits: {', '.join(config['inits'])} x seeds "
             f"{config['seeds']} on {config['random_texts']} windows. Attention-sink column: {config['sink']}.", "",
             "## What the measurements support", ""]
    lines += [f"- {v}" for v in verdicts]
    lines += ["", "## Decomposition summary (mean / median)", "",
              "| model | r | r within query | unique distance share | unique key share | r distance only | "
              "dummy r | dummy key-rank invariance | dummy distance share |",
              "|---|---|---|---|---|---|---|---|---|"]
    for kind, s in summary.items():
        lines.append(f"| {kind} | {_fmt(s['r'])} | {_fmt(s['r_within_query'])} | {_fmt(s['distance_share'])} | "
                     f"{_fmt(s['key_share'])} | {_fmt(s['r_distance_only'])} | {_fmt(s['dummy_r'])} | "
                     f"{_fmt(s['dummy_key_rank'])} | {_fmt(s['dummy_distance_share'])} |")
    lines += ["", f"Paper: r = {PAPER_R} (estimator and averaging not published; here: least squares on the causal "
              "triangle per layer, head and text, then mean / median over all of them).", "",
              "How to read the columns: *r* is the paper's estimator. *r within query* removes each query's mean "
              "from logits and fit first; b(i) is softmax-invariant, so this is the part of the fit attention "
              "actually uses. The *unique shares* are R^2(full) - R^2(without the term): they do not depend on how "
              "the linear trend shared by a(i-j), b(i), c(j) is split. The *dummy* columns place real keys at "
              "artificial distances 0..seq_len-1 for real queries (f_d + g_j); key-rank invariance is the mean "
              "Spearman correlation between the key ranking at each distance and g (1 = the content ranking does "
              "not depend on the distance).", "",
              "Per-layer mean r: " + ", ".join(f"{kind}: [" + " ".join(f"{v:.2f}" for v in s["r_by_layer"]) + "]"
                                               for kind, s in summary.items()), "",
              "## Perturbations (trained model)", "",
              "| mode | fraction | moved | ppl (all targets) | ppl unmoved targets | clean ppl same targets | ratio | "
              "accuracy unmoved | clean accuracy |", "|---|---|---|---|---|---|---|---|---|"]
    for mi, mode in enumerate(curve.modes):
        for fi, f in enumerate(curve.fractions):
            lines.append(
                f"| {mode} | {f:.0%} | {curve.moved_fraction[mi, fi].mean():.3f} | {curve.ppl[mi, fi].mean():.2f} | "
                f"{curve.ppl_unmoved[mi, fi].mean():.2f} | {curve.clean_ppl_unmoved[mi, fi].mean():.2f} | "
                f"{(curve.ppl_unmoved[mi, fi] / curve.clean_ppl_unmoved[mi, fi]).mean():.3f} | "
                f"{curve.accuracy_unmoved[mi, fi].mean():.3f} | {curve.clean_accuracy_unmoved[mi, fi].mean():.3f} |")
    lines += ["", f"Paper: {PAPER_SHUFFLE}. Here a fraction p of the tokens (never the first) is moved: 'tokens' "
              "passes them around one random cycle, 'adjacent' swaps disjoint neighbouring pairs, 'position_ids' keeps "
              "the tokens in order and gives them the permuted position ids of 'tokens'. 'Unmoved targets' are the "
              "next tokens that kept their place; the ratio compares their perplexity with the clean run's on the "
              "same targets.", ""]
    if lm_inf:
        lines += ["## LM-Infinite", "",
                  f"One text of {lm_inf['length']} tokens; global prefix {lm_inf['n_global']}, local window "
                  f"{lm_inf['n_local']}, distance cap {lm_inf['max_distance']}; perplexity over the positions past the "
                  f"window: full {lm_inf['ppl_full']:.3f}, Lambda mask {lm_inf['ppl_lambda_mask']:.3f}, "
                  f"LM-Infinite {lm_inf['ppl_lm_infinite']:.3f}. Evaluation beyond the trained context: `jaxcirc length`.", ""]
    lines += ["## Example heads", ""]
    lines += [f"- {name}: layer {l}, head {h}" for name, (l, h) in examples.items()]
    lines += ["", "## Figures", ""] + [f"![{f}](figures/{f}.png)" for f in figures]
    lines += ["", "## Timings (s)", "", ", ".join(f"{k} {v:.1f}" for k, v in timings.items()), ""]
    return "\n".join(lines)
