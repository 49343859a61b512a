"""`jaxcirc arithmetic MODEL --task ... --out DIR`: the vector-arithmetic study as a run directory.

    arithmetic_command("smollm2-135m", "all", "runs/arithmetic")

Per task (capitals, uppercase, past tense) and its extractive twin: few-shot accuracy, the stage
layers from the logit lens, o-vector interventions (copy contexts, zero-shot prompts, residual
subtraction) and late-FFN ablation, each set next to what Merullo, Eickhoff & Pavlick report
(experiments.md B.5-B.7) with a plain verdict: agrees, partly, or does not agree.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from jaxcirc.arithmetic import ArithmeticSettings, TaskAnalysis, analyse_task
from jaxcirc.arithmetic_tasks import ABSTRACTIVE

if TYPE_CHECKING:
    from jaxcirc.model import Model

TASK_CHOICES = ABSTRACTIVE + ("all",)

# What the paper reports (experiments.md B; [V] authors' code/demo, [S] secondary summary).
PAPER = {
    "stages": "GPT2-Medium (24 layers): the argument (' Poland') is top-1 in middle layers (15-18), one FFN "
              "(layer 19) flips it to the answer (' Warsaw'), which then stays top-1 to the output (19-23) [V demo].",
    "transplant": "Replacing FFN outputs from layer 18 on with o19 turns copy contexts ('table mug free Poland ...') "
                  "into the answer: capital o-vectors 'virtually always' raise the right capital, not always to "
                  "top-1; the past-tense o reaches top-1 only ~8% of the time; uppercasing is the most consistent [V demo].",
    "zero_shot": "Adding/patching o into zero-shot prompts raises accuracy on capitals and past tense [S].",
    "ablation": "Removing the late FFNs collapses abstractive tasks while extractive ones (answer in context) are "
                "largely preserved [S; exact ablation and layer range not recoverable].",
}


def _tasks(task: str) -> tuple[str, ...]:
    name = task.strip().lower().replace("_", "-")
    if name == "all":
        return ABSTRACTIVE
    if name in ABSTRACTIVE:
        return (name,)
    raise ValueError(f"Unknown task {task!r}; choose one of {', '.join(TASK_CHOICES)}.")


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def _num(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


# --------------------------------------------------------------------------- verdicts

def stage_verdict(s: Mapping[str, Any]) -> tuple[str, str]:
    """Agreement with B.5 from the stage rates of correctly answered examples."""
    fn, flip, arg = s.get("function_application_rate", 0), s.get("flip_from_argument_rate") or 0, s.get("argument_formation_rate", 0)
    if s.get("n_correct_argument_differs", 0) == 0:
        return "not testable", "no correctly answered example whose argument and answer differ"
    layer, L = s.get("function_application_layer"), s.get("n_layers")
    where = (f"the FFN flips bunch at layer {layer} of {L} (depth {layer / L:.0%}; the paper's GPT2-M: 19 of 24, 79%)"
             if layer is not None else "no FFN flip")
    if fn >= 0.5 and flip >= 0.5 and arg >= 0.5:
        return "agrees", f"argument first, then an FFN flip from it to the answer in most examples; {where}"
    if fn >= 0.5:
        return "partly", (f"an FFN makes the answer top-1 in {_pct(fn)} of examples, but the argument is top-1 "
                          f"beforehand in only {_pct(arg)} (flip from the argument: {_pct(flip)}); {where}")
    return "does not agree", f"the answer rarely becomes top-1 through an FFN ({_pct(fn)}); {where}"


def transplant_verdict(s: Mapping[str, Any]) -> tuple[str, str]:
    """The paper's procedure (transplant of o) decides 'agrees'; the residual adds, chosen after the
    fact among several layers and scales, can only lift the verdict to 'partly'."""
    copy = s.get("copy")
    if not copy:
        return "not testable", s.get("o_vector_note", "no o-vector")
    paper = {k: v for k, v in copy.items() if k.startswith("transplant")}
    adds = {k: v for k, v in copy.items() if k.startswith("add_")}
    tp = max(paper, key=lambda k: (paper[k]["answer_rr_raised_rate"], paper[k]["answer_top1_rate"]))
    ad = max(adds, key=lambda k: (adds[k]["answer_top1_rate"], adds[k]["answer_rr_raised_rate"])) if adds else None
    detail = (f"transplant ({tp}, o{s['o_layer']} from layer {s['intervention_start_layer']}): answer top-1 in "
              f"{_pct(paper[tp]['answer_top1_rate'])} of copy contexts, reciprocal rank raised in "
              f"{_pct(paper[tp]['answer_rr_raised_rate'])} (mean change {paper[tp]['answer_rr_change']:+.3f})")
    if ad is not None:
        detail += (f"; best of {len(adds)} residual adds (picked after the fact), {ad}: top-1 "
                   f"{_pct(adds[ad]['answer_top1_rate'])}, RR raised in {_pct(adds[ad]['answer_rr_raised_rate'])}")
    if paper[tp]["answer_rr_raised_rate"] >= 0.8 and paper[tp]["answer_top1_rate"] > 0:
        return "agrees", detail
    if paper[tp]["answer_rr_raised_rate"] >= 0.5 or (
            ad is not None and adds[ad]["answer_rr_raised_rate"] >= 0.8 and adds[ad]["answer_top1_rate"] > 0):
        return "partly", detail
    return "does not agree", detail


def zero_shot_verdict(s: Mapping[str, Any]) -> tuple[str, str]:
    zero = s.get("zero_shot")
    if not zero:
        return "not testable", s.get("o_vector_note", "no o-vector")
    n = s.get("n_targets") or 1
    base = zero["none"]["accuracy"]
    best = max((k for k in zero if k != "none"), key=lambda k: zero[k]["gain"])
    gained = round(zero[best]["gain"] * n)
    detail = (f"zero-shot accuracy {_pct(base)} -> {_pct(zero[best]['accuracy'])} with {best} "
              f"({gained:+d} of {n} prompts)")
    if gained >= 2:
        return "agrees", detail
    return ("partly" if gained == 1 else "does not agree"), detail


def ablation_verdict(s: Mapping[str, Any]) -> tuple[str, str]:
    ab = s["ablation"]
    gaps = []
    for kind in ("zero", "mean"):
        a, e = ab[f"{kind}_abstractive"]["retained"], ab[f"{kind}_extractive"]["retained"]
        if a is None or e is None:
            return "not testable", "no correctly answered prompt in one of the two task kinds"
        gaps.append(e - a)
    detail = (f"FFNs {s['ablate_from']}..end ablated; share of correct answers kept, abstractive vs extractive: "
              f"zero {_pct(ab['zero_abstractive']['retained'])} vs {_pct(ab['zero_extractive']['retained'])}, "
              f"mean {_pct(ab['mean_abstractive']['retained'])} vs {_pct(ab['mean_extractive']['retained'])}")
    if all(g >= 0.2 for g in gaps):
        return "agrees", detail
    if any(g >= 0.2 for g in gaps):
        return "partly", detail
    return "does not agree", detail


# --------------------------------------------------------------------------- figures

def _lens_figure(analysis: TaskAnalysis):
    from jaxcirc.logit_lens import rank_figure

    rr = analysis.arrays["lens_rr"][0]  # [site, example, layer, token]
    keep = (analysis.arrays["correct"][0][0] == 1) & (analysis.arrays["argument_differs"][0] == 1)
    s = analysis.scalars
    curves = {"argument, pre-FFN": rr[0, keep, :, 0], "argument, block output": rr[1, keep, :, 0],
              "answer, pre-FFN": rr[0, keep, :, 1], "answer, block output": rr[1, keep, :, 1]}
    marks = {"arg": s.get("argument_formation_median"), "fn": s.get("function_application_layer"),
             "sat": s.get("saturation_median")}
    return rank_figure(curves, f"{analysis.task}: logit lens at the last token ({int(keep.sum())} correct prompts; "
                                f"mean, IQR band)", marks={k: v for k, v in marks.items() if v is not None})


def _stage_figure(analyses: Sequence[TaskAnalysis], n_layers: int):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(analyses), figsize=(4.2 * len(analyses), 3.2), squeeze=False)
    for ax, a in zip(axes[0], analyses):
        hist = a.arrays["stage_hist"][0]
        layers = np.arange(n_layers)
        for i, name in enumerate(a.labels["stage_hist"]):
            ax.bar(layers + (i - 1) * 0.28, hist[i], width=0.28, label=name.replace("_", " "))
        ax.set_title(a.task, fontsize=10)
        ax.set_xlabel("layer")
        ax.set_ylabel("examples")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def _bar_figure(analyses: Sequence[TaskAnalysis], key: str, metric: str, title: str, ylabel: str):
    import matplotlib.pyplot as plt

    usable = [a for a in analyses if a.scalars.get(key)]
    if not usable:
        return None
    fig, axes = plt.subplots(1, len(usable), figsize=(4.6 * len(usable), 3.4), squeeze=False)
    for ax, a in zip(axes[0], usable):
        names = list(a.scalars[key])
        ax.bar(range(len(names)), [a.scalars[key][n][metric] for n in names], color="tab:blue")
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.set_title(a.task, fontsize=10)
        ax.set_ylabel(ylabel)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _ablation_figure(analyses: Sequence[TaskAnalysis]):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.4))
    width, x = 0.2, np.arange(len(analyses))
    for i, (ab, kind) in enumerate([(ab, kind) for ab in ("zero", "mean") for kind in ("abstractive", "extractive")]):
        vals = [a.scalars["ablation"][f"{ab}_{kind}"]["retained"] for a in analyses]
        ax.bar(x + (i - 1.5) * width, [np.nan if v is None else v for v in vals], width, label=f"{ab}-ablated, {kind}",
               hatch="//" if kind == "extractive" else None)
    ax.set_xticks(x, [f"{a.task}\n(FFNs {a.scalars['ablate_from']}+)" for a in analyses])
    ax.set_ylabel("share of correct answers kept")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    ax.set_title("Late-FFN ablation: abstractive vs extractive", fontsize=10)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- report

def _task_table(analyses: Sequence[TaskAnalysis]) -> list[str]:
    lines = ["| task | few-shot acc. | extractive twin acc. | argument top-1 (median layer) | FFN flip (l*) | "
             "saturation (median) | copy ctx: transplant top-1 / RR change / RR raised | copy ctx: best add top-1 | "
             "zero-shot acc. -> best with o | ablation kept, abstr. vs extr. (zero; mean) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for a in analyses:
        s = a.scalars
        copy, zero, ab = s.get("copy"), s.get("zero_shot"), s["ablation"]
        if copy:
            tp = max((k for k in copy if k.startswith("transplant")),
                     key=lambda k: (copy[k]["answer_rr_raised_rate"], copy[k]["answer_top1_rate"]))
            transplant = (f"{_pct(copy[tp]['answer_top1_rate'])} / {copy[tp]['answer_rr_change']:+.3f} / "
                          f"{_pct(copy[tp]['answer_rr_raised_rate'])} ({tp})")
        else:
            transplant = "n/a"
        best_add = f"{_pct(copy[s['best_add']]['answer_top1_rate'])} ({s['best_add']})" if copy else "n/a"
        if zero:
            best = max((k for k in zero if k != "none"), key=lambda k: zero[k]["gain"])
            zs = f"{_pct(zero['none']['accuracy'])} -> {_pct(zero[best]['accuracy'])} ({best})"
        else:
            zs = "n/a"
        lines.append(
            f"| {a.task} | {_pct(s['few_shot_accuracy'])} | {_pct(s['extractive_accuracy'])} | "
            f"{_pct(s['argument_formation_rate'])} ({_num(s['argument_formation_median'], 0)}) | "
            f"{_pct(s['function_application_rate'])} ({s['function_application_layer']}) | "
            f"{_num(s['saturation_median'], 0)} | {transplant} | {best_add} | {zs} | "
            f"{_pct(ab['zero_abstractive']['retained'])} vs {_pct(ab['zero_extractive']['retained'])}; "
            f"{_pct(ab['mean_abstractive']['retained'])} vs {_pct(ab['mean_extractive']['retained'])} |")
    return lines


def build_report(model_name: str, analyses: Sequence[TaskAnalysis], settings: ArithmeticSettings, seed: int,
                 n_layers: int, elapsed: float, figures: Sequence[str]) -> str:
    out = [f"# Word2Vec-style vector arithmetic (Merullo, Eickhoff & Pavlick) on {model_name}", "",
           f"Tasks: {', '.join(a.task for a in analyses)}, each with its extractive twin; "
           f"{settings.n_examples} queries per task (seed {seed}), few-shot prompts in the paper's formats, "
           f"answers scored by their first token. {n_layers} layers. Ran in {elapsed:.0f} s.", "",
           "Stages come from the logit lens at the last token (final norm + unembedding of each layer's pre-FFN "
           "residual and block output) on correctly answered prompts whose argument and answer start with "
           "different tokens. l* is the most common layer whose FFN makes the answer top-1; o is the FFN output "
           f"there. Interventions start at layer l*{settings.start_offset:+d}; the transplant replaces FFN outputs at "
           f"{'every position' if settings.positions == 'all' else 'the last token'} (authors' code). "
           "'mean o' averages the o of the other source prompts (leave one out); 'single' takes one other prompt's o. "
           f"Ablation re-runs up to {settings.max_ablation_items} correctly answered prompts per task kind; "
           "'kept' is the share still answered correctly.", "",
           "## Headline numbers", ""]
    out += _task_table(analyses)
    out += ["", "## Against the paper", ""]
    for key, fn, title in [("stages", stage_verdict, "Processing stages (B.5)"),
                           ("transplant", transplant_verdict, "o-vectors in copy contexts (B.6, B.7)"),
                           ("zero_shot", zero_shot_verdict, "Zero-shot guidance (B.6)"),
                           ("ablation", ablation_verdict, "Abstractive vs extractive (B.6)")]:
        out += [f"### {title}", "", f"Paper: {PAPER[key]}", ""]
        for a in analyses:
            verdict, detail = fn({**a.scalars, "n_layers": n_layers})
            out.append(f"- **{a.task}: {verdict}.** {detail}.")
        out.append("")
    out += ["Verdict rules (ours): stages agree when most examples show the argument first and then an FFN flip "
            "from it (partly: FFN flips without the argument stage). o-vectors agree when the paper's transplant "
            "raises the answer's reciprocal rank in at least 80% of copy contexts ('virtually always') and makes it "
            "top-1 at least once; partly when it raises it in at least half, or when a residual add (picked after "
            "the fact) raises it in 80% with some top-1. Zero-shot agrees when o makes at least 2 more prompts "
            "correct (partly: 1). Ablation agrees when extractive prompts keep at least 20 points more of their "
            "correct answers than abstractive ones under both ablations (partly: under one).", ""]
    out += ["## Per task", ""]
    for a in analyses:
        s = a.scalars
        out += [f"### {a.task}", "",
                f"- few-shot accuracy {_pct(s['few_shot_accuracy'])} ({s['n_shots']} shot{'s' if s['n_shots'] != 1 else ''}), extractive twin "
                f"{_pct(s['extractive_accuracy'])}" + (
                    f"; regular verbs {_pct(s.get('few_shot_accuracy_regular'))}, irregular {_pct(s.get('few_shot_accuracy_irregular'))}"
                    if "few_shot_accuracy_regular" in s else ""),
                f"- correct prompts with argument != answer first token: {s['n_correct_argument_differs']} of "
                f"{s['n_argument_differs']}; FFN flip layers {s['function_application_layers']}; argument-formation "
                f"layers {s['argument_formation_layers']}; largest mean FFN gain in the answer's reciprocal rank: layer "
                f"{s['ffn_effect_peak_layer']}"]
        if s.get("copy"):
            out.append(f"- o from layer {s['o_layer']} ({s['n_o_sources']} source prompts); copy contexts predict the "
                       f"argument in {_pct(s['copy_argument_top1_rate'])} without intervention")
            out += ["", "| copy-context condition | answer top-1 | answer top-1 where copying | argument top-1 | answer RR | RR change | RR raised |",
                    "|---|---|---|---|---|---|---|"]
            for name, v in s["copy"].items():
                out.append(f"| {name} | {_pct(v['answer_top1_rate'])} | {_pct(v['answer_top1_rate_where_copying'])} | "
                           f"{_pct(v['argument_top1_rate'])} | {v['answer_rr']:.3f} | {v['answer_rr_change']:+.3f} | "
                           f"{_pct(v['answer_rr_raised_rate'])} |")
            out += ["", "| zero-shot condition | accuracy | gain |", "|---|---|---|"]
            for name, v in s["zero_shot"].items():
                out.append(f"| {name} | {_pct(v['accuracy'])} | {100 * v['gain']:+.0f} pts |")
            for name, v in s.get("subtract", {}).items():
                out.append(f"\n- subtracting {name.lstrip('x')} x its own o after layer {s['o_layer']} (correct prompts): answer stays "
                           f"top-1 {_pct(v['answer_top1_rate'])}, argument becomes top-1 {_pct(v['argument_top1_rate'])}")
        elif "o_vector_note" in s:
            out.append(f"- o-vector experiments skipped: {s['o_vector_note']}")
        for ex in a.examples[:1]:
            lo = max(0, n_layers - 8)
            out += ["", f"Example ({ex['argument']!r} -> {ex['answer']!r}), top-1 token per layer {lo}..{n_layers - 1}:", "",
                    "| layer | " + " | ".join(str(l) for l in range(lo, n_layers)) + " |",
                    "|---" * (n_layers - lo + 1) + "|",
                    "| pre-FFN | " + " | ".join(repr(t) for t in ex["top1_pre_ffn"][lo:]) + " |",
                    "| block out | " + " | ".join(repr(t) for t in ex["top1_block_out"][lo:]) + " |"]
        out.append("")
    out += ["## Figures", ""] + [f"![{f}](figures/{f}.png)" for f in figures] + [""]
    return "\n".join(out)


def arithmetic_command(model: "str | Model" = "smollm2-135m", task: str = "all", out_dir: str | Path = "runs/arithmetic", *,
                       n_examples: int = 24, seed: int = 0, n_shots: int | None = None, overwrite: bool = False,
                       quiet: bool = False, settings: ArithmeticSettings | None = None) -> Path:
    """Run the vector-arithmetic study and write a run directory (results.json, arrays.npz,
    figures/*.png, report.md). `task`: capitals, uppercase, past-tense or all. `model` is anything
    `jaxcirc.load` accepts (or a loaded `Model`). `settings` overrides every knob at once
    (`ArithmeticSettings`); otherwise n_examples/n_shots fill it. Returns the run directory."""
    from jaxcirc.model import Model
    from jaxcirc.rundir import write_run

    tasks = _tasks(task)
    if n_examples < 2:
        raise ValueError(f"n_examples must be at least 2 (o-vectors come from other examples), got {n_examples}.")
    settings = settings or ArithmeticSettings(n_examples=n_examples, n_shots=n_shots)
    start = time.perf_counter()

    def log(line: str) -> None:
        if not quiet:
            print(f"[{time.perf_counter() - start:5.0f} s] {line}", file=sys.stderr, flush=True)

    if isinstance(model, Model):
        loaded, model_name = model, model.source or "model"
    else:
        from jaxcirc.loading import load

        loaded, model_name = load(model), model
    analyses = [analyse_task(loaded, t, settings, seed, log) for t in tasks]
    n_layers = loaded.config.n_layers
    elapsed = time.perf_counter() - start

    figures: dict[str, Any] = {}
    for a in analyses:
        figures[f"{a.task}_lens"] = _lens_figure(a)
    figures["stages"] = _stage_figure(analyses, n_layers)
    for name, fig in [("copy_contexts", _bar_figure(analyses, "copy", "answer_top1_rate",
                                                    "o-vectors in neutral copy contexts", "answer top-1 rate")),
                      ("copy_contexts_rr", _bar_figure(analyses, "copy", "answer_rr",
                                                       "o-vectors in neutral copy contexts", "answer reciprocal rank")),
                      ("zero_shot", _bar_figure(analyses, "zero_shot", "accuracy", "zero-shot prompts", "accuracy"))]:
        if fig is not None:
            figures[name] = fig
    figures["ablation"] = _ablation_figure(analyses)

    arrays = {f"{a.task}.{name}": value for a in analyses for name, value in a.arrays.items()}
    scalars: dict[str, Any] = {a.task: {**a.scalars, "labels": a.labels, "verdicts": {
        key: dict(zip(("verdict", "detail"), fn({**a.scalars, "n_layers": n_layers})))
        for key, fn in [("stages", stage_verdict), ("transplant", transplant_verdict),
                        ("zero_shot", zero_shot_verdict), ("ablation", ablation_verdict)]}} for a in analyses}
    scalars["elapsed_s"] = elapsed
    scalars["paper"] = PAPER
    config = {"model": model_name, "task": task, "tasks": list(tasks), "seed": seed,
              "settings": dataclasses.asdict(settings)}
    report = build_report(model_name, analyses, settings, seed, n_layers, elapsed, list(figures))
    run_dir = write_run(out_dir, command="arithmetic", config=config, arrays=arrays, scalars=scalars, model=loaded,
                        figures=figures, report=report, overwrite=overwrite)
    log(f"wrote {run_dir} ({elapsed:.0f} s)")
    return run_dir
