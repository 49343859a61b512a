"""One configuration type for every ported family.

The families differ only in a handful of switches (norm kind, positional scheme, gated MLP,
parallel residual, biases); the shared blocks in `common.py` read these switches, so a family
file only has to translate its checkpoint's config into a `ModelConfig`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

Family = Literal["gpt2", "gpt_neox", "llama"]
NormKind = Literal["layernorm", "rmsnorm"]
Activation = Literal["gelu_new", "gelu", "gelu_fast", "relu", "silu"]
Positional = Literal["learned", "rotary"]


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding settings (HF rotate-half convention).

    `rotary_dim` dimensions of each head are rotated (all of them unless partial, as in Pythia).
    `scaling` is None, ("linear", factor) or ("llama3", factor, low_freq_factor,
    high_freq_factor, original_max_position_embeddings).
    """

    theta: float = 10000.0
    rotary_dim: int = 0
    scaling: tuple | None = None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer. Hashable, so it can be a static jit argument."""

    family: Family
    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int
    n_kv_heads: int | None = None
    norm: NormKind = "layernorm"
    norm_eps: float = 1e-5
    activation: Activation = "gelu_new"
    gated_mlp: bool = False
    parallel_residual: bool = False
    positional: Positional = "learned"
    rope: RopeConfig | None = None
    tied_embeddings: bool = True
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    unembed_bias: bool = False
    dtype: str = "float32"
    initializer_range: float = 0.02

    def __post_init__(self):
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if isinstance(self.rope, dict):
            rope = dict(self.rope)
            if rope.get("scaling") is not None:
                rope["scaling"] = tuple(rope["scaling"])
            object.__setattr__(self, "rope", RopeConfig(**rope))
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}; "
                "grouped-query attention needs each kv head to serve a whole group of query heads."
            )
        if self.positional == "rotary" and self.rope is None:
            raise ValueError("positional='rotary' needs a RopeConfig in `rope`.")

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown ModelConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)
