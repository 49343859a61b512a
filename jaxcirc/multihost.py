"""Multi-host runs: start JAX's distributed runtime, write each host's part, gather the parts.

    initialize()                                  # or initialize("10.0.0.1:8476", 2, process_id)
    mesh = make_mesh(model=4)                     # every host's devices; pairs over `data`
    rows = host_rows(len(all_pairs), mesh)        # this host's rows of the pairs
    pairs = shard_host_batch(read_pairs(rows), mesh, n)   # each host reads only its slice
    result = patch_sweep(model, pairs, "resid_pre", mesh=mesh)
    write_part(out_dir, "patch", rows, {"per_pair": result.per_pair}, axes={"per_pair": -1})
    ...                                           # later, anywhere, one process:
    arrays = gather_parts(out_dir, "patch")       # the whole result, checked complete

Every host runs the same program (SPMD); the parts are plain .npz files, so gathering needs no
running collective and works after the job, from any machine that sees the output directory.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

# Environment variables read when `initialize` gets no arguments (set them on every host).
ENV_COORDINATOR = "JAXCIRC_COORDINATOR"        # host:port of process 0
ENV_NUM_PROCESSES = "JAXCIRC_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXCIRC_PROCESS_ID"


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, cpu_collectives: str = "gloo", **kwargs: Any) -> None:
    """`jax.distributed.initialize`, with arguments from the JAXCIRC_* environment variables when
    not given. With none at all (TPU pods, SLURM / Open MPI clusters) JAX detects the cluster
    itself. `cpu_collectives` selects the CPU backend's cross-process collectives (gloo; needed
    for CPU-only runs, harmless otherwise). Call before any other JAX call."""
    env = os.environ
    coordinator_address = coordinator_address or env.get(ENV_COORDINATOR)
    if num_processes is None and env.get(ENV_NUM_PROCESSES):
        num_processes = int(env[ENV_NUM_PROCESSES])
    if process_id is None and env.get(ENV_PROCESS_ID):
        process_id = int(env[ENV_PROCESS_ID])
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, **kwargs)


def _part_path(out_dir: Path, name: str, index: int, count: int) -> Path:
    return out_dir / f"{name}.part{index:05d}-of-{count:05d}.npz"


def write_part(out_dir: str | Path, name: str, rows: slice, arrays: Mapping[str, Any],
               axes: Mapping[str, int] | None = None, *, n: int | None = None,
               process_index: int | None = None, process_count: int | None = None) -> Path:
    """Write this host's part of a result: `arrays[k]` restricted to `rows` along axis `axes[k]`
    (default 0, the pair axis) unless it already has that length there. `n` is the total number of
    rows (checked when gathering). Returns the file written."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    axes = dict(axes or {})
    length = rows.stop - rows.start
    data: dict[str, np.ndarray] = {}
    for key, value in arrays.items():
        value = np.asarray(value)
        axis = axes.get(key, 0) % value.ndim
        if value.shape[axis] != length:
            value = np.take(value, np.arange(rows.start, rows.stop), axis=axis)
        data[key] = value
    meta = {"start": rows.start, "stop": rows.stop, "n": n, "axes": {k: axes.get(k, 0) for k in data},
            "index": index, "count": count}
    path = _part_path(out, name, index, count)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, __meta__=np.asarray(json.dumps(meta)), **data)
    os.replace(tmp, path)  # a reader never sees a half-written part
    return path


def gather_parts(out_dir: str | Path, name: str) -> dict[str, np.ndarray]:
    """The whole result from every host's part: concatenated in row order along each array's
    axis. Raises if a part is missing, or the parts' rows overlap or leave a gap."""
    out = Path(out_dir)
    pattern = re.compile(re.escape(name) + r"\.part(\d+)-of-(\d+)\.npz$")
    found = {int(m.group(1)): (int(m.group(2)), p) for p in out.glob(f"{name}.part*.npz")
             if (m := pattern.match(p.name))}
    if not found:
        raise FileNotFoundError(f"No parts of {name!r} in {out}.")
    counts = {c for c, _ in found.values()}
    if len(counts) != 1:
        raise ValueError(f"Parts of {name!r} in {out} come from runs with different process counts {sorted(counts)}.")
    count = counts.pop()
    missing = sorted(set(range(count)) - set(found))
    if missing:
        raise ValueError(f"{name!r}: parts of processes {missing} of {count} are missing in {out}.")
    parts = []
    for index in range(count):
        with np.load(found[index][1]) as f:
            meta = json.loads(str(f["__meta__"]))
            parts.append((meta, {k: f[k] for k in f.files if k != "__meta__"}))
    parts.sort(key=lambda p: p[0]["start"])
    # Hosts holding the same rows (a data axis smaller than the host count) wrote the same part.
    unique, end = [], 0
    for meta, arrays in parts:
        if unique and (meta["start"], meta["stop"]) == (unique[-1][0]["start"], unique[-1][0]["stop"]):
            continue
        if meta["start"] != end:
            raise ValueError(f"{name!r}: rows {end}..{meta['start'] - 1} are missing or overlap "
                             f"(a part starts at {meta['start']}).")
        unique.append((meta, arrays))
        end = meta["stop"]
    total = unique[0][0].get("n")
    if total is not None and end != total:
        raise ValueError(f"{name!r}: the parts cover rows 0..{end - 1} of {total}.")
    axes = unique[0][0]["axes"]
    return {k: np.concatenate([arrays[k] for _, arrays in unique], axis=axes[k]) for k in unique[0][1]}
