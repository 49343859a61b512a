"""AtP time and fraction of the matmul roofline vs batch, sequence length and depth.

    python benchmarks/atp_scaling.py --batches 1,8,32 --pos 16 --out atp_batch.json
    python benchmarks/atp_scaling.py --batches 8 --pos 8,16,32,64 --out atp_pos.json
    python benchmarks/atp_scaling.py --batches 8 --layers 4,8,12 --out atp_layers.json
    python benchmarks/atp_scaling.py --batches 8,32,128,512 --dtype bfloat16 --out atp_bf16.json   # accelerator

GPT-2-small shape (random init) or `--model smollm2-shape`; AtP of heads [layer, head], mlp_out
[layer] and resid_pre [layer, pos] (the sites bench_vs_transformerlens.py times), logit
difference. FLOPs the method needs = 3 forwards (corrupted forward, clean forward, and the
backward w.r.t. activations only, which costs one forward: no weight gradients), each forward
counting every matmul (projections, the full pos x pos attention square, MLP) and the
unembedding at the metric position only (`shapes.forward_flops`). Roofline = the matmul
micro-benchmark of the same run in the same dtype (2048^3 on CPU, 8192^3 on an accelerator);
MFU = achieved / the device's nominal dense peak for that dtype (`--peak-tflops`, or the table
below for known accelerators; none on CPU). "Ceiling" = the same run's forward + backward
through the model's dense matmuls alone at the same number of rows
(`harness.matmul_chain_ceiling`), scanned over stacked weights like the model: the rate small
matmuls reach on this machine; "unsliced" the same chain unrolled over per-layer arrays (what
slicing the stacked weights costs), "cached weights" unrolled over one layer's arrays for every
layer, which stay in the caches (what streaming the model's weights from memory costs).
Writes JSON after every point and a markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import machine, matmul_chain_ceiling, matmul_roofline, time_call, write_rows, write_table  # noqa: E402
from patching_throughput import make_pairs, random_params  # noqa: E402
from shapes import add_shape_arguments, chosen_points, forward_flops  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxcirc.attribution import atp  # noqa: E402


# Nominal dense peaks (TFLOP/s) from the vendors' data sheets: float32 without tensor cores, bfloat16
# with them (no sparsity). XLA may run float32 matmuls as TF32 on these (jax_default_matmul_precision).
PEAK_TFLOPS = {
    ("H100", "float32"): 66.9, ("H100", "bfloat16"): 989.4,
    ("H200", "float32"): 66.9, ("H200", "bfloat16"): 989.4,
    ("A100", "float32"): 19.5, ("A100", "bfloat16"): 312.0,
}


def nominal_peak(dtype: str) -> float | None:
    """The table's peak for this process's first device, TFLOP/s (None when unknown)."""
    kind = jax.devices()[0].device_kind
    return next((v for (name, d), v in PEAK_TFLOPS.items() if name in kind and d == dtype), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(parser)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's nominal dense peak for --dtype (default: the table for known devices)")
    parser.add_argument("--out", default="atp_scaling.json")
    args = parser.parse_args()
    base, depths, batches, lengths = chosen_points(args)
    roofline = matmul_roofline(2048 if jax.default_backend() == "cpu" else 8192, jnp.dtype(args.dtype))
    peak = args.peak_tflops or nominal_peak(args.dtype)
    meta = machine() | {"roofline_gflops": roofline, "dtype": args.dtype, "peak_tflops": peak,
                        "command": " ".join(sys.argv)}
    print(f"{args.dtype} roofline {roofline:.0f} GFLOP/s, nominal peak {peak} TFLOP/s, "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    for n_layers in depths:
        cfg = base.replace(n_layers=n_layers, dtype=args.dtype)
        params = random_params(cfg)
        for batch in batches:
            for pos in lengths:
                pairs = make_pairs(batch, pos, cfg.d_vocab)
                run = lambda: jnp.asarray(atp(cfg, params, pairs, sites=("head", "mlp_out", "resid_pre"))["head"])
                t = time_call(run, repeats=args.repeats)
                flops = 3 * forward_flops(cfg, batch, pos)
                ceiling = matmul_chain_ceiling(cfg, batch * pos)
                per_layer = matmul_chain_ceiling(cfg, batch * pos, weights="per_layer")
                cached = matmul_chain_ceiling(cfg, batch * pos, weights="one_layer")
                row = {"model": args.model, "n_layers": n_layers, "batch": batch, "pos": pos,
                       "first_s": t["first_s"], "median_s": t["median_s"], "pairs_per_s": batch / t["median_s"],
                       "needed_gflop": flops / 1e9, "gflops": flops / t["median_s"] / 1e9,
                       "roofline_fraction": flops / t["median_s"] / 1e9 / roofline, "ceiling_gflops": ceiling,
                       "ceiling_fraction": flops / t["median_s"] / 1e9 / ceiling,
                       "per_layer_ceiling_gflops": per_layer, "cached_weights_ceiling_gflops": cached,
                       "mfu": None if peak is None else flops / t["median_s"] / 1e12 / peak, "load": os.getloadavg()[0]}
                rows.append(row)
                print(f"L{n_layers} b{batch} p{pos}: {row['median_s'] * 1e3:.0f} ms = {row['pairs_per_s']:.2f} pairs/s, "
                      f"{row['gflops']:.0f} GFLOP/s = {100 * row['roofline_fraction']:.0f}% of roofline, "
                      f"{100 * row['ceiling_fraction']:.0f}% of the {ceiling:.0f} GFLOP/s same-shape ceiling "
                      f"({per_layer:.0f} unsliced, {cached:.0f} with one layer's weights) "
                      + ("" if peak is None else f", MFU {100 * row['mfu']:.0f}%") + f" (load {row['load']:.1f})",
                      flush=True)
                write_rows(args.out, rows, meta)
    write_table(os.path.splitext(args.out)[0] + ".md",
                f"{jax.devices()[0].device_kind}, {args.dtype}: roofline {roofline:.0f} GFLOP/s, nominal peak "
                f"{peak} TFLOP/s; command: `{meta['command']}`",
                ["model", "layers", "batch x pos", "ms", "pairs/s", "GFLOP/s", "roofline", "MFU", "ceiling GFLOP/s",
                 "of ceiling", "unsliced", "cached weights", "load"],
                [[r["model"], str(r["n_layers"]), f"{r['batch']} x {r['pos']}", f"{r['median_s'] * 1e3:.0f}",
                  f"{r['pairs_per_s']:.2f}", f"{r['gflops']:.0f}", f"{100 * r['roofline_fraction']:.0f}%",
                  "" if r["mfu"] is None else f"{100 * r['mfu']:.0f}%",
                  f"{r['ceiling_gflops']:.0f}", f"{100 * r['ceiling_fraction']:.0f}%",
                  f"{r['per_layer_ceiling_gflops']:.0f}", f"{r['cached_weights_ceiling_gflops']:.0f}",
                  f"{r['load']:.1f}"] for r in rows])

if __name__ == "__main__":
    main()
