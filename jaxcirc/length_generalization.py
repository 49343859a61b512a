"""Length generalization: next-token loss past the trained context, with and without LM-Infinite.

    result = length_curve(model, tokens, trained_len=64)      # tokens [n_texts, 256]
    result["ppl"]["lm_infinite"]                              # perplexity per position bucket

A rotary model evaluated on texts longer than it was trained on meets relative distances it never
saw. LM-Infinite (Han et al. 2023; `jaxcirc.models.config.AttentionWindow`) keeps every query
inside the trained regime: a global prefix of `n_global` tokens, a local window of `trained_len`
tokens, and rotary distances capped at `trained_len`. Three variants are scored on the same texts
in one compiled forward each: "full" (plain causal attention), "window" (the Lambda mask without
the cap: attention stays local but the global prefix sits at unseen distances) and "lm_infinite"
(mask and cap). Targets are grouped into position buckets by multiples of the trained length.

`jaxcirc length MODEL --trained-len N --eval-len M --out DIR` writes a run directory with the
table, per-position curves and a report (`length_command`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from jaxcirc import rundir
from jaxcirc.models.config import AttentionWindow
from jaxcirc.position_perturbation import windowed_nll

VARIANTS = ("full", "window", "lm_infinite")


def variant_windows(trained_len: int, n_global: int) -> dict[str, AttentionWindow | None]:
    """The attention of each variant for a model trained on `trained_len` tokens."""
    return {"full": None, "window": AttentionWindow(n_global, trained_len),
            "lm_infinite": AttentionWindow(n_global, trained_len, trained_len)}


def position_buckets(eval_len: int, trained_len: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of target positions (target t is token t + 1): inside the trained
    length, then doubling spans past it."""
    buckets, start, stop = [], 1, trained_len
    while start < eval_len:
        buckets.append((start, min(stop, eval_len)))
        start, stop = stop, 2 * stop
    return buckets


def length_curve(model, tokens: np.ndarray, trained_len: int, *, n_global: int = 4, batch_size: int = 1
                 ) -> dict[str, Any]:
    """Next-token loss of `tokens` [n_texts, eval_len] under each attention variant.

    Returns nll [variant, n_texts, eval_len - 1] (entry t scores token t + 1), the position buckets,
    and ppl / accuracy per (variant, bucket) averaged over texts and targets."""
    cfg = model.config
    if cfg.positional != "rotary":
        raise ValueError(f"Length generalization with LM-Infinite needs a rotary model; this one uses "
                         f"{cfg.positional!r} positions (learned position tables stop at n_ctx={cfg.n_ctx}).")
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 2 or tokens.shape[1] <= trained_len:
        raise ValueError(f"tokens must be [n_texts, eval_len] with eval_len > trained_len={trained_len}, got "
                         f"{tokens.shape}.")
    if not 0 <= n_global < trained_len:
        raise ValueError(f"n_global={n_global} must lie in [0, trained_len={trained_len}).")
    buckets = position_buckets(tokens.shape[1], trained_len)
    nll, correct = [], []
    for window in variant_windows(trained_len, n_global).values():
        n, hit = windowed_nll(model, tokens, window, batch_size=batch_size)
        nll.append(n)
        correct.append(hit)
    nll, correct = np.stack(nll), np.stack(correct)
    ppl = np.array([[np.exp(nll[v, :, a - 1:b - 1].mean()) for a, b in buckets] for v in range(len(VARIANTS))])
    accuracy = np.array([[correct[v, :, a - 1:b - 1].mean() for a, b in buckets] for v in range(len(VARIANTS))])
    return {"variants": VARIANTS, "trained_len": trained_len, "eval_len": tokens.shape[1], "n_global": n_global,
            "buckets": buckets, "nll": nll, "ppl": ppl, "accuracy": accuracy}


# ----------------------------------------------------------------------------- texts


def role_paragraphs(tokenizer, n_texts: int, length: int, seed: int = 1) -> np.ndarray:
    """[n_texts, length] token ids of role-corpus sentences run together (the corpus the built-in
    `short_context` suite trains on; `seed` != the training seed gives unseen sentences)."""
    from jaxcirc.role_corpus import RoleCorpus

    corpus, rows = RoleCorpus(), []
    sentences = iter(corpus.sentences(n_texts * length, seed=seed))
    for _ in range(n_texts):
        ids: list[int] = list(tokenizer.encode(next(sentences)))  # with the tokenizer's BOS
        while len(ids) < length:
            ids += tokenizer.encode(next(sentences), add_bos=False)
        rows.append(ids[:length])
    return np.asarray(rows, np.int32)


def eval_tokens(model, text: str, n_texts: int, length: int) -> np.ndarray:
    """[n_texts, length] evaluation tokens: "natural" (the shipped prose), "role" (role-corpus
    paragraphs) or a path to a UTF-8 text file."""
    from jaxcirc.position_report import text_chunks

    if model.tokenizer is None:
        raise ValueError("This model has no tokenizer; load one with a tokenizer (GGUF, HF directory with "
                         "tokenizer.json, or a jaxcirc checkpoint).")
    if text == "role":
        return role_paragraphs(model.tokenizer, n_texts, length)
    if text == "natural":
        return text_chunks(model.tokenizer, n_texts, length)
    path = Path(text)
    if not path.is_file():
        raise FileNotFoundError(f"--text must be 'natural', 'role' or a text file; {text!r} is none of these.")
    return text_chunks(model.tokenizer, n_texts, length, text=path.read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------- the command


def length_command(model: str | Any, out_dir: str | Path, *, trained_len: int | None = None, eval_len: int | None = None,
                   n_texts: int = 4, n_global: int = 4, text: str = "natural", dtype: str = "float32",
                   overwrite: bool = False) -> Path:
    """Evaluate `model` (a source for `jaxcirc.load` or a `Model`) on `n_texts` texts of `eval_len`
    tokens (default 4 x trained_len) under the three attention variants; write a run directory."""
    started = time.perf_counter()
    if isinstance(model, (str, Path)):
        from jaxcirc.loading import load

        source_name, model = str(model), load(model, dtype=dtype)
    else:
        source_name = model.source
    trained_len = model.config.n_ctx if trained_len is None else trained_len
    eval_len = 4 * trained_len if eval_len is None else eval_len
    if trained_len < 2 or eval_len <= trained_len:
        raise ValueError(f"Need 2 <= trained_len < eval_len; got trained_len={trained_len}, eval_len={eval_len}.")
    tokens = eval_tokens(model, text, n_texts, eval_len)
    result = length_curve(model, tokens, trained_len, n_global=n_global)
    seconds = time.perf_counter() - started
    config = {"model": source_name, "trained_len": trained_len, "eval_len": eval_len, "n_texts": n_texts,
              "n_global": n_global, "text": text, "dtype": dtype, "model_n_ctx": model.config.n_ctx}
    buckets = [f"{a}-{b}" for a, b in result["buckets"]]
    scalars = {"ppl": {v: dict(zip(buckets, map(float, row))) for v, row in zip(VARIANTS, result["ppl"])},
               "accuracy": {v: dict(zip(buckets, map(float, row))) for v, row in zip(VARIANTS, result["accuracy"])},
               "seconds": seconds}
    arrays = {"nll": (result["nll"], ("variant", "text", "target_pos")),
              "ppl": (result["ppl"], ("variant", "bucket")), "accuracy": (result["accuracy"], ("variant", "bucket"))}
    report = render_report(source_name, config, result, seconds)
    return rundir.write_run(out_dir, command=f"jaxcirc length {source_name}", config=config, arrays=arrays,
                            scalars=scalars, model=model, figures={"nll_by_position": _figure(result)},
                            report=report, overwrite=overwrite)


def render_report(source: str, config: dict[str, Any], result: dict[str, Any], seconds: float) -> str:
    trained = config["trained_len"]
    lines = [f"# Length generalization: {source}", "",
             f"{config['n_texts']} texts ({config['text']}) of {config['eval_len']} tokens; trained length {trained} "
             f"(model n_ctx {config['model_n_ctx']}); LM-Infinite: {config['n_global']} global tokens, local window "
             f"{trained}, distance cap {trained}. 'window' is the Lambda mask without the cap.", "",
             "| variant | " + " | ".join(f"targets {a}-{b - 1}" for a, b in result["buckets"]) + " |",
             "| --- |" + " --- |" * len(result["buckets"])]
    for v, row, acc in zip(VARIANTS, result["ppl"], result["accuracy"]):
        lines.append(f"| {v} | " + " | ".join(f"ppl {p:.2f}, acc {a:.2f}" for p, a in zip(row, acc)) + " |")
    ppl = dict(zip(VARIANTS, result["ppl"]))
    inside, past = ppl["full"][0], ppl["full"][-1]
    lines += ["", f"Full attention: perplexity {inside:.2f} inside the trained length, {past:.2f} in the last bucket "
              f"(x{past / inside:.2f}). LM-Infinite: {ppl['lm_infinite'][0]:.2f} -> {ppl['lm_infinite'][-1]:.2f} "
              f"(x{ppl['lm_infinite'][-1] / ppl['lm_infinite'][0]:.2f}); the mask alone: {ppl['window'][-1]:.2f} in "
              "the last bucket.",
              "Paper (Han & Ji; LM-Infinite): the cap and the window keep perplexity flat past the trained length, "
              "where plain attention degrades. " + _verdict(ppl), "", "![nll by position](figures/nll_by_position.png)",
              "", f"Time: {seconds:.1f} s.", ""]
    return "\n".join(lines)


def _verdict(ppl: dict[str, np.ndarray]) -> str:
    full_growth = ppl["full"][-1] / ppl["full"][0]
    inf_growth = ppl["lm_infinite"][-1] / ppl["lm_infinite"][0]
    if inf_growth <= 1.10 and full_growth > 1.10:
        return "Supported here: LM-Infinite stays within 10 % while full attention degrades."
    if inf_growth <= 1.10:
        return "Here full attention does not degrade either (growth within 10 %), so the test is not decisive."
    return f"NOT supported here: LM-Infinite's perplexity also grows (x{inf_growth:.2f})."


def _figure(result: dict[str, Any]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    nll = result["nll"].mean(axis=1)  # [variant, target]
    width = max(1, nll.shape[1] // 64)
    kernel = np.ones(width) / width
    x = np.arange(1, nll.shape[1] + 1)
    for v, curve in zip(result["variants"], nll):
        ax.plot(x[width - 1:], np.convolve(curve, kernel, mode="valid"), label=v)
    ax.axvline(result["trained_len"], color="k", ls="--", lw=1, label="trained length")
    ax.set(xlabel="target position", ylabel=f"next-token NLL (mean over texts, window {width})",
           title="Loss past the trained length")
    ax.legend()
    fig.tight_layout()
    return fig
