"""Meshes and shardings: a `data` axis over minimal pairs, a `model` axis over large weights.

    mesh = make_mesh(data=4, model=2)                  # 8 devices as 4 x 2
    params = shard_params(params, mesh, cfg)           # heads / d_mlp / vocab over `model`
    pairs = shard_batch(pairs, mesh)                   # leading (pair) axis over `data`
    result = patch_sweep(model, pairs, "resid_pre", mesh=mesh)   # or let the analysis do both

Every analysis takes `mesh=` and calls these two before its jitted program: jit propagates the
input shardings, so the program runs SPMD over the mesh and the results equal one device's up
to float summation order. The one parameter-sharding rule lives here (`param_partition_specs`),
used by the analyses and by the loader alike.

Multi-host (after `jax.distributed.initialize`): `jax.devices()` lists every host's devices, so
`make_mesh()` spans the pod; `shard_batch` builds each global array from the rows this host's
devices hold (`host_rows`), and `to_host` gathers a result onto every host.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxcirc.models.config import ModelConfig

DATA = "data"
MODEL = "model"

# Leaf name -> (axis counted from the end, the config field giving that axis's size). Counting
# from the end makes one rule fit stacked blocks [layer, ...] and a single block alike.
# Biases follow their weight's sharded axis so the add needs no communication.
_MODEL_AXIS: dict[str, tuple[int, str]] = {
    "W_Q": (-2, "n_heads"), "b_Q": (-2, "n_heads"),            # [layer, d_model, head, d_head]
    "W_K": (-2, "n_kv_heads"), "b_K": (-2, "n_kv_heads"),
    "W_V": (-2, "n_kv_heads"), "b_V": (-2, "n_kv_heads"),
    "W_O": (-3, "n_heads"),                                    # [layer, head, d_head, d_model]
    "W_in": (-1, "d_mlp"), "W_gate": (-1, "d_mlp"),            # [layer, d_model, d_mlp]
    "b_in": (-1, "d_mlp"), "b_gate": (-1, "d_mlp"),
    "W_out": (-2, "d_mlp"),                                    # [layer, d_mlp, d_model]
    "W_E": (-2, "d_vocab"),                                    # [d_vocab, d_model]
    "W_U": (-1, "d_vocab"), "b_U": (-1, "d_vocab"),            # [d_model, d_vocab]
}


def make_mesh(data: int | None = None, model: int | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, model) mesh over `devices` (default: every device of every host, `jax.devices()`).

    Give either size, both, or neither (then all devices go to `data`); the other is inferred so
    that data * model == number of devices. Devices are laid out topology-aware where JAX knows
    the topology (TPU), so `model` (the chattier axis) stays within fast links.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if n == 0:
        raise ValueError("make_mesh got no devices.")
    for name, size in (("data", data), ("model", model)):
        if size is not None and (not isinstance(size, (int, np.integer)) or size < 1):
            raise ValueError(f"{name} must be a positive int, got {size!r}.")
    if data is None and model is None:
        data, model = n, 1
    elif data is None:
        if n % model:
            raise ValueError(f"model={model} does not divide the {n} devices; pick a divisor of {n}.")
        data = n // model
    elif model is None:
        if n % data:
            raise ValueError(f"data={data} does not divide the {n} devices; pick a divisor of {n}.")
        model = n // data
    if data * model != n:
        raise ValueError(f"data={data} x model={model} = {data * model} devices, but {n} are given; "
                         f"pass devices=jax.devices()[:{data * model}] to use a subset.")
    try:
        from jax.experimental import mesh_utils
        grid = mesh_utils.create_device_mesh((data, model), devices=devices)
    except (ValueError, NotImplementedError, AssertionError):  # unknown topology: plain order
        grid = np.asarray(devices, dtype=object).reshape(data, model)
    # Mesh() keeps Auto axis types (jax.make_mesh defaults to Explicit, which would change how
    # every analysis traces); jit then propagates the input shardings.
    return Mesh(grid, (DATA, MODEL))


def mesh_from_spec(spec: str | None) -> Mesh | None:
    """A mesh from a command-line spec: None/'' -> no mesh, 'auto' -> every device on `data`,
    'DxM' (e.g. '4x2') -> data D x model M, 'D' -> data D (model the rest)."""
    if spec is None or spec == "" or spec == "none":
        return None
    if spec == "auto":
        return make_mesh()
    parts = spec.lower().split("x")
    if len(parts) > 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"Cannot read mesh {spec!r}; write auto, DATA (e.g. 8) or DATAxMODEL (e.g. 4x2).")
    sizes = [int(p) for p in parts]
    return make_mesh(*sizes)


def _axis_size(mesh: Mesh | None, name: str) -> int | None:
    if mesh is None:
        return None
    return int(dict(mesh.shape).get(name, 1))


def _leaf_name(path: tuple) -> str:
    last = path[-1] if path else None
    for attr in ("key", "name", "idx"):
        if hasattr(last, attr):
            return str(getattr(last, attr))
    return str(last)


def param_partition_specs(cfg: ModelConfig | None, params: Any, mesh: Mesh | None = None) -> Any:
    """The PartitionSpec of every parameter (a tree shaped like `params`).

    Over `model`: the head axis of W_Q/W_K/W_V/W_O (and b_Q/b_K/b_V), the d_mlp axis of
    W_in/W_gate/W_out (and b_in/b_gate), the vocab axis of W_E/W_U (and b_U). Everything else,
    and any of these whose axis does not divide evenly by the mesh's `model` size (or whose size
    does not match `cfg`, e.g. a reshaped processed weight), is replicated. Without a mesh the
    divisibility check is skipped. Leaves may be arrays or ShapeDtypeStructs.
    """
    model_size = _axis_size(mesh, MODEL)

    def spec(path: tuple, leaf: Any) -> PartitionSpec:
        rule = _MODEL_AXIS.get(_leaf_name(path))
        shape = tuple(getattr(leaf, "shape", ()))
        if rule is None or model_size == 1:
            return PartitionSpec()
        axis, field = rule
        if len(shape) < -axis:
            return PartitionSpec()
        size = shape[axis]
        if cfg is not None and size != getattr(cfg, field):
            return PartitionSpec()
        if model_size is not None and size % model_size:
            return PartitionSpec()
        parts = [None] * len(shape)
        parts[len(shape) + axis] = MODEL
        return PartitionSpec(*parts)

    return jax.tree_util.tree_map_with_path(spec, params)


def _put(x: Any, sharding: NamedSharding) -> jax.Array:
    """device_put for meshes of this host; across hosts, each host supplies only its shards
    (from the full array every host holds)."""
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_params(params: Any, mesh: Mesh, cfg: ModelConfig | None = None) -> Any:
    """Place `params` on `mesh` by `param_partition_specs` (replicated over `data`)."""
    specs = param_partition_specs(cfg, params, mesh)
    return jax.tree.map(lambda x, s: _put(x, NamedSharding(mesh, s)), params, specs)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every leaf replicated on every device of `mesh`."""
    sharding = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda x: _put(x, sharding), tree)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading axis over `data`, the rest replicated (scalars replicated)."""
    return NamedSharding(mesh, PartitionSpec(DATA) if ndim else PartitionSpec())


def _check_divides(n: int, mesh: Mesh) -> None:
    data = _axis_size(mesh, DATA)
    if n % data:
        raise ValueError(
            f"A batch of {n} does not split over the mesh's data axis of {data} devices. Use a "
            f"multiple of {data} ({n - n % data} or {n + data - n % data} pairs), or a mesh with "
            f"data dividing {n} (make_mesh(data=..., model=...)).")


def shard_batch(tree: Any, mesh: Mesh) -> Any:
    """Every leaf's leading (batch) axis over the mesh's `data` axis; scalars replicated.

    The batch must divide evenly by the `data` size: padding would change means over pairs, so
    there is no silent padding. Pass a divisible number of pairs (e.g. `pairs[:n - n % data]`) or
    a mesh with a smaller `data` axis. Across hosts every host passes the same full batch and
    contributes only its own rows (read just those with `host_rows`).
    """
    def put(x: Any) -> jax.Array:
        ndim = np.ndim(x)
        if ndim:
            _check_divides(np.shape(x)[0], mesh)
        return _put(x, batch_sharding(mesh, ndim))

    return jax.tree.map(put, tree)


def shard_along_batch(tree: Any, mesh: Mesh, batch: int) -> Any:
    """Leaves whose leading dim is `batch` over `data` (as `shard_batch`), the rest (broadcast
    hook arrays with a leading 1, scalars) replicated: for a chunk of pairs with its hooks."""
    sharding = NamedSharding(mesh, PartitionSpec())

    def put(x: Any) -> Any:
        if np.ndim(x) and np.shape(x)[0] == batch:
            return shard_batch(x, mesh)
        return _put(x, sharding)

    return jax.tree.map(put, tree)


def shard_host_batch(local: Any, mesh: Mesh, n: int) -> Any:
    """Global arrays of `n` rows over `data` from this host's rows only (`local`, the slice
    `host_rows(n, mesh)` of each leaf): each host reads just its part of the pairs."""
    rows = host_rows(n, mesh)

    def put(x: Any) -> jax.Array:
        x = np.asarray(x)
        if x.shape[:1] != (rows.stop - rows.start,):
            raise ValueError(f"This host holds rows {rows.start}..{rows.stop - 1} of {n}, so its part must have "
                             f"{rows.stop - rows.start} rows; got shape {x.shape}.")
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x, (n,) + x.shape[1:])

    return jax.tree.map(put, local)


def host_rows(n: int, mesh: Mesh) -> slice:
    """The rows of a batch of `n` (sharded by `shard_batch`) held by this host's devices: the
    slice of the pairs this host needs to read and whose results it writes."""
    _check_divides(n, mesh)
    sharding = batch_sharding(mesh, 1)
    starts, stops = [], []
    for index in sharding.addressable_devices_indices_map((n,)).values():
        start, stop, _ = index[0].indices(n)
        starts.append(start)
        stops.append(stop)
    lo, hi = min(starts), max(stops)
    covered = sum(b - a for a, b in {(a, b) for a, b in zip(starts, stops)})
    if covered != hi - lo:
        raise ValueError("This host's rows are not contiguous on this mesh; build it with make_mesh.")
    return slice(lo, hi)


def to_host(x: Any) -> Any:
    """A (possibly sharded, possibly multi-host) array tree as numpy, complete on every host."""
    def get(a: Any) -> np.ndarray:
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            from jax.experimental import multihost_utils
            return np.asarray(multihost_utils.process_allgather(a, tiled=True))
        return np.asarray(a)

    return jax.tree.map(get, x)


def local_rows(x: jax.Array, axis: int = 0) -> tuple[slice, np.ndarray]:
    """(rows, values): the part of `x` along `axis` that this host's devices hold, as numpy, for
    writing this host's part of a result without any cross-host communication."""
    n = x.shape[axis]
    pieces: dict[tuple[int, int], np.ndarray] = {}
    for shard in x.addressable_shards:
        start, stop, _ = shard.index[axis].indices(n)
        pieces.setdefault((start, stop), np.asarray(shard.data))
    keys = sorted(pieces)
    lo, hi = keys[0][0], keys[-1][1]
    if sum(b - a for a, b in keys) != hi - lo:
        raise ValueError("This host's rows are not contiguous along that axis.")
    return slice(lo, hi), np.concatenate([pieces[k] for k in keys], axis=axis)


def place(params: Any, tree: Any, mesh: Mesh | None, cfg: ModelConfig | None = None) -> tuple[Any, Any]:
    """(params over the mesh, batch tree over `data`), or both unchanged without a mesh: the one
    line each analysis runs before its jitted program."""
    if mesh is None:
        return params, tree
    return shard_params(params, mesh, cfg), shard_batch(tree, mesh)
