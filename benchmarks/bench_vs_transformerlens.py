"""jaxcirc vs TransformerLens 3.9 vs HF transformers, side by side on the same weights and pairs.

    python benchmarks/bench_vs_transformerlens.py --batches 1,8 --out bench.json
    python benchmarks/bench_vs_transformerlens.py --model smollm2-shape --batches 1

One process, one random-init HF checkpoint (`save_pretrained` into a temp dir) loaded by jaxcirc
(`load_hf_directory`) and by TransformerLens (`tl_patching_parity.tl_model`: HookedTransformerConfig
+ weight conversion, no folding), the same random-token pairs (corrupt = clean with two positions
changed, metric = logit(answer) - logit(foil) at the last position). For every task the results
are checked to agree before anything is timed; implementations are timed alternately
(`harness.alternate`) so that machine noise hits both.

Tasks (rates are per second of steady-state wall time, compile excluded: the first call, which
is also the agreement check, is reported as first_s):
  atp      AtP of heads [layer, head] (attn.hook_z), mlp_out [layer], resid_pre [layer, pos].
           TL: the standard recipe - run_with_cache(corrupt) under no_grad, then a clean forward
           with hooks that retain the activations' grads, mean logit diff, backward (parameters
           frozen: activation gradients only, like jaxcirc), and
           sum((corrupt - clean) * grad). Rate: pairs/s.
  patch_resid / patch_z / patch_z_pos  exact denoising activation patching: resid_pre by
           (layer, pos), head outputs (hook_z) by (layer, head), and head outputs by (layer, pos,
           head), the largest of TL's standard sweeps (12 x 16 x 12 = 2,304 patches on the GPT-2
           shape). jaxcirc runs the full grid with `patch_sweep`; TL's `generic_activation_patch`
           (what get_act_patch_resid_pre / _attn_head_out_all_pos / _attn_head_out_by_pos call)
           runs `--tl-patches` rows spread evenly over the same grid (index_df), since TL costs one
           forward per patch; rate = patches timed / seconds for each. Agreement is checked on
           those rows.
  eap_ig   EAP-IG edge scores, 5 steps, "inputs" variant. TL has none; the torch loop: for each
           step k = 0..4, a forward on the clean tokens with hook_embed replaced by
           emb' + k/5 (emb - emb') and hooks retaining the grads of hook_q_input/k_input/v_input
           (use_split_qkv_input), hook_mlp_in and the last hook_resid_post; backward of the summed
           logit diff; grads averaged over steps; node outputs (hook_embed + hook_pos_embed,
           attn.hook_result, hook_mlp_out) from run_with_cache on clean and corrupt;
           scores = einsum(diff, grad) / n_pairs on valid edges. Rate: pairs/s.
  forward  a plain forward, full logits [batch, pos, vocab]; jaxcirc vs HF (eager attention)
           and TL. Rate: tokens/s.

The matmul roofline (n=2048 fp32, jitted) is measured in the same run; AtP's achieved fraction
counts only the FLOPs the method needs (see `forward_flops`): 2 forwards unembedding one position
per pair (clean + corrupt) + 1 backward w.r.t. activations only (no weight gradients: ~1 forward)
= 3 x forward(unembed at 1 position). TL's recipe does more work (full [b, p, vocab] logits), which
the count does not credit.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TQDM_DISABLE", "1")  # TL's patching loop draws a progress bar per sweep

import harness  # noqa: E402
from shapes import forward_flops, names_from, comma_ints  # noqa: E402
from tl_patching_parity import random_hf_model, require_transformer_lens, tl_model  # noqa: E402

MODELS: dict[str, tuple[str, str, str, dict[str, Any]]] = {
    # name -> (tl_model family, transformers config class, model class, config kwargs)
    "gpt2-small-shape": ("gpt2", "GPT2Config", "GPT2LMHeadModel", dict(
        n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257)),
    "smollm2-shape": ("llama", "LlamaConfig", "LlamaForCausalLM", dict(
        hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        intermediate_size=1536, vocab_size=49152, max_position_embeddings=2048, rms_norm_eps=1e-5,
        tie_word_embeddings=False, rope_theta=100000.0)),
}


def make_hf(name: str, overrides: dict[str, int], seed: int = 0):
    """Random-init HF model of the named shape; biases / norm weights jittered off their init."""
    family, config_cls, model_cls, kwargs = MODELS[name]
    kwargs = {**kwargs, **{k: v for k, v in overrides.items() if v}}
    return family, random_hf_model(config_cls, model_cls, kwargs, seed, jitter=0.02)


# Exact patching tasks: task -> (site, by; TL's patch setter in transformer_lens.patching).
SWEEPS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "patch_resid": ("resid_pre", ("layer", "pos"), "layer_pos_patch_setter"),
    "patch_z": ("z", ("layer", "head"), "layer_head_vector_patch_setter"),
    "patch_z_pos": ("z", ("layer", "pos", "head"), "layer_pos_head_vector_patch_setter"),
}
TASKS = ("forward", "atp", *SWEEPS, "eap_ig")


def make_pairs(batch: int, pos: int, vocab: int, seed: int = 1, corrupt_at: list[int] | None = None):
    """Random clean tokens, corrupt = clean with the positions `corrupt_at` (default pos//3 and
    pos//2) changed: every pair shares its first min(corrupt_at) tokens."""
    rng = np.random.default_rng(seed)
    clean = rng.integers(0, vocab, (batch, pos)).astype(np.int32)
    corrupt = clean.copy()
    for p in sorted(set(corrupt_at or [pos // 3, pos // 2])):
        corrupt[:, p] = (clean[:, p] + 1 + rng.integers(0, vocab - 1, batch)) % vocab
    answer = rng.integers(0, vocab, batch).astype(np.int32)
    foil = ((answer + 1 + rng.integers(0, vocab - 1, batch)) % vocab).astype(np.int32)
    return clean, corrupt, answer, foil


# ---------------------------------------------------------------------------------------------
# TransformerLens / torch implementations


def tl_metric(answer_t, foil_t):
    import torch

    rows = torch.arange(len(answer_t))

    def metric(logits):  # mean logit diff at the last position
        last = logits[:, -1]
        return (last[rows, answer_t] - last[rows, foil_t]).mean()
    return metric


def tl_atp(model, clean_t, corrupt_t, metric) -> dict[str, np.ndarray]:
    import torch

    L = model.cfg.n_layers
    names = [f"blocks.{l}.{t}" for l in range(L) for t in ("attn.hook_z", "hook_mlp_out", "hook_resid_pre")]
    with torch.no_grad():
        _, corrupt_cache = model.run_with_cache(corrupt_t, names_filter=lambda n: n in names)
    acts: dict[str, Any] = {}

    def keep(act, hook):
        act.retain_grad()
        acts[hook.name] = act
        return act

    def leaf(act, hook):  # params are frozen: grads flow from here (activation grads only)
        return act.detach().requires_grad_(True)

    with torch.enable_grad():
        logits = model.run_with_hooks(clean_t, fwd_hooks=[("hook_embed", leaf)] + [(n, keep) for n in names])
        metric(logits).backward()

    def score(t):
        return torch.stack([((corrupt_cache[f"blocks.{l}.{t}"] - acts[f"blocks.{l}.{t}"].detach())
                             * acts[f"blocks.{l}.{t}"].grad) for l in range(L)])  # [l, b, p, ...]
    with torch.no_grad():
        return {"head": score("attn.hook_z").sum((1, 2, 4)).numpy(),
                "mlp_out": score("hook_mlp_out").sum((1, 2, 3)).numpy(),
                "resid_pre": score("hook_resid_pre").sum((1, 3)).numpy()}


def tl_eap_ig(model, clean_t, corrupt_t, answer_t, foil_t, valid: np.ndarray, steps: int) -> np.ndarray:
    import torch

    cfg = model.cfg
    L = cfg.n_layers
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    model.set_use_attn_result(True)
    try:
        outs = ["hook_embed", "hook_pos_embed"] + [f"blocks.{l}.{t}" for l in range(L)
                                                   for t in ("attn.hook_result", "hook_mlp_out")]
        with torch.no_grad():
            _, cc = model.run_with_cache(clean_t, names_filter=lambda n: n in outs)
            _, xc = model.run_with_cache(corrupt_t, names_filter=lambda n: n in outs)

        def nodes(cache):  # [b, p, n_src, d]: input, then per layer heads and MLP
            c = dict(cache.items())
            parts = [(c["hook_embed"] + c.get("hook_pos_embed", 0))[:, :, None]]
            for l in range(L):
                parts += [c[f"blocks.{l}.attn.hook_result"], c[f"blocks.{l}.hook_mlp_out"][:, :, None]]
            return torch.cat(parts, 2)
        diff = nodes(xc) - nodes(cc)
        emb, emb_x = cc["hook_embed"], xc["hook_embed"]
        dsts = [f"blocks.{l}.{t}" for l in range(L) for t in ("hook_q_input", "hook_k_input", "hook_v_input",
                                                              "hook_mlp_in")] + [f"blocks.{L - 1}.hook_resid_post"]
        total: dict[str, Any] = {}
        rows = torch.arange(len(answer_t))
        for k in range(steps):
            acts: dict[str, Any] = {}

            def interpolate(act, hook, alpha=k / steps):  # params are frozen: grads start here
                return (emb_x + alpha * (emb - emb_x)).requires_grad_(True)

            def keep(act, hook):
                act.retain_grad()
                acts[hook.name] = act
                return act
            with torch.enable_grad():
                logits = model.run_with_hooks(clean_t, fwd_hooks=[("hook_embed", interpolate)]
                                              + [(n, keep) for n in dsts])
                last = logits[:, -1]
                (last[rows, answer_t] - last[rows, foil_t]).sum().backward()
            for n in dsts:
                total[n] = acts[n].grad if n not in total else total[n] + acts[n].grad
        parts = []
        for l in range(L):
            g = [total[f"blocks.{l}.{t}"] for t in ("hook_q_input", "hook_k_input", "hook_v_input")]
            parts += g + [total[f"blocks.{l}.hook_mlp_in"][:, :, None]]
        parts.append(total[f"blocks.{L - 1}.hook_resid_post"][:, :, None])
        grads = torch.cat(parts, 2) / steps
        with torch.no_grad():
            scores = torch.einsum("bpnd,bpmd->nm", diff, grads) / len(answer_t)
        return np.where(valid, scores.numpy(), 0.0)
    finally:
        model.set_use_split_qkv_input(False)
        model.set_use_hook_mlp_in(False)
        model.set_use_attn_result(False)


def tl_patch(model, corrupt_t, clean_cache, metric, task: str, rows: np.ndarray):
    """TL's generic_activation_patch of `task` (SWEEPS) on the given rows [n, len(by)]."""
    import pandas as pd
    import torch
    from transformer_lens import patching

    site, by, setter = SWEEPS[task]
    with torch.no_grad():
        return patching.generic_activation_patch(
            model, corrupt_t, clean_cache, metric, getattr(patching, setter), site,
            index_df=pd.DataFrame(rows, columns=list(by))).numpy()


def timed_first(fns: dict[str, Any]) -> tuple[dict[str, Any], dict[str, float]]:
    """Call each implementation once (compile + run), returning results and first-call seconds."""
    out, first = {}, {}
    for name, fn in fns.items():
        start = time.perf_counter()
        out[name] = harness.block(fn())
        first[name] = time.perf_counter() - start
    return out, first


def interleave(fns: dict[str, Any], first: dict[str, float], repeats: int) -> dict[str, dict[str, float]]:
    """`harness.alternate` without its warm-up (the agreement check already warmed every function,
    and its timing is kept as first_s): A B A B ..., median and min per implementation."""
    import statistics

    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            harness.block(fn())
            times[name].append(time.perf_counter() - start)
    return {n: {"first_s": first[n], "median_s": statistics.median(t), "min_s": min(t)} for n, t in times.items()}


# ---------------------------------------------------------------------------------------------


def run(args) -> tuple[list[dict], dict]:
    import jax
    import torch

    from jaxcirc.attribution import atp
    from jaxcirc.eap import eap_ig
    from jaxcirc.graph import Graph
    from jaxcirc.model import Model
    from jaxcirc.models.hf import load_hf_directory
    from jaxcirc.models.transformer import make_forward
    from jaxcirc.pairs import from_tokens
    from jaxcirc.patching import patch_sweep

    meta = harness.machine()
    meta["load_avg_start"] = os.getloadavg()
    roofline = harness.matmul_roofline()
    meta["roofline_gflops_fp32"] = roofline
    meta["torch_roofline_gflops_fp32"] = harness.torch_matmul_roofline()
    print(f"fp32 matmul roofline: {roofline:.0f} GFLOP/s (torch: {meta['torch_roofline_gflops_fp32']:.0f}); "
          f"load average {meta['load_avg_start']}", flush=True)

    overrides = {"n_layer" if "gpt2" in args.model else "num_hidden_layers": args.n_layers,
                 "n_embd" if "gpt2" in args.model else "hidden_size": args.d_model,
                 "n_head" if "gpt2" in args.model else "num_attention_heads": args.n_heads,
                 "vocab_size": args.vocab}
    family, hf = make_hf(args.model, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        cfg, params, _ = load_hf_directory(tmp)
    params = jax.device_put(params)
    model = Model(cfg, params)
    tl = tl_model(family, hf)
    # Only activation gradients are needed (as in jaxcirc); left on, torch would also build weight
    # gradients (incl. the 50257 x 768 embedding) on every backward and TL would be slower still.
    for p in tl.parameters():
        p.requires_grad_(False)
    forward = make_forward(cfg)
    graph = Graph.from_config(cfg)
    meta.update(model=args.model, config=str(cfg), torch_threads=torch.get_num_threads())
    tasks = args.tasks
    corrupt_at = args.corrupt_at
    meta["corrupt_at"] = corrupt_at or "pos//3,pos//2"
    rows: list[dict] = []

    def record(task, batch, pos, unit, n_units, timings, diff, scale, flops=None, note=""):
        for impl, t in timings.items():
            row = dict(model=args.model, task=task, impl=impl, batch=batch, pos=pos, unit=unit,
                       n_units=n_units[impl], median_s=t["median_s"], min_s=t["min_s"], first_s=t["first_s"],
                       rate=n_units[impl] / t["median_s"], max_abs_diff=diff, scale=scale,
                       load_avg=os.getloadavg(), note=note)
            if flops:
                row["gflops_needed"] = flops / 1e9
                row["roofline_fraction"] = flops / t["median_s"] / 1e9 / roofline
            rows.append(row)
            print(f"  {task:12s} b={batch:<3d} {impl:16s} median {t['median_s']:8.3f} s  first {t['first_s']:7.1f} s"
                  f"  {row['rate']:9.2f} {unit}" + (f"  {row['roofline_fraction']:.0%} of roofline" if flops else ""),
                  flush=True)
        harness.write_rows(args.out, rows, meta)

    for batch in args.batches:
        pos = args.pos
        clean, corrupt, answer, foil = make_pairs(batch, pos, cfg.d_vocab, corrupt_at=corrupt_at)
        pairs = from_tokens(clean, corrupt, answer, foil)
        clean_t, corrupt_t = torch.as_tensor(clean).long(), torch.as_tensor(corrupt).long()
        answer_t, foil_t = torch.as_tensor(answer).long(), torch.as_tensor(foil).long()
        metric = tl_metric(answer_t, foil_t)
        print(f"batch {batch} x {pos} tokens (load {os.getloadavg()[0]:.1f})", flush=True)

        if "forward" in tasks:
            ours = lambda: forward(params, clean)[0]
            with torch.no_grad():
                fns = {"jaxcirc": ours, "hf": lambda: hf(clean_t).logits, "transformer_lens": lambda: tl(clean_t)}
                res, first = timed_first(fns)
                ref = res["hf"].numpy()
                scale = float(np.abs(ref).max())
                diff = max(harness.agree(res["jaxcirc"], ref, 1e-3 * scale + 1e-4, "forward vs HF"),
                           harness.agree(res["transformer_lens"], ref, 1e-3 * scale + 1e-4, "TL vs HF"))
                timings = interleave(fns, first, args.repeats)
            record("forward", batch, pos, "tokens/s", {k: batch * pos for k in fns}, timings, diff, scale)

        if "atp" in tasks:
            sites = ("head", "mlp_out", "resid_pre")
            ours = lambda: atp(cfg, params, pairs, sites=sites).scores
            theirs = lambda: tl_atp(tl, clean_t, corrupt_t, metric)
            fns = {"jaxcirc": ours, "transformer_lens": theirs}
            (a, b), first = (lambda r: ((r[0]["jaxcirc"], r[0]["transformer_lens"]), r[1]))(timed_first(fns))
            scale = max(float(np.abs(b[s]).max()) for s in sites)
            diff = max(harness.agree(a[s], b[s], 1e-3 * scale + 1e-5, f"AtP {s}") for s in sites)
            timings = interleave(fns, first, args.repeats)
            record("atp", batch, pos, "pairs/s", {"jaxcirc": batch, "transformer_lens": batch}, timings, diff,
                   scale, flops=3 * forward_flops(cfg, batch, pos, 1))

        for task, (site, by, _) in SWEEPS.items():
            if task not in tasks:
                continue
            sizes = tuple({"layer": cfg.n_layers, "pos": pos, "head": cfg.n_heads}[d] for d in by)
            grid = np.indices(sizes).reshape(len(sizes), -1).T
            # An evenly spread subset of the grid for TL (every layer is represented).
            subset = grid[np.linspace(0, len(grid) - 1, min(args.tl_patches, len(grid))).round().astype(int)]
            with torch.no_grad():
                _, clean_cache = tl.run_with_cache(clean_t)
            ours = lambda: patch_sweep(model, pairs, site, by, direction="denoising").patch_effect
            theirs = lambda: tl_patch(tl, corrupt_t, clean_cache, metric, task, subset)
            fns = {"jaxcirc": ours, "transformer_lens": theirs}
            res, first = timed_first(fns)
            a, b = np.asarray(res["jaxcirc"]), res["transformer_lens"]
            a_sub = a[tuple(subset.T)]
            scale = float(np.abs(b).max())
            diff = harness.agree(a_sub, b, 1e-3 * scale + 1e-5, f"patching {site}")
            timings = interleave(fns, first, args.patch_repeats)
            record(task, batch, pos, "patches/s", {"jaxcirc": len(grid), "transformer_lens": len(subset)},
                   timings, diff, scale, note=f"jaxcirc: full {len(grid)}-patch grid; TL: {len(subset)} of them")
            del clean_cache

        if "eap_ig" in tasks:
            ours = lambda: eap_ig(cfg, params, pairs, steps=args.steps).scores
            theirs = lambda: tl_eap_ig(tl, clean_t, corrupt_t, answer_t, foil_t, graph.valid, args.steps)
            fns = {"jaxcirc": ours, "torch_loop_on_tl": theirs}
            res, first = timed_first(fns)
            a, b = np.asarray(res["jaxcirc"]), res["torch_loop_on_tl"]
            scale = float(np.abs(b).max())
            diff = harness.agree(a, b, 1e-3 * scale + 1e-5, "EAP-IG")
            timings = interleave(fns, first, args.repeats)
            record("eap_ig", batch, pos, "pairs/s", {"jaxcirc": batch, "torch_loop_on_tl": batch}, timings,
                   diff, scale, flops=(2 + 2 * args.steps) * forward_flops(cfg, batch, pos, 1))
    meta["load_avg_end"] = os.getloadavg()
    harness.write_rows(args.out, rows, meta)
    return rows, meta


def markdown(rows: list[dict], meta: dict) -> str:
    lines = ["| model | task | batch x pos | jaxcirc | other | other impl | jaxcirc / other | jaxcirc roofline "
             "| other roofline | max abs diff | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["task"], r["batch"], r["pos"]), {})[r["impl"]] = r
    for (model, task, batch, pos), impls in groups.items():
        ours = impls["jaxcirc"]
        for name, other in impls.items():
            if name == "jaxcirc":
                continue
            frac = lambda r: f"{r['roofline_fraction']:.0%}" if "roofline_fraction" in r else ""
            lines.append(f"| {model} | {task} | {batch} x {pos} | {ours['rate']:.2f} {ours['unit']} | "
                         f"{other['rate']:.2f} | {name} | {ours['rate'] / other['rate']:.2f}x | {frac(ours)} | "
                         f"{frac(other)} | {ours['max_abs_diff']:.1e} | {ours['load_avg'][0]:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(MODELS), default="gpt2-small-shape")
    parser.add_argument("--batches", type=comma_ints(), default=[1, 8], help="comma-separated batch sizes")
    parser.add_argument("--pos", type=int, default=16)
    parser.add_argument("--tasks", type=names_from(TASKS), default=list(TASKS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--patch-repeats", type=int, default=1)
    parser.add_argument("--tl-patches", type=int, default=12, help="patches TL runs per sweep (a spread subset)")
    parser.add_argument("--steps", type=int, default=5, help="EAP-IG steps")
    parser.add_argument("--n-layers", type=int, default=0, help="override the shape (0 = keep)")
    parser.add_argument("--d-model", type=int, default=0)
    parser.add_argument("--n-heads", type=int, default=0)
    parser.add_argument("--vocab", type=int, default=0)
    parser.add_argument("--corrupt-at", type=comma_ints(0), default=[], help="comma-separated positions the corrupted prompts change "
                        "(default pos//3,pos//2); patching skips the prefix every pair shares")
    parser.add_argument("--out", default="bench_vs_transformerlens.json")
    args = parser.parse_args()
    if args.pos < 2:
        parser.error(f"--pos {args.pos}: the pairs need at least 2 tokens")
    if any(not 0 <= p < args.pos for p in args.corrupt_at):
        parser.error(f"--corrupt-at {args.corrupt_at}: positions must lie in 0..{args.pos - 1} (--pos {args.pos})")
    require_transformer_lens()
    start = time.perf_counter()
    rows, meta = run(args)
    print(f"\nroofline {meta['roofline_gflops_fp32']:.0f} GFLOP/s fp32 (torch {meta['torch_roofline_gflops_fp32']:.0f}); "
          f"load average start "
          f"{meta['load_avg_start']}, end {meta['load_avg_end']}; total {time.perf_counter() - start:.0f} s\n")
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
