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

# Prefixes HF puts in front of the backbone's tensor names (absent in some older checkpoints).
_BACKBONE_PREFIXES = ("transformer.", "gpt_neox.", "model.")


def families() -> dict[str, ModuleType]:
    """model_type -> family module (each has MODEL_TYPES, config_from_hf, params_from_hf)."""
    from jaxcirc.models import gpt2, gpt_neox, llama

    return {t: module for module in (gpt2, gpt_neox, llama) for t in module.MODEL_TYPES}


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
    """Checkpoint tensors by HF name, each read (as numpy) only when asked for."""

    def __init__(self, where: dict[str, Callable[[str], Any]]):
        self._where = where  # name -> function reading that tensor

    def __getitem__(self, name: str) -> np.ndarray:
        return _to_numpy(self._where[name](name))

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _safetensors_reader(files: list[Path]) -> LazyTensors:
    from safetensors import safe_open

    handles = [safe_open(str(f), framework="flax") for f in files]  # flax: bf16 without torch
    return LazyTensors({name: h.get_tensor for h in handles for name in h.keys()})


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
    return LazyTensors({name: tensors.__getitem__ for name in tensors})


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


def _unprefixed(tensors: Mapping[str, np.ndarray], dtype: str) -> Callable[[str], np.ndarray]:
    """Look tensors up by their backbone-relative name, whatever prefix the checkpoint uses."""
    names = set(tensors)

    def lookup(name: str) -> np.ndarray:
        for candidate in (name, *(p + name for p in _BACKBONE_PREFIXES)):
            if candidate in names:
                return np.asarray(tensors[candidate]).astype(dtype)
        raise KeyError(f"Tensor {name!r} not found in the checkpoint (it has e.g. {sorted(names)[:5]}).")

    return lookup


def params_from_hf_tensors(hf_config: Mapping[str, Any], tensors: Mapping[str, np.ndarray],
                           dtype: str = "float32") -> tuple[ModelConfig, dict]:
    """Config and params from an HF config dict and the tensors by their HF names."""
    family = family_for(hf_config)
    cfg = family.config_from_hf(dict(hf_config), dtype=dtype)
    return cfg, family.params_from_hf(_unprefixed(tensors, dtype), cfg)


def load_hf_directory(directory: str | Path, dtype: str = "float32") -> tuple[ModelConfig, dict, dict]:
    """(config, params, hf_config) from a local HF model directory."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{directory} has no config.json; is it an HF model directory?")
    hf_config = json.loads(config_path.read_text())
    family_for(hf_config, where=str(config_path))
    cfg, params = params_from_hf_tensors(hf_config, tensor_reader(directory), dtype)
    return cfg, params, hf_config
