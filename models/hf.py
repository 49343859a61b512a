"""Loading a local HF checkpoint directory (config.json + safetensors, sharded or not, or
pytorch_model.bin through torch's weights_only loader) into a config and scanned params."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from jaxcirc.models.config import ModelConfig

# safetensors dtype codes -> numpy dtype names.
_SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64",
                       "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
                       "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}

# Prefixes HF puts in front of the backbone's tensor names (absent in some older checkpoints).
_BACKBONE_PREFIXES = ("transformer.", "gpt_neox.", "model.")


def families() -> dict[str, ModuleType]:
    """model_type -> family module (each has MODEL_TYPES, config_from_hf, params_from_hf), from
    the one table of families (`jaxcirc.models.families`)."""
    from jaxcirc.models.families import ports

    return ports()


def family_for(hf_config: Mapping[str, Any], where: str = "config") -> ModuleType:
    model_type = hf_config.get("model_type")
    table = families()
    if model_type not in table:
        raise ValueError(
            f"Architecture model_type={model_type!r} ({where}) is not ported to jaxcirc. "
            f"Supported model types: {', '.join(sorted(table))}."
        )
    return table[model_type]


def _to_numpy(array: Any) -> np.ndarray:
    if hasattr(array, "detach"):  # torch tensor
        import torch

        array = array.detach()
        if array.dtype == torch.bfloat16:
            import ml_dtypes

            return array.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return array.numpy()
    return np.asarray(array)


class LazyTensors(Mapping):
    """Checkpoint tensors by HF name, each read (as numpy) only when asked for. `info[name]` is
    (shape, numpy dtype name) as stored, known without reading the tensor."""

    def __init__(self, where: dict[str, Callable[[str], Any]],
                 info: dict[str, tuple[tuple[int, ...], str]] | None = None):
        self._where = where  # name -> function reading that tensor
        self.info = info or {}

    def __getitem__(self, name: str) -> np.ndarray:
        return _to_numpy(self._where[name](name))

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _safetensors_reader(files: list[Path]) -> LazyTensors:
    from safetensors import safe_open

    import ml_dtypes  # noqa: F401  (registers numpy's "bfloat16", which safetensors' numpy reader uses)

    # numpy, not flax: a tensor read for a sharded load must not land whole on one device first.
    handles = [safe_open(str(f), framework="numpy") for f in files]
    where, info = {}, {}
    for h in handles:
        for name in h.keys():
            where[name] = h.get_tensor
            header = h.get_slice(name)  # metadata only
            info[name] = (tuple(header.get_shape()), _SAFETENSORS_DTYPES.get(header.get_dtype(), header.get_dtype()))
    return LazyTensors(where, info)


def _torch_bin_reader(files: list[Path]) -> LazyTensors:
    try:
        import torch
    except ImportError as error:
        raise ImportError(
            "This checkpoint is pytorch_model.bin, which needs torch to read "
            "(pip install torch==2.13.0), or convert it to safetensors."
        ) from error
    tensors: dict[str, Any] = {}
    for f in files:
        tensors.update(torch.load(str(f), map_location="cpu", weights_only=True))
    info = {name: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in tensors.items()}
    return LazyTensors({name: tensors.__getitem__ for name in tensors}, info)


def tensor_reader(directory: Path) -> LazyTensors:
    """Every tensor of the checkpoint by name, read one tensor at a time."""
    for index_name, reader in (("model.safetensors.index.json", _safetensors_reader),
                               ("pytorch_model.bin.index.json", _torch_bin_reader)):
        index = directory / index_name
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return reader([directory / s for s in shards])
    if (directory / "model.safetensors").exists():
        return _safetensors_reader([directory / "model.safetensors"])
    if (directory / "pytorch_model.bin").exists():
        return _torch_bin_reader([directory / "pytorch_model.bin"])
    raise FileNotFoundError(
        f"No weights in {directory}: expected model.safetensors, model.safetensors.index.json, "
        "pytorch_model.bin or pytorch_model.bin.index.json next to config.json."
    )


def _checkpoint_name(names: set[str]) -> Callable[[str], str]:
    """Backbone-relative name -> the checkpoint's name for it, whatever prefix the checkpoint uses."""

    def resolve(name: str) -> str:
        for candidate in (name, *(p + name for p in _BACKBONE_PREFIXES)):
            if candidate in names:
                return candidate
        raise KeyError(f"Tensor {name!r} not found in the checkpoint (it has e.g. {sorted(names)[:5]}).")

    return resolve


def _unprefixed(tensors: Mapping[str, np.ndarray], dtype: str) -> Callable[[str], np.ndarray]:
    """Look tensors up by their backbone-relative name, converted to `dtype`."""
    resolve = _checkpoint_name(set(tensors))

    def lookup(name: str) -> np.ndarray:
        return np.asarray(tensors[resolve(name)]).astype(dtype, copy=False)

    return lookup


# Parameter dtypes "auto" keeps as stored; anything else (float64, float8) loads as float32.
_AUTO_DTYPES = ("float32", "bfloat16", "float16")


def stored_dtype(tensors: Mapping[str, Any]) -> str:
    """The floating dtype holding most of the checkpoint's weights (by element count), as "auto"
    loads it: bfloat16 and float16 checkpoints stay so, float32 (and float64, float8) give float32."""
    import jax.numpy as jnp

    info = getattr(tensors, "info", None) or {}
    counts: dict[str, int] = {}
    for name in tensors:
        shape, dtype = info[name] if name in info else (np.shape(tensors[name]), str(np.asarray(tensors[name]).dtype))
        try:
            floating = jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
        except TypeError:  # a dtype numpy does not know (e.g. a float8 name): not a weight dtype we keep
            floating = False
        if floating:
            counts[dtype] = counts.get(dtype, 0) + int(np.prod(shape))
    best = max(counts, key=counts.get) if counts else "float32"
    return best if best in _AUTO_DTYPES else "float32"


def resolve_dtype(dtype: str, tensors: Mapping[str, Any]) -> str:
    """`dtype` checked, or for "auto" the checkpoint's own (`stored_dtype`)."""
    import jax.numpy as jnp

    if dtype == "auto":
        return stored_dtype(tensors)
    try:
        ok = jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"dtype must be 'auto' (as stored) or a float dtype name such as float32, bfloat16 "
                         f"or float16; got {dtype!r}.")
    return str(jnp.dtype(dtype))


def params_from_hf_tensors(hf_config: Mapping[str, Any], tensors: Mapping[str, np.ndarray],
                           dtype: str = "float32") -> tuple[ModelConfig, dict]:
    """Config and params from an HF config dict and the tensors by their HF names. `dtype`
    "auto" keeps the checkpoint's float dtype (`stored_dtype`)."""
    family = family_for(hf_config)
    dtype = resolve_dtype(dtype, tensors)
    cfg = family.config_from_hf(dict(hf_config), dtype=dtype)
    return cfg, family.params_from_hf(_unprefixed(tensors, dtype), cfg)


def _read_hf_config(directory: Path) -> dict:
    config_path = directory / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{directory} has no config.json; is it an HF model directory?")
    hf_config = json.loads(config_path.read_text())
    family_for(hf_config, where=str(config_path))
    return hf_config


def load_hf_directory(directory: str | Path, dtype: str = "float32") -> tuple[ModelConfig, dict, dict]:
    """(config, params, hf_config) from a local HF model directory (numpy params on the host).
    `dtype` "auto" keeps the checkpoint's float dtype."""
    directory = Path(directory)
    hf_config = _read_hf_config(directory)
    cfg, params = params_from_hf_tensors(hf_config, tensor_reader(directory), dtype)
    return cfg, params, hf_config


def _with_layer(name: str, layer: int) -> tuple[str, bool]:
    """(name with its first numeric component, the layer index, set to `layer`; whether it has one).
    Every family names per-layer tensors `<stack>.<i>.<rest>` (h.3.attn..., layers.3.mlp...)."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            parts[i] = str(layer)
            return ".".join(parts), True
    return name, False


def load_hf_directory_on_mesh(directory: str | Path, mesh, dtype: str = "auto") -> tuple[ModelConfig, dict, dict]:
    """(config, params, hf_config) with every parameter placed on `mesh` as it is read, laid out by
    `jaxcirc.sharding.param_partition_specs` (heads, d_mlp and vocab over the `model` axis).

    Streams one layer at a time: the family's converter runs on a one-layer config whose tensor
    names are redirected to layer i, each converted tensor goes to the devices (each device gets only
    its slice, via `jax.make_array_from_callback`) and is written into its preallocated stacked
    [layer, ...] array in place (a donated update), then the host copy is dropped. The host never
    holds more than one layer plus the embeddings; the devices hold the model once.
    """
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxcirc.models.transformer import param_shapes
    from jaxcirc.sharding import param_partition_specs

    directory = Path(directory)
    hf_config = _read_hf_config(directory)
    family = family_for(hf_config)
    tensors = tensor_reader(directory)
    dtype = resolve_dtype(dtype, tensors)
    cfg = family.config_from_hf(dict(hf_config), dtype=dtype)
    shapes = param_shapes(cfg)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), param_partition_specs(cfg, shapes, mesh))
    block_shapes, block_tree = jax.tree_util.tree_flatten_with_path(shapes["blocks"])
    block_shardings = jax.tree.leaves(shardings["blocks"])
    # A layer slice [...] of a stacked [layer, ...] parameter: its spec without the layer axis.
    layer_shardings = [NamedSharding(mesh, PartitionSpec(*tuple(s.spec)[1:])) for s in block_shardings]

    def put(x: np.ndarray, sharding: NamedSharding, where: str, shape: tuple) -> jax.Array:
        if tuple(x.shape) != tuple(shape):
            raise ValueError(f"{directory}: {where} converts to shape {tuple(x.shape)}, but the config "
                             f"({family.__name__}) needs {tuple(shape)}.")
        x = np.asarray(x).astype(dtype, copy=False)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: np.ascontiguousarray(x[index]))

    allocate = jax.jit(lambda: [jnp.zeros(s.shape, dtype) for _, s in block_shapes], out_shardings=block_shardings)

    def write_layer(stacked: list, layer_arrays: list, i: jax.Array) -> list:
        return [jax.lax.dynamic_update_index_in_dim(s, x, i, 0) for s, x in zip(stacked, layer_arrays)]

    write_layer = jax.jit(write_layer, donate_argnums=(0,), out_shardings=block_shardings)
    resolve = _checkpoint_name(set(tensors))
    windows = cfg.layer_windows
    one_layer = cfg.replace(n_layers=1, layer_windows=None if windows is None else windows[:1])
    top: dict = {}
    stacked = None
    for layer in range(cfg.n_layers):
        def get(name: str, layer: int = layer) -> np.ndarray:
            renamed, per_layer = _with_layer(name, layer)
            key = resolve(renamed)
            if per_layer or layer == 0:
                return np.asarray(tensors[key]).astype(dtype, copy=False)
            # Embeddings, final norm, head: read once (layer 0); a free stand-in afterwards.
            return np.broadcast_to(np.zeros((), dtype), tensors.info[key][0])

        tree = family.params_from_hf(get, one_layer)
        if layer == 0:
            expected = sorted(shapes)
            if sorted(tree) != expected:
                raise ValueError(f"{directory}: the converter gave parameters {sorted(tree)}, the config needs {expected}.")
            for key in expected:
                if key != "blocks":
                    top[key] = jax.tree.map(lambda x, s, sh, key=key: put(x, sh, key, s.shape),
                                            tree[key], shapes[key], shardings[key])
            stacked = allocate()
        leaves, tree_def = jax.tree_util.tree_flatten(tree["blocks"])
        if tree_def != block_tree:
            raise ValueError(f"{directory}: layer {layer} converts to blocks {tree_def}, the config needs {block_tree}.")
        layer_arrays = [put(x[0], sh, f"layer {layer} {jax.tree_util.keystr(path)}", s.shape[1:])
                        for x, (path, s), sh in zip(leaves, block_shapes, layer_shardings)]
        del tree, leaves  # drop the host copies before reading the next layer
        stacked = write_layer(stacked, layer_arrays, jnp.int32(layer))
        del layer_arrays
    params = {**top, "blocks": jax.tree_util.tree_unflatten(block_tree, stacked)}
    return cfg, params, hf_config
