"""The run directory every CLI command writes (design.md, "Outputs"):

    results.json   configuration, versions, model source and hash, scalars, and under "arrays"
                   each array's name, dims and shape
    arrays.npz     the arrays by those names
    figures/*.png  plots
    report.md      what a person reads first

A run is written into a temporary sibling directory and renamed into place at the end, so a
killed command never leaves a half-written run, and an existing run is never overwritten unless
asked.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from jaxcirc.model import Model


def versions() -> dict[str, str]:
    import flax
    import jax

    import jaxcirc

    return {"jaxcirc": jaxcirc.__version__, "jax": jax.__version__, "flax": flax.__version__,
            "numpy": np.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "backend": jax.default_backend(),
            "devices": str(jax.devices())}


def model_record(model: "Model") -> dict[str, Any]:
    return {"source": model.source, "hash": model.source_hash, "config": model.config.to_dict()}


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.ndarray) or hasattr(value, "__array__"):
        value = np.asarray(value)
        return _jsonable(value.tolist()) if value.ndim else _jsonable(value.item())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None  # JSON has no NaN/inf
    return value


def write_run(out_dir: str | Path, *, command: str, config: Mapping[str, Any],
              arrays: Mapping[str, tuple[Any, tuple[str, ...]]] | None = None,
              scalars: Mapping[str, Any] | None = None, model: "Model | None" = None,
              figures: Mapping[str, Any] | None = None, report: str = "",
              overwrite: bool = False) -> Path:
    """Write a run directory atomically.

    arrays:  name -> (array, dims), e.g. {"patch_effect": (effect, ("layer", "pos"))}
    figures: name -> matplotlib Figure (saved as figures/{name}.png and closed), or a function
             that writes the PNG to the path it is given
    """
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists and is not empty; choose another --out "
                              "or pass overwrite (the existing run is kept until the new one is complete).")
    arrays, scalars, figures = dict(arrays or {}), dict(scalars or {}), dict(figures or {})
    for name, entry in arrays.items():
        array, dims = entry
        if np.ndim(array) != len(dims):
            raise ValueError(f"Array {name!r} has {np.ndim(array)} dims but {len(dims)} names {dims}.")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        np.savez(staging / "arrays.npz", **{name: np.asarray(a) for name, (a, _) in arrays.items()})
        if figures:
            import matplotlib.pyplot as plt

            (staging / "figures").mkdir()
            for name, figure in figures.items():
                path = staging / "figures" / f"{name}.png"
                if callable(figure):  # a plotting function that writes the file itself
                    figure(path)
                else:
                    figure.savefig(path, dpi=110, bbox_inches="tight")
                    plt.close(figure)
        results = {
            "command": command,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "config": _jsonable(config),
            "versions": versions(),
            "model": model_record(model) if model is not None else None,
            "scalars": _jsonable(scalars),
            "arrays": {name: {"dims": list(dims), "shape": list(np.shape(a)), "dtype": str(np.asarray(a).dtype)}
                       for name, (a, dims) in arrays.items()},
            "figures": [f"figures/{name}.png" for name in figures],
        }
        (staging / "results.json").write_text(json.dumps(results, indent=2, allow_nan=False))
        (staging / "report.md").write_text(report)
        if out_dir.exists():
            previous = out_dir.with_name(f".{out_dir.name}.previous")
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(out_dir, previous)
            os.replace(staging, out_dir)
            shutil.rmtree(previous, ignore_errors=True)
        else:
            os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def read_run(run_dir: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(results.json contents, arrays by name) of a run directory."""
    run_dir = Path(run_dir)
    if not (run_dir / "results.json").exists():
        raise FileNotFoundError(f"{run_dir} is not a jaxcirc run directory (no results.json).")
    results = json.loads((run_dir / "results.json").read_text())
    with np.load(run_dir / "arrays.npz") as data:
        arrays = {name: data[name] for name in data.files}
    return results, arrays
