"""`load(source)`: a registry name, a local HF directory, a .gguf file or a jaxcirc checkpoint;
optionally straight onto a device mesh, optionally with TransformerLens-style weight processing."""

from __future__ import annotations

import hashlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxcirc import checkpoint, registry
from jaxcirc.model import Model
from jaxcirc.models.hf import load_hf_directory, load_hf_directory_on_mesh, params_from_hf_tensors, resolve_dtype


def params_digest(params: dict) -> str:
    """A sha256 over every parameter's path, dtype, shape and bytes (gathered one parameter at a
    time, so sharded params give the same digest as the same params on one device)."""
    from jaxcirc.sharding import to_host

    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        array = to_host(leaf)
        digest.update(f"{jax.tree_util.keystr(path)}{array.dtype}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _hf_tokenizer(directory: Path):
    from jaxcirc.tokenizer import Tokenizer

    path = directory / "tokenizer.json"
    return Tokenizer.from_file(path) if path.exists() else None


def placement(params: dict) -> dict[str, tuple[str | None, ...]]:
    """Where each parameter lives: path (`blocks.attn.W_Q`) -> for each of its axes the mesh axis it
    is split over, or None. All None: the whole array on every device (replicated) or on one device.

        {"W_E": ("model", None), "blocks.attn.W_Q": (None, None, "model", None), "ln_final.w": (None,)}
    """
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = ".".join(str(getattr(k, "key", k)) for k in path)
        spec = tuple(getattr(getattr(leaf, "sharding", None), "spec", ()) or ())
        axes = [None] * np.ndim(leaf)
        for i, part in enumerate(spec):
            axes[i] = part if part is None or isinstance(part, str) else "+".join(part)
        out[name] = tuple(axes)
    return out


def load(source: str | Path, dtype: str = "auto", cache_dir: str | Path | None = None, *, mesh=None,
         fold_ln: bool = False, center_writing_weights: bool = False, center_unembed: bool = False,
         fold_value_biases: bool = False) -> Model:
    """Load a model from a registry name (`smollm2-135m`), an HF directory, a .gguf file or a
    jaxcirc checkpoint directory. Nothing is downloaded: every source is local.

    `dtype`: "auto" keeps the weights as stored (a bfloat16 checkpoint stays bfloat16, float32
    stays float32; GGUF dequantizes to float32; a jaxcirc checkpoint keeps its dtype), or a float
    dtype name ("float32", "bfloat16", "float16") converts every parameter.
    `mesh`: a `jax.sharding.Mesh` with a `model` axis (`jaxcirc.sharding.make_mesh`): each parameter
    is placed on it as `jaxcirc.sharding.param_partition_specs` says (heads, d_mlp and vocab split
    over `model`, the rest replicated). HF checkpoints stream one layer at a time: the host holds one
    layer, each device only its slices, so a model larger than one device loads straight into its
    final layout. `placement(model.params)` shows where each parameter went.
    `fold_ln`, `center_writing_weights`, `center_unembed`, `fold_value_biases`: TransformerLens'
    weight processing (`jaxcirc.weight_processing`), all off by default; the steps applied are
    recorded in `model.config.weight_processing`.
    """
    model = _load(source, dtype, cache_dir, mesh)
    from jaxcirc.weight_processing import process_params

    cfg, params = process_params(model.config, model.params, donate=True, mesh=mesh, fold_ln=fold_ln,
                                 center_writing_weights=center_writing_weights,
                                 center_unembed=center_unembed, fold_value_biases=fold_value_biases)
    if cfg is model.config:
        return model
    return Model(cfg, params, model.tokenizer, source=model.source, source_hash=model.source_hash)


def _load(source: str | Path, dtype: str, cache_dir: str | Path | None, mesh) -> Model:
    from jaxcirc.sharding import shard_params  # GGUF and jaxcirc checkpoints: read whole, then placed

    if mesh is not None and "model" not in mesh.axis_names:
        raise ValueError(f"load(mesh=...) needs a mesh with a 'model' axis (jaxcirc.sharding.make_mesh); "
                         f"this one has axes {mesh.axis_names}.")
    if dtype != "auto":
        dtype = resolve_dtype(dtype, {})  # checked (a clear error for e.g. "bf16") and normalised
    path = Path(source).expanduser()
    if not path.exists():
        if isinstance(source, str) and "/" not in source and not source.endswith(".gguf"):
            path = registry.resolve(source)
        else:
            raise FileNotFoundError(
                f"{source!r} does not exist. Give a registry name ({', '.join(registry.known_names())}), "
                "a local HF model directory (config.json + weights), a .gguf file or a jaxcirc checkpoint. "
                f"{registry.DEFAULT_INSTALL_HINT}"
            )
    if path.is_file() and path.suffix == ".gguf":
        from jaxcirc.models.gguf import load_gguf

        hf_config, tensors, tokenizer = load_gguf(path, cache_dir=cache_dir)
        sha256 = hf_config["_jaxcirc_source_sha256"]
        cfg, params = params_from_hf_tensors(hf_config, tensors, "float32" if dtype == "auto" else dtype)
        del tensors
        params = jax.tree.map(jnp.asarray, params) if mesh is None else shard_params(params, mesh, cfg)
        return Model(cfg, params, tokenizer, source=str(path), source_hash=sha256)
    if path.is_dir() and checkpoint.is_checkpoint(path):
        cfg, params, meta = checkpoint.load_checkpoint(path)
        tokenizer = None
        if meta.get("tokenizer"):
            from jaxcirc.tokenizer import Tokenizer

            tokenizer = Tokenizer.from_json(meta["tokenizer"])
        if dtype not in ("auto", cfg.dtype):
            cfg = cfg.replace(dtype=dtype)
            params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
        if mesh is not None:
            params = shard_params(params, mesh, cfg)
        return Model(cfg, params, tokenizer, source=str(path), source_hash=meta.get("source_hash") or params_digest(params))
    if path.is_dir() and (path / "config.json").exists():
        if mesh is None:
            cfg, params, _ = load_hf_directory(path, dtype)
            params = jax.tree.map(jnp.asarray, params)
        else:
            cfg, params, _ = load_hf_directory_on_mesh(path, mesh, dtype)
        return Model(cfg, params, _hf_tokenizer(path), source=str(path), source_hash=params_digest(params))
    raise ValueError(
        f"{path} is neither a .gguf file, an HF model directory (with config.json) nor a jaxcirc "
        f"checkpoint (with {checkpoint.MARKER})."
    )
