"""`jaxcirc circuit` (a circuit from an EAP/EAP-IG run: concentration, faithfulness by exact edge
patching, drawing) and `jaxcirc compare` (overlap and spectral similarity of several circuits)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from jaxcirc.circuit import Circuit, draw_circuit
from jaxcirc.concentration import concentration, plot_concentration


def circuit_command(run_dir: str | Path, out_dir: str | Path, *, top_edges: int = 200,
                    ablation: str = "corrupt", curve_points: int = 11, overwrite: bool = False) -> Path:
    """Top-`top_edges` circuit of an `jaxcirc attribute --method eap|eap-ig` run, its concentration,
    and its faithfulness measured by exact edge patching on the run's own pairs."""
    from jaxcirc.attribution_report import load_pairs
    from jaxcirc.edge_patch import EdgeLayout
    from jaxcirc.faithfulness import faithfulness, faithfulness_curve, plot_faithfulness_curve
    from jaxcirc.loading import load
    from jaxcirc.rundir import read_run, write_run

    results, arrays = read_run(run_dir)
    if "edge_scores" not in arrays:
        raise ValueError(f"{run_dir} has no edge_scores; make it with `jaxcirc attribute MODEL --pairs FILE "
                         "--method eap-ig --out DIR`.")
    config = results["config"]
    model = load(config["model"])
    if model.source_hash != results["model"]["hash"]:
        raise ValueError(f"The model {config['model']!r} now has hash {model.source_hash[:12]}, not the "
                         f"{results['model']['hash'][:12]} the attribution run used.")
    pairs, _ = load_pairs(model, config["pairs"], config.get("max_pairs"))  # the pairs the scores came from
    layout = EdgeLayout.canonical(model.config)
    scores = arrays["edge_scores"]
    provenance = {"model": config["model"], "model_hash": model.source_hash, "pairs": config["pairs"],
                  "method": config["method"], "metric": config["metric"], "attribution_run": str(run_dir)}
    circuit = Circuit.from_scores(scores, layout, top_k=top_edges, provenance=provenance)
    conc = concentration(circuit)
    faith = faithfulness(model, pairs, circuit, ablation=ablation, metric=config["metric"], layout=layout)
    curve = faithfulness_curve(model, pairs, scores, n_points=curve_points, ablation=ablation,
                               metric=config["metric"], layout=layout)
    summary = conc.summary()
    lines = [f"# Circuit: top {top_edges} edges of `{run_dir}`", "",
             f"Model `{config['model']}`, {config['method']} ({config['metric']}), {len(pairs)} pairs.", "",
             f"- nodes spanned: **{conc.n_nodes}**; share of attribution mass in the top 20 nodes: "
             f"**{conc.share(20):.1%}**, top 28: {conc.share(28):.1%}",
             f"- faithfulness (exact edge patching, non-circuit edges {ablation}): **{faith.faithfulness:.3f}**; "
             f"necessity (circuit edges patched): {faith.necessity:.3f}",
             f"- faithfulness-vs-edges curve area: {curve.area:.3f}", "",
             "![circuit](figures/circuit.png)", "![concentration](figures/concentration.png)",
             "![faithfulness](figures/faithfulness_curve.png)", ""]
    out = write_run(out_dir, command="circuit", model=model, overwrite=overwrite,
                    config={"run_dir": str(run_dir), "top_edges": top_edges, "ablation": ablation},
                    arrays={"node_mass": (conc.mass, ("node",)), "cumulative_share": (conc.cumulative, ("rank",)),
                            "curve_edges": (curve.n_edges, ("point",)),
                            "curve_faithfulness": (curve.faithfulness, ("point",))},
                    scalars={"concentration": summary, "faithfulness": faith.to_dict(), "curve_area": curve.area},
                    figures={"circuit": functools.partial(draw_circuit, circuit),
                             "concentration": functools.partial(plot_concentration, conc),
                             "faithfulness_curve": functools.partial(plot_faithfulness_curve, curve, mark=top_edges)},
                    report="\n".join(lines))
    circuit.to_json(out / "circuit.json")
    return out


def _matrix_figure(matrix: np.ndarray, labels: list[str], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(2 + 0.6 * len(labels), 1.5 + 0.5 * len(labels)))
    image = axis.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    axis.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    axis.set_yticks(range(len(labels)), labels)
    for i in range(len(labels)):
        for j in range(len(labels)):
            axis.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", color="w", fontsize=8)
    axis.set_title(title)
    figure.colorbar(image, ax=axis)
    return figure


def compare_command(circuit_files: list[str | Path], out_dir: str | Path, *, bins: int = 10, k: int = 16,
                    overwrite: bool = False) -> Path:
    """Node/edge overlap (by index and by depth bins) and spectral similarity of several circuits."""
    from jaxcirc.overlap import matching_rule, overlap_matrix
    from jaxcirc.rundir import write_run
    from jaxcirc.spectral import compare_spectra

    if len(circuit_files) < 2:
        raise ValueError("Give at least two circuit files (circuit.json from `jaxcirc circuit`).")
    paths = [Path(p) / "circuit.json" if Path(p).is_dir() else Path(p) for p in circuit_files]
    circuits = [Circuit.from_json(p) for p in paths]
    labels = [p.parent.name if p.name == "circuit.json" else p.stem for p in paths]
    arrays: dict[str, Any] = {}
    figures = {}
    rules = {}
    for rule in ("index", "depth"):
        nodes, edges = overlap_matrix(circuits, rule=rule, bins=bins)
        arrays[f"node_jaccard_{rule}"] = (nodes, ("circuit", "circuit"))
        arrays[f"edge_jaccard_{rule}"] = (edges, ("circuit", "circuit"))
        rules[rule] = matching_rule(rule, bins)
        figures[f"node_overlap_{rule}"] = _matrix_figure(nodes, labels, f"node Jaccard ({rule})")
    spectral = compare_spectra(circuits, k=k)
    arrays["spectral_similarity"] = (spectral.similarity, ("circuit", "circuit"))
    arrays["heat_trace_distance"] = (spectral.heat_distance, ("circuit", "circuit"))
    figures["spectral_similarity"] = _matrix_figure(spectral.similarity, labels, f"spectral similarity (top {k})")
    off = ~np.eye(len(circuits), dtype=bool)
    lines = ["# Circuit comparison", "", "Circuits: " + ", ".join(f"`{l}`" for l in labels), "",
             "| measure | min | max |", "|---|---|---|"]
    for name in ("node_jaccard_index", "edge_jaccard_index", "node_jaccard_depth", "edge_jaccard_depth",
                 "spectral_similarity"):
        values = arrays[name][0][off]
        lines.append(f"| {name} | {values.min():.3f} | {values.max():.3f} |")
    lines += ["", *[f"![{n}](figures/{n}.png)" for n in figures], ""]
    return write_run(out_dir, command="compare", overwrite=overwrite,
                     config={"circuits": [str(p) for p in paths], "labels": labels, "matching": rules,
                             "spectral": spectral.settings},
                     arrays=arrays, figures=figures, report="\n".join(lines))
