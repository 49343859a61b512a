"""`jaxcirc patch` and `jaxcirc attribute`: patching sweeps and attribution on minimal pairs from a
JSONL file, each written as a run directory (arrays with named dims, heatmaps, report.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from jaxcirc.pairs import MinimalPairs, from_jsonl

ATTRIBUTION_METHODS = ("atp", "atp-star", "eap", "eap-ig")


def load_pairs(model, pairs_file: str | Path, max_pairs: int | None = None) -> tuple[MinimalPairs, Any]:
    """Pairs from JSONL; pairs that do not fit the tokenizer are skipped and counted in the report."""
    if model.tokenizer is None:
        raise ValueError(f"{model.source} has no tokenizer, so text pairs cannot be encoded.")
    pairs, report = from_jsonl(pairs_file, model.tokenizer, on_error="skip")
    if len(pairs) == 0:
        raise ValueError(f"No usable pairs in {pairs_file}: {report.summary()}")
    if max_pairs is not None and len(pairs) > max_pairs:
        pairs = pairs.take(np.arange(max_pairs))
    return pairs, report


def heatmap(array: np.ndarray, dims: tuple[str, ...], title: str):
    """A 2-D heatmap of `array` (extra trailing dims are averaged, NaN-aware)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = np.asarray(array, np.float64)
    while values.ndim > 2:
        values = np.nanmean(values, axis=-1)
    if values.ndim == 1:
        values = values[:, None]
    limit = np.nanmax(np.abs(values)) if np.isfinite(values).any() else 1.0
    figure, axis = plt.subplots(figsize=(max(4, 0.35 * values.shape[1] + 2), max(3, 0.22 * values.shape[0] + 1.5)))
    image = axis.imshow(values, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto", interpolation="nearest")
    axis.set_ylabel(dims[0])
    axis.set_xlabel(dims[1] if len(dims) > 1 else "")
    axis.set_title(title)
    figure.colorbar(image, ax=axis)
    return figure


def _top_entries(array: np.ndarray, dims: tuple[str, ...], k: int = 10) -> list[str]:
    values = np.nan_to_num(np.asarray(array, np.float64))
    order = np.argsort(-np.abs(values), axis=None)[:k]
    lines = []
    for flat in order:
        index = np.unravel_index(flat, values.shape)
        where = ", ".join(f"{d}={i}" for d, i in zip(dims, index))
        lines.append(f"| {where} | {values[index]:+.4f} |")
    return lines


def patch_command(model_name: str, pairs_file: str | Path, out_dir: str | Path, *, site: str = "resid_pre",
                  by: str = "layer,pos", metric: str = "logit_diff", direction: str = "denoising",
                  source: str = "resample", max_pairs: int | None = None, overwrite: bool = False,
                  budget: str | int | None = None, chunk: int | None = None, mesh: str | None = None) -> Path:
    """Exact activation patching of `site` by `by` over the pairs of `pairs_file`; writes a run dir.
    budget: bytes per device (or '2GiB'); chunk: patches per vmapped chunk; mesh: 'auto' | 'DxM'."""
    from jaxcirc.loading import load
    from jaxcirc.memory import parse_bytes
    from jaxcirc.patching import patch_sweep
    from jaxcirc.rundir import write_run
    from jaxcirc.sharding import mesh_from_spec

    model = load(model_name)
    pairs, report = load_pairs(model, pairs_file, max_pairs)
    result = patch_sweep(model, pairs, site, by, metric=metric, direction=direction, source=source,
                         max_patches_per_chunk=chunk, mesh=mesh_from_spec(mesh),
                         memory_budget_bytes=None if budget is None else parse_bytes(budget))
    title = f"{site} by {','.join(result.dims)} ({direction}, {source}): normalised {metric}"
    figures = {"patch_effect": heatmap(result.normalised, result.dims, title)}
    lines = [f"# Activation patching: {site} by {', '.join(result.dims)}", "",
             f"Model `{model_name}` ({model.source_hash[:12]}), pairs `{pairs_file}`: {len(pairs)} used "
             f"({report.summary()}).", "",
             f"Metric {metric}; {direction} (patched values: {source}); clean {np.mean(result.clean_metric):.4f}, "
             f"corrupted {np.mean(result.corrupt_metric):.4f}. {result.n_patches} patches in "
             f"{result.n_chunks} chunks of {result.chunk_size}, one compiled program.", "",
             "Largest normalised effects (0 = corrupted run, 1 = clean run):", "",
             "| patch | normalised effect |", "|---|---|", *_top_entries(result.normalised - (direction == "noising"), result.dims),
             "", "![patch effect](figures/patch_effect.png)", ""]
    return write_run(out_dir, command="patch", model=model, overwrite=overwrite,
                     config={"model": model_name, "pairs": str(pairs_file), **result.metadata(),
                             "pairs_report": report.summary()},
                     arrays=result.arrays(), scalars={"n_pairs": len(pairs)}, figures=figures,
                     report="\n".join(lines))


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    return float(np.corrcoef(a[keep], b[keep])[0, 1])


def attribute_command(model_name: str, pairs_file: str | Path, out_dir: str | Path, *, method: str = "atp",
                      metric: str = "logit_diff", steps: int = 5, max_pairs: int | None = None,
                      batch_size: int | None = 8, validate: bool = False, overwrite: bool = False,
                      budget: str | int | None = None, mesh: str | None = None) -> Path:
    """Attribution over the pairs of `pairs_file` by `method` (atp | atp-star | eap | eap-ig).

    budget: bytes per device (or '2GiB') choosing the pairs per chunk (instead of `batch_size`);
    mesh: 'auto' | 'D' | 'DxM' (pairs over data, weights over model).

    `validate` (AtP methods) also runs exact head patching (noising) and reports the Pearson
    correlation between the attribution and the exact effects over heads.
    """
    from jaxcirc.attribution import atp
    from jaxcirc.eap import eap
    from jaxcirc.loading import load
    from jaxcirc.memory import parse_bytes
    from jaxcirc.rundir import write_run
    from jaxcirc.sharding import mesh_from_spec

    if method not in ATTRIBUTION_METHODS:
        raise ValueError(f"Unknown method {method!r}; choose from {', '.join(ATTRIBUTION_METHODS)}.")
    model = load(model_name)
    pairs, report = load_pairs(model, pairs_file, max_pairs)
    cfg, params = model.config, model.params
    scale = dict(mesh=mesh_from_spec(mesh), memory_budget_bytes=None if budget is None else parse_bytes(budget))
    if budget is not None:
        batch_size = None  # the budget picks the chunk size
    scalars: dict[str, Any] = {"n_pairs": len(pairs)}
    figures, lines = {}, [f"# Attribution ({method}) on `{model_name}`", "",
                          f"Pairs `{pairs_file}`: {len(pairs)} used ({report.summary()}); metric {metric}. "
                          "Scores estimate metric(clean run with the component or edge patched from the "
                          "corrupted run) - metric(clean run), mean over pairs.", ""]
    if method in ("atp", "atp-star"):
        star = method == "atp-star"
        result = atp(cfg, params, pairs, metric=metric, sites=("head", "mlp_out", "resid_pre"),
                     qk_fix=star, grad_drop=star, batch_size=batch_size, **scale)
        arrays = result.arrays()
        config = {"model": model_name, "pairs": str(pairs_file), "max_pairs": max_pairs, "method": method,
                  "metric": metric, **{k: v for k, v in result.metadata.items() if isinstance(v, (str, int, float, bool))}}
        for site in ("head", "mlp_out", "resid_pre"):
            values = np.asarray(result[site])
            dims = tuple(result.dims[site])
            figures[f"attribution_{site}"] = heatmap(values, dims, f"{method} {site}")
            lines += [f"## {site}", "", "| component | score |", "|---|---|", *_top_entries(values, dims), "",
                      f"![{site}](figures/attribution_{site}.png)", ""]
        if validate:
            from jaxcirc.patching import patch_sweep

            exact = patch_sweep(model, pairs, "z", "layer,head", metric=metric, direction="noising")
            r = _pearson(result["head"], exact.change)
            scalars["pearson_atp_vs_exact_heads"] = r
            arrays["exact_head_patching_change"] = (exact.change, exact.dims)
            lines += ["## Validation against exact patching", "",
                      f"Pearson r between {method} head scores and exact head-output patching (noising, "
                      f"{exact.n_patches} patched forwards): **{r:.3f}**.", ""]
    else:
        result = eap(cfg, params, pairs, metric=metric, method=method, steps=steps, batch_size=batch_size, **scale)
        arrays = {"edge_scores": (np.asarray(result.scores), ("src", "dst"))}
        config = {"model": model_name, "pairs": str(pairs_file), "max_pairs": max_pairs, "method": method,
                  "metric": metric, "steps": result.steps, "src_names": list(result.graph.node_names),
                  "dst_names": list(result.graph.dst_names)}
        node = np.asarray(result.node_scores())
        scalars["n_edges"] = int(result.graph.n_edges)
        lines += ["## Top edges", "", "| edge | score |", "|---|---|",
                  *[f"| {name} | {score:+.5f} |" for name, score in result.top(20)], ""]
        heads = node[[result.graph.head_src(l, h) for l in range(cfg.n_layers) for h in range(cfg.n_heads)]]
        figures["head_node_scores"] = heatmap(heads.reshape(cfg.n_layers, cfg.n_heads), ("layer", "head"),
                                              f"{method}: summed outgoing edge scores per head")
        lines += ["![heads](figures/head_node_scores.png)", ""]
    return write_run(out_dir, command="attribute", model=model, overwrite=overwrite, config=config,
                     arrays=arrays, scalars=scalars, figures=figures, report="\n".join(lines))
