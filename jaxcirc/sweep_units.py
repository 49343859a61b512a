"""The methods a sweep can run, one unit at a time (used by `jaxcirc.sweep`).

Each method declares its options (default and allowed values, checked before a sweep starts) and
a function (model, pairs, options) -> UnitResult: named arrays with dims plus scalar summaries
(plain floats) that the sweep gathers into one table. Every method also reports the unpatched
clean and corrupted metric (`metric_clean`, `metric_corrupt`, mean over pairs) and `n_pairs`.

    METHODS["atp"].run(model, pairs, {"metric": "logit_diff", "star": False, "batch_size": 8})

Methods (see `Method.summary`): atp, eap, eap_ig, patch_resid, patch_heads, logit_lens. All are
deterministic (no random draws), so the same unit on the same machine gives the same numbers.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from jaxcirc.metrics import METRICS
from jaxcirc.pairs import MinimalPairs

Arrays = dict[str, tuple[np.ndarray, tuple[str, ...]]]


@dataclasses.dataclass(frozen=True)
class Option:
    """One option of a method: its default, its type and either allowed values or a minimum."""

    default: Any
    kind: type
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    help: str = ""

    def check(self, where: str, value: Any) -> Any:
        """`value` if allowed (ints accepted for float options), else a ValueError saying why."""
        ok_type = (isinstance(value, self.kind) and not (self.kind is not bool and isinstance(value, bool))) or (
            self.kind is float and isinstance(value, int) and not isinstance(value, bool))
        if not ok_type:
            raise ValueError(f"{where} = {value!r}: expected a {self.kind.__name__} ({self.help}).")
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{where} = {value!r}: choose one of {list(self.choices)}.")
        if self.minimum is not None and value < self.minimum:
            raise ValueError(f"{where} = {value!r}: must be at least {self.minimum}.")
        return float(value) if self.kind is float else value


@dataclasses.dataclass(frozen=True)
class UnitResult:
    """What one unit produced: arrays by name -> (array, dims), scalar summaries by name, and
    names along some dims (e.g. "src" -> graph node names) so indices in the scalars can be read."""

    arrays: Arrays
    scalars: dict[str, float]
    labels: dict[str, list[str]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    summary: str  # one paragraph for the sweep report: what runs and what the scalars mean
    options: Mapping[str, Option]
    run: Callable[[Any, MinimalPairs, Mapping[str, Any]], UnitResult]

    def resolve(self, given: Mapping[str, Any], where: str) -> dict[str, Any]:
        """All options (defaults filled in, values checked), in a fixed order."""
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            raise ValueError(f"{where}: method {self.name!r} has no option(s) {unknown}; "
                             f"its options are {sorted(self.options)}.")
        return {name: opt.check(f"{where}: {self.name}.{name}", given.get(name, opt.default))
                for name, opt in sorted(self.options.items())}


# ----------------------------------------------------------------------------- shared summaries

def baseline(model: Any, pairs: MinimalPairs, metric: str) -> dict[str, float]:
    """Mean metric of the unpatched clean and corrupted runs, and the number of pairs."""
    from jaxcirc.metrics import get_metric, pair_logits

    fn = get_metric(metric)
    clean = pair_logits(model.forward, model.params, pairs, which="clean")
    corrupt = pair_logits(model.forward, model.params, pairs, which="corrupt")
    return {"metric_clean": float(np.mean(np.asarray(fn(clean, pairs, clean), np.float64))),
            "metric_corrupt": float(np.mean(np.asarray(fn(corrupt, pairs, clean), np.float64))),
            "n_pairs": float(len(pairs))}


def top_summary(prefix: str, values: Any, dims: Sequence[str], k: int = 5) -> dict[str, float]:
    """The entry of largest |value| (its value and index per dim), sum of |values| and the share
    of that sum held by the top-k entries (how concentrated the scores are). NaN entries ignored."""
    v = np.nan_to_num(np.asarray(values, np.float64))
    flat = np.abs(v).ravel()
    order = np.argsort(-flat, kind="stable")
    index = np.unravel_index(int(order[0]), v.shape)
    total = float(flat.sum())
    out = {f"{prefix}_top_score": float(v[index])}
    out.update({f"{prefix}_top_{d}": float(i) for d, i in zip(dims, index)})
    out[f"{prefix}_abs_sum"] = total
    out[f"{prefix}_top{k}_share"] = float(flat[order[:k]].sum() / total) if total > 0 else float("nan")
    return out


def _metric_option() -> Option:
    return Option("logit_diff", str, tuple(METRICS), help="a metric name")


def _batch_option() -> Option:
    return Option(8, int, minimum=1, help="pairs per compiled batch")


# ----------------------------------------------------------------------------- methods

def run_atp(model: Any, pairs: MinimalPairs, options: Mapping[str, Any]) -> UnitResult:
    from jaxcirc.attribution import atp

    star = options["star"]
    result = atp(model.config, model.params, pairs, metric=options["metric"], sites=("head", "mlp_out", "resid_pre"),
                 qk_fix=star, grad_drop=star, batch_size=options["batch_size"])
    scalars = baseline(model, pairs, options["metric"])
    scalars |= top_summary("head", result["head"], result.dims["head"])
    scalars |= top_summary("mlp", result["mlp_out"], result.dims["mlp_out"], k=1)
    scalars |= top_summary("resid", result["resid_pre"], result.dims["resid_pre"], k=1)  # [layer, pos]
    return UnitResult(result.arrays(), scalars)


def run_eap(model: Any, pairs: MinimalPairs, options: Mapping[str, Any], method: str) -> UnitResult:
    from jaxcirc.eap import eap

    steps = options.get("steps", 1)
    result = eap(model.config, model.params, pairs, metric=options["metric"], method=method, steps=steps,
                 batch_size=options["batch_size"])
    scores = np.asarray(result.scores)
    scalars = baseline(model, pairs, options["metric"])
    scalars["n_edges"] = float(result.graph.n_edges)
    k = options["top_edges"]
    scalars |= top_summary("edge", scores, ("src", "dst"), k=k)
    scalars |= top_summary("node", result.node_scores(), ("src",))
    arrays: Arrays = {"edge_scores": (scores, ("src", "dst")),
                      "node_scores": (np.asarray(result.node_scores()), ("src",))}
    if options["faithfulness"]:
        from jaxcirc.circuit import Circuit
        from jaxcirc.edge_patch import EdgeLayout
        from jaxcirc.faithfulness import faithfulness

        layout = EdgeLayout.canonical(model.config)
        circuit = Circuit.from_scores(scores, layout, top_k=k)
        faith = faithfulness(model, pairs, circuit, ablation="corrupt", metric=options["metric"], layout=layout,
                             batch_size=options["batch_size"])
        scalars |= {"faithfulness": faith.faithfulness, "necessity": faith.necessity}
    return UnitResult(arrays, scalars, {"src": list(result.graph.node_names), "dst": list(result.graph.dst_names)})


def run_patch(model: Any, pairs: MinimalPairs, options: Mapping[str, Any], site: str, by: str) -> UnitResult:
    from jaxcirc.patching import patch_sweep

    result = patch_sweep(model, pairs, site, by, metric=options["metric"], direction=options["direction"],
                         source=options["source"])
    scalars = {"metric_clean": float(np.mean(result.clean_metric)),
               "metric_corrupt": float(np.mean(result.corrupt_metric)), "n_pairs": float(len(pairs))}
    scalars |= top_summary("change", result.change, result.dims)
    top = tuple(int(scalars[f"change_top_{d}"]) for d in result.dims)
    scalars["change_top_normalised"] = float(result.normalised[top])
    return UnitResult(result.arrays(), scalars)


def run_logit_lens(model: Any, pairs: MinimalPairs, options: Mapping[str, Any]) -> UnitResult:
    from jaxcirc.logit_lens import logit_lens

    lengths = np.asarray(pairs.lengths)
    rows = [list(map(int, row[:n])) for row, n in zip(np.asarray(pairs.clean), lengths)]
    ids = np.stack([np.asarray(pairs.answer), np.asarray(pairs.foil)], axis=1)
    site = options["site"]
    lens = logit_lens(model, rows, ids, sites=(site,), top_k=1)
    s = lens.site(site)
    rank, rr, prob = lens.rank[s], lens.rr[s], lens.prob[s]  # [pair, layer, (answer, foil)]
    n_layers = rank.shape[1]
    top1 = rank[:, :, 0] == 0
    first = np.where(top1.any(axis=1), top1.argmax(axis=1), n_layers)  # n_layers = never top-1
    scalars = baseline(model, pairs, options["metric"])
    scalars |= {"answer_rr_final": float(rr[:, -1, 0].mean()), "answer_prob_final": float(prob[:, -1, 0].mean()),
                "answer_above_foil_final": float((rank[:, -1, 0] < rank[:, -1, 1]).mean()),
                "first_top1_layer_mean": float(first.mean()),
                "output_top1_accuracy": float((lens.out_rank[:, 0] == 0).mean())}
    arrays: Arrays = {"rank": (rank, ("pair", "layer", "token")), "rr": (rr, ("pair", "layer", "token")),
                      "prob": (prob, ("pair", "layer", "token")),
                      "answer_rr_by_layer": (rr[:, :, 0].mean(0), ("layer",))}
    return UnitResult(arrays, scalars)


_PATCH_OPTIONS = {"metric": _metric_option(),
                  "direction": Option("denoising", str, ("denoising", "noising"), help="patch direction"),
                  "source": Option("resample", str, ("resample", "zero", "mean", "pos_mean"), help="patched values")}
_EAP_OPTIONS = {"metric": _metric_option(), "batch_size": _batch_option(),
                "top_edges": Option(20, int, minimum=1, help="edges in the top-k share and the faithfulness circuit"),
                "faithfulness": Option(False, bool, help="exact edge patching of the top_edges circuit")}

METHODS: dict[str, Method] = {m.name: m for m in (
    Method("atp", "Attribution patching (AtP; `star = true`: AtP* with QK fix and GradDrop) of attention heads, "
           "MLP outputs and the residual stream (resid_pre, by layer and position). head_top_* = the head of largest |score| (score ~ metric change when the head is "
           "patched from the corrupted run), head_top5_share = share of total |score| in the top 5 heads.",
           {"metric": _metric_option(), "batch_size": _batch_option(),
            "star": Option(False, bool, help="AtP* (QK fix + GradDrop)")},
           run_atp),
    Method("eap", "Edge attribution patching (gradient at the clean run). edge_top_* = the edge of largest |score|, "
           "edge_topK_share = share of total |score| in the top `top_edges` edges; node_* = per source node "
           "(summed outgoing scores); faithfulness/necessity of the top-`top_edges` circuit when `faithfulness = true`.",
           _EAP_OPTIONS, lambda m, p, o: run_eap(m, p, o, "eap")),
    Method("eap_ig", "EAP-IG (inputs variant, `steps` interpolation steps); scalars as for eap.",
           {**_EAP_OPTIONS, "steps": Option(5, int, minimum=1, help="interpolation steps")},
           lambda m, p, o: run_eap(m, p, o, "eap-ig")),
    Method("patch_resid", "Exact activation patching of a residual-stream site (`site`) by layer and position. "
           "change_top_* = the patch that moves the metric most (change = patched - unpatched run, mean over "
           "pairs) and its normalised value (0 = corrupted run, 1 = clean run).",
           {**_PATCH_OPTIONS, "site": Option("resid_pre", str, ("resid_pre", "resid_mid", "resid_post", "attn_out",
                                                                  "mlp_out"), help="residual site")},
           lambda m, p, o: run_patch(m, p, o, o["site"], "layer,pos")),
    Method("patch_heads", "Exact activation patching of each attention head's output (z) by layer and head; "
           "scalars as for patch_resid.", _PATCH_OPTIONS,
           lambda m, p, o: run_patch(m, p, o, "z", "layer,head")),
    Method("logit_lens", "Logit lens of the clean prompts at the metric position, tracking the answer and the foil. "
           "answer_rr_final / answer_prob_final = reciprocal rank / probability of the answer at the last "
           "layer, first_top1_layer_mean = mean first layer where the answer is top-1 (n_layers = never), "
           "output_top1_accuracy = share of pairs whose model output ranks the answer first.",
           {"metric": _metric_option(),
            "site": Option("resid_post", str, ("resid_pre", "pre_ffn", "resid_post"), help="decoded site")},
           run_logit_lens),
)}


def get_method(name: str, where: str = "") -> Method:
    """The method called `name`, or a ValueError listing the known ones (with close matches)."""
    if name not in METHODS:
        close = difflib.get_close_matches(name, list(METHODS), n=2)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"{where}unknown method {name!r}.{hint} Known methods: {', '.join(METHODS)}.")
    return METHODS[name]
