"""jaxcirc's own checkpoint format: `jaxcirc.json` (config, tokenizer, provenance) + orbax params."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from jaxcirc.models.config import ModelConfig
from jaxcirc.models.transformer import param_shapes

if TYPE_CHECKING:
    from jaxcirc.model import Model

MARKER = "jaxcirc.json"
FORMAT_VERSION = 1


def is_checkpoint(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


def save(model: "Model", directory: str | Path, extra: dict | None = None) -> Path:
    """Write `model` to `directory` (created; must not already hold a checkpoint)."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    if is_checkpoint(directory):
        raise FileExistsError(f"{directory} already holds a jaxcirc checkpoint; choose a new directory.")
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / "params", model.params)
    meta = {
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "tokenizer": None if model.tokenizer is None else model.tokenizer.to_json(),
        "source": model.source,
        "source_hash": model.source_hash,
        **(extra or {}),
    }
    tmp = directory / (MARKER + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    tmp.replace(directory / MARKER)  # the marker appears only once the params are complete
    return directory


def load_checkpoint(directory: str | Path) -> tuple[ModelConfig, dict, dict]:
    """(config, params, metadata) of a checkpoint written by `save`."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    meta = json.loads((directory / MARKER).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{directory}: checkpoint format {meta.get('format_version')} is not "
                         f"{FORMAT_VERSION}; it was written by another jaxcirc version.")
    cfg = ModelConfig.from_dict(meta["config"])
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(directory / "params", param_shapes(cfg))
    return cfg, params, meta
