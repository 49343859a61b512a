"""Memory budgets for vmapped sweeps: how many units (patches, pairs, steps) run at once.

    budget = device_budget()                         # bytes free on the device (or given)
    chunk, n_chunks = plan_chunks(n_patches, per_unit_bytes=..., fixed_bytes=..., budget_bytes=budget,
                                  unit="patch", hint="pass max_patches_per_chunk=... or memory_budget_bytes=...")

A sweep whose single unit does not fit raises `MemoryBudgetError` with the bytes it needs before
anything is compiled or run, instead of an out-of-memory error deep inside XLA. Sizes come from
an analytic estimate (the caller's) or from XLA's own buffer assignment (`compiled_bytes`).
Chunking never changes results: chunks are padded with no-op units and run by one program.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

GiB = 1 << 30
# On CPU nothing is gained from vmapping more than this at once, and compile time grows with it.
CPU_DEFAULT_BUDGET = 1 * GiB
# Leave room for XLA's own scratch and fragmentation on accelerators.
ACCELERATOR_FRACTION = 0.8


class MemoryBudgetError(ValueError):
    """A sweep would not fit in the memory budget even one unit at a time."""


def fmt_bytes(n: float) -> str:
    """'123456789 bytes (0.11 GiB)'."""
    return f"{int(n)} bytes ({n / GiB:.2f} GiB)"


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20, "g": GiB, "gib": GiB,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "t": 1 << 40, "tib": 1 << 40, "tb": 10**12}


def parse_bytes(text: str | int) -> int:
    """'2GiB', '512MiB', '1.5G', '1000000' -> bytes (binary units for K/M/G/T, decimal for KB/MB/GB)."""
    if isinstance(text, int):
        return text
    import re
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise ValueError(f"Cannot read {text!r} as a memory size; write e.g. 2GiB, 512MiB or a number of bytes.")
    return int(float(match.group(1)) * _UNITS[unit])


def _available_ram() -> int | None:
    """MemAvailable of this host (Linux), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def device_budget(device: jax.Device | None = None, fraction: float = ACCELERATOR_FRACTION) -> int:
    """Bytes a sweep may use on `device` (default: the first local device).

    GPU/TPU: `fraction` of (bytes_limit - bytes_in_use) from `device.memory_stats()`. CPU (no
    memory stats): min(CPU_DEFAULT_BUDGET, half the host's available RAM), since bigger vmaps only
    cost compile time there.
    """
    device = device if device is not None else jax.local_devices()[0]
    stats = None
    try:
        stats = device.memory_stats()
    except (AttributeError, NotImplementedError, RuntimeError):  # CPU and some backends keep no stats
        stats = None
    if stats and "bytes_limit" in stats:
        free = int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
        return max(int(free * fraction), 0)
    ram = _available_ram()
    return CPU_DEFAULT_BUDGET if ram is None else min(CPU_DEFAULT_BUDGET, ram // 2)


def compiled_bytes(fn: Callable[..., Any], *args: Any, static_argnames: tuple[str, ...] = (),
                   **kwargs: Any) -> int | None:
    """Peak device bytes XLA assigns to `jax.jit(fn)(*args, **kwargs)` (arguments + outputs +
    temporaries - aliased), or None where the backend reports no memory analysis. Compiles the
    program: use it to calibrate, not inside a loop. Arguments may be ShapeDtypeStructs."""
    try:
        compiled = jax.jit(fn, static_argnames=static_argnames).lower(*args, **kwargs).compile()
        stats = compiled.memory_analysis()
    except (NotImplementedError, AttributeError):  # no memory analysis here: callers use the analytic estimate
        return None
    if stats is None:
        return None
    peak = getattr(stats, "peak_memory_in_bytes", 0) or 0
    total = (stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
             - stats.alias_size_in_bytes)
    return int(max(peak, total))


def tree_bytes(tree: Any) -> int:
    """Bytes of every array (or ShapeDtypeStruct) leaf of `tree`."""
    return int(sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype")))


def device_bytes(tree: Any) -> int:
    """Bytes of `tree` held on one device (a sharded array counts one shard; numpy counts whole)."""
    total = 0
    for x in jax.tree.leaves(tree):
        sharding = getattr(x, "sharding", None)
        shape = sharding.shard_shape(x.shape) if sharding is not None else np.shape(x)
        total += math.prod(shape) * np.dtype(x.dtype).itemsize
    return int(total)


def grad_sequence_bytes(cfg: Any, pos: int) -> int:
    """Rough peak bytes of one sequence in a forward + backward pass (AtP, EAP): the scan keeps
    each layer's residual-stream, attention and MLP activations for the backward pass, the
    clean/corrupted caches and gradients of the sites come on top (x3), float32."""
    per_layer = pos * (6 * cfg.d_model + 4 * cfg.n_heads * cfg.d_head + 3 * cfg.d_mlp + 2 * cfg.n_heads * pos)
    return int(4 * (3 * cfg.n_layers * per_layer + 3 * cfg.d_vocab))


def batch_for_budget(n: int, per_pair_bytes: int, budget_bytes: int, fixed_bytes: int = 0, data: int = 1,
                     hint: str = "") -> int:
    """Pairs per chunk that fit `budget_bytes` per device when each chunk is split over `data`
    devices: a multiple of `data`, evened out over the chunks. Raises MemoryBudgetError when one
    pair per device does not fit."""
    groups, _ = plan_chunks(-(-n // data), per_pair_bytes, budget_bytes, fixed_bytes=fixed_bytes, unit="pair",
                            hint=hint)
    return groups * data


def plan_chunks(n_units: int, per_unit_bytes: int, budget_bytes: int, *, fixed_bytes: int = 0,
                max_per_chunk: int | None = None, unit: str = "unit", hint: str = "") -> tuple[int, int]:
    """(chunk_size, n_chunks) for `n_units` units of `per_unit_bytes` each on top of `fixed_bytes`
    (parameters, baselines) within `budget_bytes`: the most units that fit, evened out so the
    padded last chunk wastes as little as possible. `max_per_chunk` caps the chunk (and wins over
    the budget, which is then not checked). Raises MemoryBudgetError when one unit does not fit.
    """
    if n_units < 1:
        raise ValueError(f"No {unit}s to run.")
    if max_per_chunk is not None:
        if max_per_chunk < 1:
            raise ValueError(f"The chunk size must be at least 1, got {max_per_chunk}.")
        limit = max_per_chunk
    else:
        if budget_bytes < 1:
            raise ValueError(f"The memory budget must be positive, got {budget_bytes}.")
        need = fixed_bytes + per_unit_bytes
        if need > budget_bytes:
            raise MemoryBudgetError(
                f"This sweep needs {fmt_bytes(need)} per device for a single {unit} "
                f"({fmt_bytes(fixed_bytes)} fixed + {fmt_bytes(per_unit_bytes)} per {unit}), but the "
                f"budget is {fmt_bytes(budget_bytes)}. "
                + (hint or "Use fewer pairs per call, a shorter sequence, more devices on the mesh, "
                           "or a larger budget."))
        limit = max(1, (budget_bytes - fixed_bytes) // max(per_unit_bytes, 1))
    limit = min(limit, n_units)
    n_chunks = math.ceil(n_units / limit)
    return math.ceil(n_units / n_chunks), n_chunks
