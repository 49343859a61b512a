"""`load(source)`: a registry name, a local HF directory, a .gguf file or a jaxcirc checkpoint."""

from __future__ import annotations

import hashlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxcirc import checkpoint, registry
from jaxcirc.model import Model
from jaxcirc.models.hf import load_hf_directory, params_from_hf_tensors


def params_digest(params: dict) -> str:
    """A sha256 over every parameter's path, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        array = np.asarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)}{array.dtype}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _hf_tokenizer(directory: Path):
    from jaxcirc.tokenizer import Tokenizer

    path = directory / "tokenizer.json"
    return Tokenizer.from_file(path) if path.exists() else None


def load(source: str | Path, dtype: str = "float32", cache_dir: str | Path | None = None) -> Model:
    """Load a model from a registry name (`smollm2-135m`), an HF directory, a .gguf file or a
    jaxcirc checkpoint directory. Nothing is downloaded: every source is local."""
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
        cfg, params = params_from_hf_tensors(hf_config, tensors, dtype)
        return Model(cfg, jax.tree.map(jnp.asarray, params), tokenizer, source=str(path), source_hash=sha256)
    if path.is_dir() and checkpoint.is_checkpoint(path):
        cfg, params, meta = checkpoint.load_checkpoint(path)
        tokenizer = None
        if meta.get("tokenizer"):
            from jaxcirc.tokenizer import Tokenizer

            tokenizer = Tokenizer.from_json(meta["tokenizer"])
        if dtype != cfg.dtype:
            cfg = cfg.replace(dtype=dtype)
            params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
        return Model(cfg, params, tokenizer, source=str(path), source_hash=meta.get("source_hash") or params_digest(params))
    if path.is_dir() and (path / "config.json").exists():
        cfg, params, _ = load_hf_directory(path, dtype)
        params = jax.tree.map(jnp.asarray, params)
        return Model(cfg, params, _hf_tokenizer(path), source=str(path), source_hash=params_digest(params))
    raise ValueError(
        f"{path} is neither a .gguf file, an HF model directory (with config.json) nor a jaxcirc "
        f"checkpoint (with {checkpoint.MARKER})."
    )
