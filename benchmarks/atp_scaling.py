"""AtP time and fraction of the matmul roofline vs batch, sequence length and depth.

    python benchmarks/atp_scaling.py --batches 1,8,32 --pos 16 --out atp_batch.json
    python benchmarks/atp_scaling.py --batches 8 --pos 8,16,32,64 --out atp_pos.json
    python benchmarks/atp_scaling.py --batches 8 --layers 4,8,12 --out atp_layers.json

GPT-2-small shape (random init) or `--model smollm2-shape`; AtP of heads [layer, head], mlp_out
[layer] and resid_pre [layer, pos] (the sites bench_vs_transformerlens.py times), logit
difference. FLOPs the method needs = 3 forwards (corrupted forward, clean forward, and the
backward w.r.t. activations only, which costs one forward: no weight gradients), each forward
counting every matmul (projections, the full pos x pos attention square, MLP) and the
unembedding at the metric position only (`prefix_reuse.forward_flops`). Roofline = the fp32
matmul micro-benchmark of the same run (2048^3). "Ceiling" = the same run's forward + backward
through the model's dense matmuls alone at the same number of rows
(`harness.matmul_chain_ceiling`): the rate small matmuls reach on this machine. Writes JSON
after every point and a markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import machine, matmul_chain_ceiling, matmul_roofline, time_call, write_rows, write_table  # noqa: E402
from patching_throughput import GPT2_SMALL, make_pairs, random_params  # noqa: E402
from prefix_reuse import SMOLLM2_SHAPE, forward_flops  # noqa: E402

import jax.numpy as jnp  # noqa: E402

from jaxcirc.attribution import atp  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("gpt2-small-shape", "smollm2-shape"), default="gpt2-small-shape")
    parser.add_argument("--batches", default="8")
    parser.add_argument("--pos", default="16")
    parser.add_argument("--layers", default=None, help="comma list of depths (default: the model's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="atp_scaling.json")
    args = parser.parse_args()
    base = GPT2_SMALL if args.model == "gpt2-small-shape" else SMOLLM2_SHAPE
    depths = [base.n_layers] if args.layers is None else [int(x) for x in args.layers.split(",")]
    roofline = matmul_roofline()
    meta = machine() | {"roofline_gflops": roofline, "command": " ".join(sys.argv)}
    print(f"roofline {roofline:.0f} GFLOP/s, load {os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    for n_layers in depths:
        cfg = base.replace(n_layers=n_layers)
        params = random_params(cfg)
        for batch in (int(x) for x in args.batches.split(",")):
            for pos in (int(x) for x in args.pos.split(",")):
                pairs = make_pairs(batch, pos, cfg.d_vocab)
                run = lambda: jnp.asarray(atp(cfg, params, pairs, sites=("head", "mlp_out", "resid_pre"))["head"])
                t = time_call(run, repeats=args.repeats)
                flops = 3 * batch * forward_flops(cfg, pos)
                ceiling = matmul_chain_ceiling(cfg, batch * pos)
                row = {"model": args.model, "n_layers": n_layers, "batch": batch, "pos": pos,
                       "first_s": t["first_s"], "median_s": t["median_s"], "pairs_per_s": batch / t["median_s"],
                       "needed_gflop": flops / 1e9, "gflops": flops / t["median_s"] / 1e9,
                       "roofline_fraction": flops / t["median_s"] / 1e9 / roofline, "ceiling_gflops": ceiling,
                       "ceiling_fraction": flops / t["median_s"] / 1e9 / ceiling, "load": os.getloadavg()[0]}
                rows.append(row)
                print(f"L{n_layers} b{batch} p{pos}: {row['median_s'] * 1e3:.0f} ms = {row['pairs_per_s']:.2f} pairs/s, "
                      f"{row['gflops']:.0f} GFLOP/s = {100 * row['roofline_fraction']:.0f}% of roofline, "
                      f"{100 * row['ceiling_fraction']:.0f}% of the {ceiling:.0f} GFLOP/s same-shape ceiling "
                      f"(load {row['load']:.1f})", flush=True)
                write_rows(args.out, rows, meta)
    write_table(os.path.splitext(args.out)[0] + ".md", f"roofline {roofline:.0f} GFLOP/s; command: `{meta['command']}`",
                ["model", "layers", "batch x pos", "ms", "pairs/s", "GFLOP/s", "roofline", "ceiling GFLOP/s",
                 "of ceiling", "load"],
                [[r["model"], str(r["n_layers"]), f"{r['batch']} x {r['pos']}", f"{r['median_s'] * 1e3:.0f}",
                  f"{r['pairs_per_s']:.2f}", f"{r['gflops']:.0f}", f"{100 * r['roofline_fraction']:.0f}%",
                  f"{r['ceiling_gflops']:.0f}", f"{100 * r['ceiling_fraction']:.0f}%", f"{r['load']:.1f}"] for r in rows])

if __name__ == "__main__":
    main()
