"""How far exact patching can lead TransformerLens on this machine: FLOPs per patch on each side.

    python benchmarks/patching_bounds.py bench_gpt2.json bench_smollm2.json ...

Reads `bench_vs_transformerlens.py` JSON files. For every pair of rows of an exact patching task
(`SWEEPS`: patch_resid, patch_z, patch_z_pos) it counts the matmul FLOPs of one patch for
TransformerLens (a full forward, logits at every position, full vocabulary) and what jaxcirc's
resumed sweep must compute (layers >= l; positions >= p for position sweeps, and none of the
prefix every pair shares; a head patch's start block only projects the heads' outputs; the last
block's keys and values everywhere but the rest at the metric position only; two unembedding
columns), averaged over the sweep's patches (those inside the shared prefix count, at no cost),
turns both measured rates into GFLOP/s, and prints the speed-up jaxcirc would reach at 100% of
the run's matmul roofline (and, where the run measured it, TransformerLens' fraction of torch's
own matmul roofline).
"""

from __future__ import annotations

import json
import sys

from bench_vs_transformerlens import SWEEPS
from shapes import SHAPES, forward_flops


def layer_flops(cfg, n_keys: int) -> int:
    """Matmul FLOPs of one block for one token attending to n_keys keys."""
    d, h, kv, dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head
    return 2 * d * (h + 2 * kv) * dh + 2 * h * dh * d + 4 * h * n_keys * dh + 2 * d * cfg.d_mlp * (3 if cfg.gated_mlp else 2)


def resumed_flops(cfg, batch: int, pos: int, by_position: bool, from_heads: bool, shared: int = 0) -> float:
    """Mean matmul FLOPs of one patch of a jaxcirc sweep, by position or not, of the residual or
    of head outputs, the pairs sharing their first `shared` tokens."""
    d, dh = cfg.d_model, cfg.d_head
    kv_only = 2 * d * 2 * cfg.n_kv_heads * dh
    # A head patch's start block reads the unpatched heads' outputs: output projection + MLP.
    start_block = (lambda keys: 2 * cfg.n_heads * dh * d + 2 * d * cfg.d_mlp * (3 if cfg.gated_mlp else 2)) \
        if from_heads else (lambda keys: layer_flops(cfg, keys))
    total, count = 0.0, 0
    for layer in range(cfg.n_layers):
        for p in range(pos) if by_position else [shared]:
            count += 1
            if p < shared:
                continue  # both runs agree there: not run
            n = pos - p  # positions recomputed; a packed row's queries read about pos + 1 keys
            if layer == cfg.n_layers - 1:
                total += n * start_block(pos + 1)
            else:
                total += (cfg.n_layers - 2 - layer) * n * layer_flops(cfg, pos + 1) + n * kv_only + n * start_block(pos + 1) \
                    + layer_flops(cfg, pos + 1)
    return batch * (total / count + 2 * 2 * d)


def main() -> None:
    print("| shape | batch x pos | sweep | TL GFLOP/patch | TL GFLOP/s (roofline) | jaxcirc GFLOP/patch | "
          "jaxcirc GFLOP/s (roofline) | FLOP ratio | measured | at 100% roofline | TL / torch roofline |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for path in sys.argv[1:]:
        data = json.load(open(path))
        roofline = data["machine"]["roofline_gflops_fp32"]
        torch_roofline = data["machine"].get("torch_roofline_gflops_fp32")  # absent before 2026-12-07
        corrupt_at = data["machine"].get("corrupt_at")  # absent: files from before the shared-prefix skip
        rates = {(r["model"], r["task"], r["batch"], r["pos"], r["impl"]): r["rate"] for r in data["rows"]}
        for (model, task, batch, pos, impl), ours in rates.items():
            if impl != "jaxcirc" or task not in SWEEPS:
                continue
            cfg = SHAPES[model]
            theirs = rates[(model, task, batch, pos, "transformer_lens")]
            tl = forward_flops(cfg, batch, pos, pos)
            shared = 0 if corrupt_at is None else (pos // 3 if isinstance(corrupt_at, str) else min(corrupt_at))
            site, by, _ = SWEEPS[task]
            sweep = f"{site} by ({', '.join(by)})"
            us = resumed_flops(cfg, batch, pos, by_position="pos" in by, from_heads=site == "z", shared=shared)
            tl_rate, our_rate = tl * theirs / 1e9, us * ours / 1e9
            print(f"| {model} | {batch} x {pos} | {sweep} | {tl / 1e9:.1f} | {tl_rate:.0f} ({tl_rate / roofline:.0%}) | "
                  f"{us / 1e9:.1f} | {our_rate:.0f} ({our_rate / roofline:.0%}) | {tl / us:.1f}x | {ours / theirs:.1f}x | "
                  f"{tl / us * roofline / tl_rate:.1f}x | {f'{tl_rate / torch_roofline:.0%}' if torch_roofline else ''} |")


if __name__ == "__main__":
    main()
