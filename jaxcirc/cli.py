"""The `jaxcirc` command line: inspect a model (`info`), its hook points (`hooks`), its next-token
logits (`logits`).

    jaxcirc info                # every supported model family (same as --families)
    jaxcirc info smollm2-135m
    jaxcirc hooks smollm2-135m --summary
    jaxcirc logits smollm2-135m --prompt "The capital of France is" --top-k 5 --json

MODEL is anything `jaxcirc.load` accepts. Bad input (unknown model, missing path, unported
architecture, bad token ids...) prints one line `error: ...` on stderr and exits with code 2;
set JAXCIRC_TRACEBACK=1 to see the traceback instead.

The commands are thin: the logic lives in pure functions (`model_info`, `hook_table`,
`hook_summary`, `top_k`, `logits_report`) that return plain data, which `--json` prints as is.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="jaxcirc: JAX-native mechanistic interpretability. MODEL is a registry name (smollm2-135m), "
    "an HF model directory, a .gguf file or a jaxcirc checkpoint directory.",
)

ModelArg = Annotated[str, typer.Argument(metavar="MODEL", help="Registry name, HF directory, .gguf file or jaxcirc checkpoint.", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
DtypeOpt = Annotated[str, typer.Option(help="Parameter dtype to load the model in (float32, bfloat16, float16).")]

# Errors that mean "the user asked for something that cannot be done", not a bug in jaxcirc.
USER_ERRORS = (ValueError, KeyError, OSError, ImportError)


class UsageError(ValueError):
    """A bad combination of command-line options."""


def _one_line(error: BaseException) -> str:
    message = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    message = " ".join(message.split())
    return message or type(error).__name__


def handle_errors(command: Callable[..., None]) -> Callable[..., None]:
    """Turn user errors into `error: <message>` on stderr and exit code 2 (no traceback)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            command(*args, **kwargs)
        except USER_ERRORS as error:
            if os.environ.get("JAXCIRC_TRACEBACK"):
                raise
            Console(stderr=True, highlight=False, soft_wrap=True).print(
                f"[bold red]error:[/bold red] {escape(_one_line(error))}", markup=True)
            raise typer.Exit(2) from None

    return wrapper


def _load(source: str, dtype: str = "float32"):
    from jaxcirc.loading import load

    return load(source, dtype=dtype)


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def _console() -> Console:
    # Piped output (logs, CI) would otherwise be wrapped at 80 columns; tables only take what they need.
    return Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)


# ----------------------------------------------------------------------------- pure logic


def count_params(params: Any) -> int:
    """Total number of scalars in a parameter pytree."""
    import jax

    return int(sum(int(np.prod(np.shape(leaf))) for leaf in jax.tree_util.tree_leaves(params)))


def describe_positional(cfg) -> str:
    """`learned` or `rotary (theta ..., rotary_dim a/b, scaling ...)`, in one phrase."""
    if cfg.positional != "rotary":
        return cfg.positional
    rope = cfg.rope
    scaling = "none"
    if rope.scaling is not None:
        kind, *values = rope.scaling
        names = {"linear": ("factor",),
                 "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
        scaling = kind + " (" + ", ".join(f"{n}={v:g}" for n, v in zip(names.get(kind, ()), values)) + ")"
    pairs = ", interleaved pairs" if rope.interleaved else ""
    return f"rotary (theta {rope.theta:g}, rotary_dim {rope.rotary_dim}/{cfg.d_head}{pairs}, scaling {scaling})"


def describe_attention(cfg) -> str:
    """Causal attention plus whatever narrows or reshapes it (windows, query scale, soft caps)."""
    parts = ["causal"]
    if cfg.layer_windows is not None and any(cfg.layer_windows):
        by_window: dict[int, list[int]] = {}
        for layer, window in enumerate(cfg.layer_windows):
            if window:
                by_window.setdefault(window, []).append(layer)
        parts += [f"sliding window {w} on layers {', '.join(map(str, ls))}" for w, ls in by_window.items()]
    if getattr(cfg, "attention_window", None) is not None:
        parts.append(f"attention window {cfg.attention_window}")
    if cfg.query_scale is not None:
        parts.append(f"query scale {cfg.query_scale:.6g}")
    if cfg.attn_softcap is not None:
        parts.append(f"logit soft cap {cfg.attn_softcap:g}")
    if cfg.final_softcap is not None:
        parts.append(f"final logit soft cap {cfg.final_softcap:g}")
    return ", ".join(parts)


def model_info(model, name: str | None = None) -> dict[str, Any]:
    """The facts `jaxcirc info` shows, as plain JSON-able data."""
    cfg = model.config
    tokenizer = model.tokenizer
    return {
        "model": name if name is not None else model.source,
        "family": cfg.family,
        "n_layers": cfg.n_layers,
        "d_model": cfg.d_model,
        "n_heads": cfg.n_heads,
        "n_kv_heads": cfg.n_kv_heads,
        "d_head": cfg.d_head,
        "d_mlp": cfg.d_mlp,
        "d_vocab": cfg.d_vocab,
        "n_ctx": cfg.n_ctx,
        "positional": describe_positional(cfg),
        "attention": describe_attention(cfg),
        "norm": f"{cfg.norm} (eps {cfg.norm_eps:g})",
        "activation": cfg.activation + (" (gated)" if cfg.gated_mlp else ""),
        "parallel_residual": cfg.parallel_residual,
        "tied_embeddings": cfg.tied_embeddings,
        "n_params": count_params(model.params),
        "dtype": cfg.dtype,
        "tokenizer": None if tokenizer is None else {
            "vocab_size": tokenizer.vocab_size, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "add_bos": tokenizer.add_bos},
        "source": model.source,
        "source_hash": model.source_hash,
        "n_hook_points": len(model.hook_names()),
    }


def _shape_of(dims: Sequence[str], sizes: dict[str, int]) -> list[int]:
    return [sizes[d] for d in dims]


def format_shape(dims: Sequence[str], shape: Sequence[int]) -> str:
    """("batch", "pos") and (1, 8) -> "[batch=1, pos=8]"."""
    return "[" + ", ".join(f"{d}={s}" for d, s in zip(dims, shape)) + "]"


def _shape_cell(row: dict[str, Any]) -> str:
    return escape(format_shape(row["dims"], row["shape"]))  # rich would read "[...]" as markup


def hook_table(cfg, pos: int, batch: int = 1) -> list[dict[str, Any]]:
    """Every hook point in forward order: {name, dims, shape, opt_in} for `batch` x `pos` tokens."""
    from jaxcirc.models import hook_points

    sizes = hook_points.dim_sizes(cfg, batch, pos)
    rows = []
    for name in hook_points.full_names(cfg):
        dims = hook_points.dims_of(cfg, name)
        template = hook_points.split_name(name)[1]
        rows.append({"name": name, "dims": list(dims), "shape": _shape_of(dims, sizes),
                     "opt_in": template in hook_points.OPT_IN_TEMPLATES})
    return rows


def hook_summary(cfg, pos: int, batch: int = 1) -> dict[str, Any]:
    """The hook points once per template: top-level points, the per-block templates, and counts."""
    from jaxcirc.models import hook_points

    sizes = hook_points.dim_sizes(cfg, batch, pos)

    def entry(name: str, dims: Sequence[str]) -> dict[str, Any]:
        return {"name": name, "dims": list(dims), "shape": _shape_of(dims, sizes),
                "opt_in": name in hook_points.OPT_IN_TEMPLATES}

    top = hook_points.top_level_points(cfg)
    blocks = hook_points.block_points(cfg)
    n_opt_in = sum(t in hook_points.OPT_IN_TEMPLATES for t in blocks)
    return {
        "batch": batch,
        "pos": pos,
        "n_layers": cfg.n_layers,
        "top_level": [entry(n, d) for n, d in top.items()],
        "block_templates": [entry(t, d) for t, d in blocks.items()],
        "counts": {
            "total": len(top) + cfg.n_layers * len(blocks),
            "top_level": len(top),
            "per_block": len(blocks),
            "opt_in_per_block": n_opt_in,
        },
    }


def top_k(logits: Any, k: int) -> list[tuple[int, float]]:
    """The k largest entries of a [vocab] logit vector as (id, logit), largest first (ties: lower id)."""
    values = np.asarray(logits, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"top_k expects a [vocab] vector, got shape {values.shape}.")
    if not 1 <= k <= values.shape[0]:
        raise UsageError(f"--top-k must be between 1 and the vocabulary size {values.shape[0]}, got {k}.")
    order = np.lexsort((np.arange(values.shape[0]), -values))[:k]
    return [(int(i), float(values[i])) for i in order]


def log_softmax(logits: Any) -> np.ndarray:
    """Numerically stable log-softmax over the last axis (float64)."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def parse_token_ids(text: str) -> list[int]:
    """"1, 2 3" -> [1, 2, 3]."""
    parts = text.replace(",", " ").split()
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise UsageError(f"--tokens must be integers separated by commas or spaces, got {text!r}.") from None


def prompt_tokens(model, prompt: str | None, tokens: str | None) -> list[int]:
    """The token ids of the prompt (with the tokenizer's own BOS rule) or of `--tokens`."""
    if (prompt is None) == (tokens is None):
        raise UsageError("Give exactly one of --prompt TEXT or --tokens IDS.")
    if tokens is not None:
        ids = parse_token_ids(tokens)
    else:
        if model.tokenizer is None:
            raise UsageError(f"{model.source} has no tokenizer (no tokenizer.json); give token ids with --tokens.")
        ids = list(model.tokenizer.encode(prompt))
    if not ids:
        raise UsageError("The prompt is empty: it has no tokens.")
    return ids


def logits_report(model, ids: Sequence[int], k: int, name: str | None = None,
                  prompt: str | None = None) -> dict[str, Any]:
    """Next-token top-k after the token ids: the `jaxcirc logits --json` document."""
    import jax.numpy as jnp

    from jaxcirc.model import run

    ids = [int(i) for i in ids]
    logits, _ = run(model, np.array([ids], dtype=np.int32), logits_at=jnp.array([len(ids) - 1]))
    last = np.asarray(logits[0], dtype=np.float64)
    logprobs = log_softmax(last)
    return {
        "model": name if name is not None else model.source,
        "source": model.source,
        "source_hash": model.source_hash,
        "prompt": prompt,
        "token_ids": ids,
        "tokens": [model.token_str(i) for i in ids],
        "top_k": [{"token": model.token_str(i), "id": i, "logit": round(v, 6),
                   "prob": round(float(np.exp(logprobs[i])), 6)} for i, v in top_k(last, k)],
    }


# ----------------------------------------------------------------------------- commands


def _print_families(json_out: bool) -> None:
    from jaxcirc.models.families import family_table

    rows = family_table()
    if json_out:
        _print_json({"families": rows})
        return
    table = Table(title="jaxcirc model families (parity: max |Δ log-softmax| vs HF transformers, fp32)",
                  title_justify="left", show_lines=True)
    for column in ("family", "HF model_type", "architecture", "tests cover", "parity"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(row["name"], ", ".join(row["model_types"]), escape(row["architecture"]),
                      escape(row["tested"]), row["parity"])
    _console().print(table)


@app.command()
@handle_errors
def info(model: Annotated[str | None, typer.Argument(
             metavar="MODEL", help="Registry name, HF directory, .gguf file or jaxcirc checkpoint; "
             "without it, the supported model families.", show_default=False)] = None,
         families: Annotated[bool, typer.Option(
             "--families", help="List every supported model family: HF model types, architecture, "
             "what the tests cover and the parity figure.")] = False,
         json_out: JsonOpt = False, dtype: DtypeOpt = "float32") -> None:
    """Architecture, size and provenance of MODEL; without MODEL (or with --families), every
    supported model family and what its tests cover."""
    if model is not None and families:
        raise UsageError("Give MODEL or --families, not both.")
    if model is None:
        _print_families(json_out)
        return
    data = model_info(_load(model, dtype), model)
    if json_out:
        _print_json(data)
        return
    table = Table(title=f"jaxcirc model: {model}", show_header=False, title_justify="left")
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column(overflow="fold")
    for key, value in data.items():
        if key == "n_params":
            value = f"{value:,}"
        elif key == "tokenizer" and value is not None:
            value = (f"vocab {value['vocab_size']}, bos {value['bos_token_id']}, eos {value['eos_token_id']}, "
                     f"add_bos {value['add_bos']}")
        table.add_row(key, escape(str(value)))
    _console().print(table)


@app.command()
@handle_errors
def hooks(model: ModelArg,
          summary: Annotated[bool, typer.Option("--summary", help="Per-block templates once, plus counts.")] = False,
          pos: Annotated[int, typer.Option(min=1, help="Sequence length the shapes are shown for.")] = 8,
          json_out: JsonOpt = False, dtype: DtypeOpt = "float32") -> None:
    """Every hook point name of MODEL with its TransformerLens shape (batch=1, --pos positions)."""
    loaded = _load(model, dtype)
    cfg = loaded.config
    if pos > cfg.n_ctx:
        raise UsageError(f"--pos {pos} is longer than the model's context window of {cfg.n_ctx}.")
    note = ("opt-in: exists only when a hook asks for it; then each head reads (q/k/v_input) or "
            "writes (attn.hook_result) its own copy")
    if summary:
        data = hook_summary(cfg, pos)
        if json_out:
            _print_json({"model": model, **data})
            return
        console = _console()
        counts = data["counts"]
        console.print(f"[bold]{model}[/bold]: {counts['total']} hook points = {counts['top_level']} top-level + "
                      f"{cfg.n_layers} blocks x {counts['per_block']} "
                      f"({counts['opt_in_per_block']} of them opt-in); shapes for batch=1, pos={pos}")
        table = Table(show_header=True, header_style="bold")
        table.add_column("hook point")
        table.add_column("shape")
        table.add_column("")
        before = [r for r in data["top_level"] if not r["name"].startswith("ln_final.")]
        after = [r for r in data["top_level"] if r["name"].startswith("ln_final.")]
        for row in before:
            table.add_row(row["name"], _shape_cell(row), "")
        for row in data["block_templates"]:
            table.add_row(f"blocks.{{0..{cfg.n_layers - 1}}}.{row['name']}",
                          _shape_cell(row), "opt-in" if row["opt_in"] else "")
        for row in after:
            table.add_row(row["name"], _shape_cell(row), "")
        console.print(table)
        console.print(note + ".")
        return
    rows = hook_table(cfg, pos)
    if json_out:
        _print_json({"model": model, "batch": 1, "pos": pos, "hook_points": rows})
        return
    table = Table(title=f"{model}: {len(rows)} hook points (batch=1, pos={pos})", title_justify="left")
    table.add_column("hook point")
    table.add_column("shape")
    table.add_column("")
    for row in rows:
        table.add_row(row["name"], _shape_cell(row), "opt-in" if row["opt_in"] else "")
    _console().print(table)


@app.command()
@handle_errors
def logits(model: ModelArg,
           prompt: Annotated[str | None, typer.Option(help="Text to continue.")] = None,
           tokens: Annotated[str | None, typer.Option(help="Token ids instead of --prompt, e.g. '1,2,3'.")] = None,
           top_k_: Annotated[int, typer.Option("--top-k", min=1, help="How many next tokens to show.")] = 5,
           json_out: JsonOpt = False, dtype: DtypeOpt = "float32") -> None:
    """The top-k next tokens after --prompt (or --tokens) with their logits."""
    if (prompt is None) == (tokens is None):
        raise UsageError("Give exactly one of --prompt TEXT or --tokens IDS.")
    loaded = _load(model, dtype)
    ids = prompt_tokens(loaded, prompt, tokens)
    report = logits_report(loaded, ids, top_k_, name=model, prompt=prompt)
    if json_out:
        _print_json(report)
        return
    console = _console()
    shown = prompt if prompt is not None else " ".join(map(str, ids))
    console.print(f"[bold]{model}[/bold]  prompt {shown!r} ({len(ids)} tokens: {ids})")
    table = Table(show_header=True, header_style="bold", title="next token", title_justify="left")
    for column, justify in (("rank", "right"), ("token", "left"), ("id", "right"), ("logit", "right"), ("prob", "right")):
        table.add_column(column, justify=justify)
    for rank, row in enumerate(report["top_k"], 1):
        table.add_row(str(rank), repr(row["token"]), str(row["id"]), f"{row['logit']:.3f}", f"{row['prob']:.3f}")
    console.print(table)


# ----------------------------------------------------------------------------- analyses
# Each analysis command is a thin wrapper over a `*_command` function that writes a run directory.

OutOpt = Annotated[str, typer.Option("--out", help="Run directory to write (must not exist, unless --overwrite).")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing run directory (kept until the new one is complete).")]
PairsOpt = Annotated[str, typer.Option("--pairs", help='JSONL of {"clean", "corrupt", "answer", "foil"} texts.')]
MetricOpt = Annotated[str, typer.Option(help="logit_diff | logprob | prob_diff | kl")]


def _done(out: Any) -> None:
    _console().print(f"wrote {out} (report.md, results.json, arrays.npz, figures/)")


@app.command()
@handle_errors
def patch(model: ModelArg, pairs: PairsOpt, out: OutOpt,
          site: Annotated[str, typer.Option(help="resid_pre|resid_mid|resid_post|attn_out|mlp_out|z|q|k|v|pattern or a block hook.")] = "resid_pre",
          by: Annotated[str, typer.Option(help="Comma-separated dims, e.g. layer,pos or layer,head.")] = "layer,pos",
          metric: MetricOpt = "logit_diff",
          direction: Annotated[str, typer.Option(help="denoising (patch clean into corrupted) or noising.")] = "denoising",
          source: Annotated[str, typer.Option(help="resample | zero | mean | pos_mean")] = "resample",
          max_pairs: Annotated[int | None, typer.Option(help="Use at most this many pairs.")] = None,
          budget: Annotated[str | None, typer.Option(help="Memory per device for the vmapped patches, e.g. 2GiB (default: read from the device).")] = None,
          chunk: Annotated[int | None, typer.Option(help="Patches per vmapped chunk (overrides --budget).")] = None,
          mesh: Annotated[str | None, typer.Option(help="auto, DATA or DATAxMODEL (e.g. 4x2): shard pairs over data, weights over model.")] = None,
          overwrite: OverwriteOpt = False) -> None:
    """Exact activation patching sweep over minimal pairs (one compiled program)."""
    from jaxcirc.attribution_report import patch_command

    _done(patch_command(model, pairs, out, site=site, by=by, metric=metric, direction=direction,
                        source=source, max_pairs=max_pairs, overwrite=overwrite, budget=budget, chunk=chunk,
                        mesh=mesh))


@app.command()
@handle_errors
def attribute(model: ModelArg, pairs: PairsOpt, out: OutOpt,
              method: Annotated[str, typer.Option(help="atp | atp-star | eap | eap-ig")] = "atp",
              metric: MetricOpt = "logit_diff",
              steps: Annotated[int, typer.Option(help="EAP-IG interpolation steps.")] = 5,
              max_pairs: Annotated[int | None, typer.Option(help="Use at most this many pairs.")] = None,
              batch_size: Annotated[int, typer.Option(help="Pairs per compiled batch.")] = 8,
              validate: Annotated[bool, typer.Option(help="AtP: also run exact head patching and report the correlation.")] = False,
              budget: Annotated[str | None, typer.Option(help="Memory per device, e.g. 2GiB: picks the pairs per chunk (overrides --batch-size).")] = None,
              mesh: Annotated[str | None, typer.Option(help="auto, DATA or DATAxMODEL (e.g. 4x2): shard pairs over data, weights over model.")] = None,
              overwrite: OverwriteOpt = False) -> None:
    """Attribution patching (AtP, AtP*) or edge attribution (EAP, EAP-IG) over minimal pairs."""
    from jaxcirc.attribution_report import attribute_command

    _done(attribute_command(model, pairs, out, method=method, metric=metric, steps=steps, max_pairs=max_pairs,
                            batch_size=batch_size, validate=validate, overwrite=overwrite, budget=budget, mesh=mesh))


@app.command()
@handle_errors
def circuit(run_dir: Annotated[str, typer.Argument(help="Run directory of `jaxcirc attribute --method eap|eap-ig`.")],
            out: OutOpt,
            top_edges: Annotated[int, typer.Option(help="Edges kept in the circuit.")] = 200,
            ablation: Annotated[str, typer.Option(help="What non-circuit edges carry: corrupt | mean | zero.")] = "corrupt",
            overwrite: OverwriteOpt = False) -> None:
    """Circuit from edge scores: concentration, faithfulness by exact edge patching, drawing."""
    from jaxcirc.circuit_report import circuit_command

    _done(circuit_command(run_dir, out, top_edges=top_edges, ablation=ablation, overwrite=overwrite))


@app.command()
@handle_errors
def compare(circuits: Annotated[list[str], typer.Argument(help="circuit.json files or `jaxcirc circuit` run directories.")],
            out: OutOpt,
            bins: Annotated[int, typer.Option(help="Depth bins for matching models of different depth.")] = 10,
            k: Annotated[int, typer.Option(help="Top-k Laplacian eigenvalues compared.")] = 16,
            overwrite: OverwriteOpt = False) -> None:
    """Overlap (by index and depth bins) and spectral similarity of circuits."""
    from jaxcirc.circuit_report import compare_command

    _done(compare_command(circuits, out, bins=bins, k=k, overwrite=overwrite))


@app.command()
@handle_errors
def train(config: Annotated[str, typer.Argument(help="TOML config, or a built-in name (role_suite, short_context).")],
          out: Annotated[str, typer.Option("--out", help="Output directory (an existing run resumes).")],
          model: Annotated[list[str] | None, typer.Option("--model", help="Only these models of a suite.")] = None,
          steps: Annotated[int | None, typer.Option(help="Override the number of training steps.")] = None,
          stop_at: Annotated[int | None, typer.Option("--stop-at", help="Stop after this step (resume later).")] = None,
          quiet: bool = False) -> None:
    """Train a model or a suite with Pythia-like checkpoints (resumes an interrupted run)."""
    from jaxcirc.training import train_command

    train_command(config, out, models=model, steps=steps, stop_at=stop_at, quiet=quiet)


@app.command()
@handle_errors
def position(model: ModelArg, out: OutOpt,
             n_texts: Annotated[int, typer.Option(help="Texts of the shipped prose analysed.")] = 4,
             seq_len: Annotated[int, typer.Option(help="Tokens per text.")] = 256,
             seed: Annotated[list[int] | None, typer.Option(help="Seeds for random inits and shuffles (repeatable).")] = None,
             sink: Annotated[str, typer.Option(help="Attention-sink column: exclude | include | separate.")] = "exclude",
             lm_infinite_len: Annotated[int, typer.Option(help="Tokens for the LM-Infinite comparison.")] = 128,
             dtype: DtypeOpt = "float32", overwrite: OverwriteOpt = False) -> None:
    """Position generalization (Han & Ji): attention-logit decomposition vs random inits, q/k
    frequency statistics, shuffle and position-id perturbation curves, LM-Infinite attention."""
    from jaxcirc.position_report import position_command

    _done(position_command(model, out, n_texts=n_texts, seq_len=seq_len, seeds=tuple(seed or (0,)), sink=sink,
                           lm_infinite_len=lm_infinite_len, dtype=dtype, overwrite=overwrite))


@app.command()
@handle_errors
def length(model: ModelArg, out: OutOpt,
           trained_len: Annotated[int | None, typer.Option(help="Context the model was trained on (default n_ctx).")] = None,
           eval_len: Annotated[int | None, typer.Option(help="Tokens per evaluation text (default 4 x trained length).")] = None,
           n_texts: Annotated[int, typer.Option(help="Evaluation texts.")] = 4,
           n_global: Annotated[int, typer.Option(help="LM-Infinite's global prefix.")] = 4,
           text: Annotated[str, typer.Option(help="natural (shipped prose) | role (role-corpus paragraphs) | PATH.")] = "natural",
           dtype: DtypeOpt = "float32", overwrite: OverwriteOpt = False) -> None:
    """Length generalization: loss past the trained length with full attention, LM-Infinite's
    Lambda mask, and LM-Infinite (mask + distance cap)."""
    from jaxcirc.length_generalization import length_command

    _done(length_command(model, out, trained_len=trained_len, eval_len=eval_len, n_texts=n_texts,
                         n_global=n_global, text=text, dtype=dtype, overwrite=overwrite))


@app.command()
@handle_errors
def arithmetic(model: Annotated[str, typer.Argument(metavar="MODEL", help="Model to analyse.")] = "smollm2-135m",
               task: Annotated[str, typer.Option(help="capitals | uppercase | past-tense | all")] = "all",
               out: OutOpt = "runs/arithmetic",
               n_examples: Annotated[int, typer.Option(help="Queries per task.")] = 24,
               seed: int = 0,
               n_shots: Annotated[int | None, typer.Option(help="Few-shot demonstrations (default per task).")] = None,
               overwrite: OverwriteOpt = False) -> None:
    """Word2Vec-style arithmetic (Merullo et al.): logit lens stages, o-vectors, abstractive vs extractive."""
    from jaxcirc.arithmetic_report import arithmetic_command

    _done(arithmetic_command(model, task, out, n_examples=n_examples, seed=seed, n_shots=n_shots,
                             overwrite=overwrite))


@app.command()
@handle_errors
def roles(model: Annotated[str, typer.Argument(metavar="MODEL_OR_SUITE", help="Model, trained suite directory, or Pythia step revisions.")] = "smollm2-135m",
          out: OutOpt = "runs/roles",
          suite: Annotated[str | None, typer.Option(help="Trained suite for emergence and cross-scale analyses (default: runs/role_suite if present).")] = None,
          full: Annotated[bool, typer.Option("--full", help="The full run (256 pairs per role) instead of the quick one.")] = False,
          pairs_per_role: Annotated[int | None, typer.Option(help="Override the pairs per role.")] = None,
          roles_: Annotated[str | None, typer.Option("--roles", help="Comma-separated subset of roles.")] = None,
          train_suite: Annotated[bool, typer.Option("--train-suite", help="Train the role suite first if it is missing.")] = False,
          seed: int = 0, overwrite: OverwriteOpt = False) -> None:
    """Semantic-role circuits (Aljaafari et al.): role-cross pairs, EAP-IG circuits, concentration,
    faithfulness, emergence over checkpoints, cross-model overlap, spectra and CKA."""
    from jaxcirc.roles_report import roles_command

    _done(roles_command(model, out, suite_dir=suite, quick=not full, pairs_per_role=pairs_per_role,
                        roles=roles_.split(",") if roles_ else None, train_suite=train_suite, seed=seed,
                        overwrite=overwrite))


@app.command()
@handle_errors
def sweep(sweep_file: Annotated[str, typer.Argument(metavar="SWEEP.toml", help="Grid of models, tasks, methods and options.")],
          out: Annotated[str, typer.Option("--out", help="Sweep directory (an existing one resumes).")],
          extend: Annotated[bool, typer.Option("--extend", help="Accept a grid that adds units to the one in --out.")] = False,
          gather_only: Annotated[bool, typer.Option("--gather-only", help="Only rebuild results.csv and report.md.")] = False,
          dry_run: Annotated[bool, typer.Option("--dry-run", help="Check the grid and count units; run nothing.")] = False) -> None:
    """Run a grid of analyses as units; killed at any point and rerun, it redoes only unfinished units."""
    from jaxcirc.sweep import gather_only as gather, run_sweep

    console = _console()
    if gather_only:
        info = gather(out)
        console.print(f"{out}: {info['done']} of {info['units']} units gathered into {info['rows']} rows; "
                      f"wrote {', '.join(info['tables'])} and {info['report']}")
        return
    result = run_sweep(sweep_file, out, extend=extend, dry_run=dry_run)
    if dry_run:
        console.print(f"{sweep_file}: {result['units']} units, {result['done_before']} already done in {out}, "
                      f"{result['new']} not yet recorded there")
        return
    console.print(f"{out}: {result['units']} units ({result['done_before']} done before, {result['run']} run now, "
                  f"{len(result['failed'])} failed); wrote results.csv and report.md")
    if result["failed"]:
        raise ValueError(f"{len(result['failed'])} unit(s) failed (see {out}/failures.json); "
                         "rerun the same command to retry them.")


def main() -> None:  # pragma: no cover - `python -m jaxcirc.cli`
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
