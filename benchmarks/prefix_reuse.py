"""Exact patching with and without prefix reuse, and its scaling (batch, length, layers).

    python benchmarks/prefix_reuse.py --batches 1,8,32 --pos 16 --layers 12 --out prefix_reuse.json
    python benchmarks/prefix_reuse.py --batches 8 --pos 8,16,32 --layers 12 --out scaling_pos.json
    python benchmarks/prefix_reuse.py --batches 8 --pos 16 --layers 4,8,12 --out scaling_layers.json

GPT-2-small shape (random init; `--layers` changes the depth only) or `--model smollm2-shape`.
For each (batch, pos, layers) point it runs the resid_pre sweep by (layer, pos) and the head
sweep (attn.hook_z) by (layer, head), with full forwards (`prefix_reuse=False`) and with prefix
reuse (the default: start layer, packed position suffixes, last block at the metric position),
interleaved (A B A B ...) so machine noise hits both. Results are checked to
agree (max abs diff) before timing. Writes JSON after every point and a markdown table at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from harness import machine, matmul_roofline, write_rows, write_table
from patching_throughput import make_pairs, random_params
from shapes import add_shape_arguments, chosen_points, forward_flops, names_from

from jaxcirc.model import Model
from jaxcirc.patching import patch_sweep

VARIANTS = {"full": dict(prefix_reuse=False), "reuse": dict()}
SWEEPS = {"resid_pre": ("layer", "pos"), "z": ("layer", "head")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(parser)
    parser.add_argument("--variants", type=names_from(tuple(VARIANTS)), default=list(VARIANTS))
    parser.add_argument("--sites", type=names_from(tuple(SWEEPS)), default=list(SWEEPS))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="prefix_reuse.json")
    args = parser.parse_args()
    base, depths, batches, lengths = chosen_points(args)
    variants = {k: VARIANTS[k] for k in args.variants}
    meta = machine() | {"roofline_gflops": matmul_roofline(), "command": " ".join(os.sys.argv)}
    print(f"roofline {meta['roofline_gflops']:.0f} GFLOP/s, load {os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    for n_layers in depths:
        cfg = base.replace(n_layers=n_layers)
        model = Model(cfg, random_params(cfg))
        for batch in batches:
            for pos in lengths:
                pairs = make_pairs(batch, pos, cfg.d_vocab)
                for site in args.sites:
                    by = SWEEPS[site]
                    results, first = {}, {}
                    for name, options in variants.items():
                        start = time.perf_counter()
                        results[name] = patch_sweep(model, pairs, site, by, **options)
                        first[name] = time.perf_counter() - start
                    ref = results[next(iter(results))].per_pair
                    times = {k: [] for k in variants}
                    for _ in range(args.repeats):
                        for name, options in variants.items():
                            start = time.perf_counter()
                            patch_sweep(model, pairs, site, by, **options)
                            times[name].append(time.perf_counter() - start)
                    n = results[next(iter(results))].n_patches
                    full_s = statistics.median(times["full"]) if "full" in times else None
                    for name in variants:
                        median = statistics.median(times[name])
                        row = {"model": args.model, "n_layers": n_layers, "batch": batch, "pos": pos,
                               "site": site, "by": list(by), "variant": name, "n_patches": n,
                               "first_s": first[name], "median_s": median, "patches_per_s": n / median,
                               "speedup_vs_full": None if full_s is None else full_s / median,
                               # Full-forward FLOPs per second: what the patches would cost without reuse.
                               "full_forward_equiv_gflops": n * forward_flops(cfg, batch, pos) / median / 1e9,
                               "max_abs_diff_vs_first": float(np.nanmax(np.abs(results[name].per_pair - ref))),
                               "load": os.getloadavg()[0]}
                        rows.append(row)
                        print(f"L{n_layers} b{batch} p{pos} {site:9s} {name:6s}: {row['patches_per_s']:8.2f} patches/s "
                              f"(x{row['speedup_vs_full'] or 1:.2f} vs full; first {first[name]:.0f} s; "
                              f"diff {row['max_abs_diff_vs_first']:.1e}; load {row['load']:.1f})", flush=True)
                    write_rows(args.out, rows, meta)
    write_table(os.path.splitext(args.out)[0] + ".md",
                f"roofline {meta['roofline_gflops']:.0f} GFLOP/s; command: `{meta['command']}`",
                ["model", "layers", "batch x pos", "site", "variant", "patches/s", "vs full",
                 "full-forward-equivalent GFLOP/s", "load"],
                [[r["model"], str(r["n_layers"]), f"{r['batch']} x {r['pos']}", r["site"], r["variant"],
                  f"{r['patches_per_s']:.2f}", f"{r['speedup_vs_full'] or 1:.2f}x", f"{r['full_forward_equiv_gflops']:.0f}",
                  f"{r['load']:.1f}"] for r in rows])

if __name__ == "__main__":
    main()
