"""Helpers for HF checkpoints: config values spelled differently across versions, layer stacking.

transformers 5 writes rope settings as `rope_parameters` (with `rope_theta`, `rope_type`,
`partial_rotary_factor` inside); published checkpoints carry `rope_theta` + `rope_scaling` at the
top level, and GPT-NeoX's `rotary_pct` + `rotary_emb_base`. Both are read here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxcirc.models.config import RopeConfig


def first(hf: dict[str, Any], *keys: str, default: Any = None) -> Any:
    """The value of the first key present (and not None) in `hf`."""
    for key in keys:
        if hf.get(key) is not None:
            return hf[key]
    return default


def rope_from_hf(hf: dict[str, Any], head_dim: int, default_theta: float = 10000.0) -> RopeConfig:
    """RopeConfig from either spelling of an HF config."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = first(params, "rope_theta", default=first(hf, "rope_theta", "rotary_emb_base", default=default_theta))
    fraction = first(params, "partial_rotary_factor",
                     default=first(hf, "partial_rotary_factor", "rotary_pct", default=1.0))
    merged = {**scaling, **params}
    kind = first(merged, "rope_type", "type", default="default")
    rotary_dim = int(head_dim * fraction)
    if kind == "default":
        return RopeConfig(theta=float(theta), rotary_dim=rotary_dim)
    if kind == "linear":
        return RopeConfig(float(theta), rotary_dim, ("linear", float(merged["factor"])))
    if kind == "llama3":
        return RopeConfig(float(theta), rotary_dim, (
            "llama3", float(merged["factor"]), float(merged["low_freq_factor"]),
            float(merged["high_freq_factor"]), float(merged["original_max_position_embeddings"])))
    raise ValueError(
        f"Rope scaling type {kind!r} is not supported yet (supported: default, linear, llama3)."
    )


def stack_blocks(blocks: list[Any]) -> Any:
    """Stack per-layer parameter dicts on a new leading layer axis (the scanned layout)."""
    if isinstance(blocks[0], dict):
        return {k: stack_blocks([b[k] for b in blocks]) for k in blocks[0]}
    return np.stack(blocks)
