"""Shared benchmark plumbing: timing, the matmul roofline, machine facts, result rows.

Timings are wall-clock medians after a warm-up call (the warm-up includes compilation, which is
reported separately). Competing implementations are timed alternately in the same process so that
machine noise hits both.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def block(value: Any) -> Any:
    """Wait for JAX arrays (and torch tensors, which are synchronous on CPU)."""
    return jax.block_until_ready(value)


def time_call(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median/min wall time of `fn()` over `repeats` after `warmup` calls (first-call time kept)."""
    start = time.perf_counter()
    block(fn())
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        block(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        block(fn())
        times.append(time.perf_counter() - start)
    return {"first_s": first, "median_s": statistics.median(times), "min_s": min(times)}


def alternate(fns: dict[str, Callable[[], Any]], repeats: int = 5) -> dict[str, dict[str, float]]:
    """Time several implementations, interleaving their runs (A B A B ...) after one warm-up each."""
    first = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        block(fn())
        first[name] = time.perf_counter() - start
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            block(fn())
            times[name].append(time.perf_counter() - start)
    return {name: {"first_s": first[name], "median_s": statistics.median(t), "min_s": min(t)}
            for name, t in times.items()}


def matmul_roofline(n: int = 2048, dtype=jnp.float32, repeats: int = 5) -> float:
    """Measured matmul throughput of this device in GFLOP/s (n x n @ n x n, jitted)."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    matmul = jax.jit(jnp.matmul)
    timing = time_call(lambda: matmul(a, b), repeats=repeats)
    return 2 * n**3 / timing["min_s"] / 1e9


def torch_matmul_roofline(n: int = 2048, repeats: int = 5) -> float:
    """The same n x n fp32 matmul through torch (TransformerLens' backend) in GFLOP/s: on CPU its
    BLAS and XLA's kernels differ, so each side's achieved fraction has its own yardstick."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    timing = time_call(lambda: a @ b, repeats=repeats)
    return 2 * n**3 / timing["min_s"] / 1e9


def matmul_chain_ceiling(cfg: Any, tokens: int, repeats: int = 5, weights: str = "stacked") -> float:
    """GFLOP/s of a forward + activation-gradient backward through `cfg.n_layers` layers of the
    model's dense matmuls alone (q/k/v, output, MLP in (+ gate), MLP out) on `tokens` rows in
    `cfg.dtype`: what AtP of that shape could reach if everything else were free. Below a few
    hundred rows this is well under `matmul_roofline` on CPU.

    weights: "stacked" scans the layers over stacked weights, like the model (each step slices
    its layer's weights out: a copy on CPU); "per_layer" unrolls the layers over separate arrays
    (nothing sliced); "one_layer" unrolls them over the same arrays for every layer, which stay
    in the caches. per_layer - stacked is what slicing costs, one_layer - per_layer what
    streaming the model's weights from memory costs."""
    if weights not in ("stacked", "per_layer", "one_layer"):
        raise ValueError(f"weights={weights!r}: use 'stacked', 'per_layer' or 'one_layer'.")
    d, m, heads = cfg.d_model, cfg.d_mlp, cfg.n_heads * cfg.d_head
    mlp_in = m * (2 if cfg.gated_mlp else 1)
    shapes = [(d, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.d_head), (heads, d), (d, mlp_in), (m, d)]
    key = jax.random.key(0)
    dtype = jnp.dtype(cfg.dtype)
    stacked = [0.02 * jax.random.normal(jax.random.fold_in(key, i), (cfg.n_layers,) + s, dtype)
               for i, s in enumerate(shapes)]

    def layer(x, w):
        w_qkv, w_o, w_in, w_out = w
        x = x + (x @ w_qkv)[:, :heads] @ w_o
        h = x @ w_in
        return x + (h[:, :m] * h[:, m:] if cfg.gated_mlp else jax.nn.relu(h)) @ w_out

    if weights == "stacked":
        chain, ws = (lambda x, ws: jax.lax.scan(lambda x, w: (layer(x, w), None), x, ws)[0]), stacked
    else:
        per_layer = [[w[l] for w in stacked] for l in range(cfg.n_layers)]
        ws = [per_layer[0]] * cfg.n_layers if weights == "one_layer" else per_layer

        def chain(x, ws):
            for w in ws:
                x = layer(x, w)
            return x
    grad = jax.jit(jax.grad(lambda x, ws: chain(x, ws).sum()))
    x = jax.random.normal(key, (tokens, d), dtype)
    flops = 2 * 2 * tokens * cfg.n_layers * sum(a * b for a, b in shapes)  # forward + backward (inputs only)
    return flops / time_call(lambda: grad(x, ws), repeats=repeats)["min_s"] / 1e9


def machine() -> dict[str, Any]:
    import flax

    facts = {"platform": platform.platform(), "processor": platform.processor(),
             "cpu_count": os.cpu_count(), "python": platform.python_version(),
             "jax": jax.__version__, "flax": flax.__version__, "backend": jax.default_backend(),
             "devices": [str(d) for d in jax.devices()]}
    try:
        import torch

        facts["torch"] = torch.__version__
        facts["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    try:
        import transformer_lens

        facts["transformer_lens"] = getattr(transformer_lens, "__version__", "3.x")
    except ImportError:
        pass
    return facts


def write_rows(path: str, rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump({"machine": meta, "rows": rows}, f, indent=2, default=float)


def write_table(path: str, title: str, columns: list[str], cells: list[list[str]]) -> None:
    """A markdown file: the title line, then a table with these columns and rows of cells."""
    lines = [title, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def agree(a: Any, b: Any, atol: float, what: str) -> float:
    """Max-abs difference, raising if above `atol` (benchmarks only compare correct results)."""
    diff = float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
    if not diff <= atol:
        raise AssertionError(f"{what}: implementations disagree by {diff:.3g} (> {atol})")
    return diff
