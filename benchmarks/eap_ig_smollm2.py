"""EAP-IG (5 steps) edge scores on SmolLM2-135M with the capitals pairs: pairs per second.

    python benchmarks/eap_ig_smollm2.py --pairs 128 --batch-sizes 8,16,32 --out eap_ig_smollm2.json

Loads `smollm2-135m` through `jaxcirc.load` and the shipped capitals pairs
(jaxcirc/data/capital_pairs.jsonl, as `jaxcirc attribute`/`circuit` load them). The file has
fewer pairs than asked for, so its pairs are repeated (every pair has the same shape and cost,
so the rate does not depend on which pairs run). For each batch size: one call to warm up
(compile), then `--repeats` timed calls of `eap_ig(steps=5)` over all `--pairs` pairs; the rate
and the extrapolated time for 1,000 pairs (`1000 / rate`) are printed and written to JSON, with
the fraction of the fp32 matmul roofline measured in the same run (FLOPs counted as
(2 + 2 x steps) forwards of the real sequence length, logits at one position).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import machine, matmul_roofline, write_rows  # noqa: E402
from shapes import comma_ints, forward_flops  # noqa: E402

import jaxcirc  # noqa: E402
from jaxcirc.attribution_report import load_pairs  # noqa: E402
from jaxcirc.eap import eap_ig  # noqa: E402

PAIRS_FILE = Path(jaxcirc.__file__).parent / "data" / "capital_pairs.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--pairs", type=int, default=128)
    parser.add_argument("--batch-sizes", type=comma_ints(), default=[8, 16, 32])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--step-chunk", type=int, default=None, help="IG steps per pass (default: eap.default_step_chunk)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default="eap_ig_smollm2.json")
    args = parser.parse_args()
    model = jaxcirc.load(args.model)
    base, _ = load_pairs(model, PAIRS_FILE)
    pairs = base.take(np.arange(args.pairs) % len(base))
    pos = pairs.n_pos
    roofline = matmul_roofline()
    meta = machine() | {"roofline_gflops": roofline, "command": " ".join(sys.argv), "pos": pos,
                        "distinct_pairs": len(base)}
    flops_per_pair = (2 + 2 * args.steps) * forward_flops(model.config, 1, pos)
    print(f"{args.model}: {len(base)} distinct pairs of {pos} tokens, {args.pairs} run; roofline "
          f"{roofline:.0f} GFLOP/s; load {os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    for batch_size in args.batch_sizes:
        run = lambda: eap_ig(model.config, model.params, pairs, steps=args.steps, batch_size=batch_size,
                             step_chunk=args.step_chunk).scores.block_until_ready()
        start = time.perf_counter()
        run()
        first = time.perf_counter() - start
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        rate = args.pairs / median
        row = {"model": args.model, "batch_size": batch_size, "step_chunk": args.step_chunk, "steps": args.steps,
               "pairs": args.pairs, "pos": pos, "first_s": first, "median_s": median, "pairs_per_s": rate,
               "minutes_for_1000": 1000 / rate / 60, "roofline_fraction": rate * flops_per_pair / 1e9 / roofline,
               "load": os.getloadavg()[0]}
        rows.append(row)
        print(f"batch {batch_size:3d}: {rate:.2f} pairs/s -> 1,000 pairs in {row['minutes_for_1000']:.1f} min "
              f"({100 * row['roofline_fraction']:.0f}% of roofline; first call {first:.0f} s; load {row['load']:.1f})",
              flush=True)
        write_rows(args.out, rows, meta)


if __name__ == "__main__":
    main()
