"""One configuration type for every ported family.

The families differ only in a handful of switches (norm kind, positional scheme, gated MLP,
parallel residual, biases); the shared blocks in `common.py` read these switches, so a family
file only has to translate its checkpoint's config into a `ModelConfig`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

Family = Literal["gpt2", "gpt_neox", "llama", "gptj", "bloom", "gemma2"]
NormKind = Literal["layernorm", "rmsnorm"]
Activation = Literal["gelu_new", "gelu", "gelu_fast", "gelu_pytorch_tanh", "relu", "silu"]
Positional = Literal["learned", "rotary", "alibi"]


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding settings.

    `rotary_dim` dimensions of each head are rotated (all of them unless partial, as in Pythia).
    `scaling` is None, ("linear", factor) or ("llama3", factor, low_freq_factor,
    high_freq_factor, original_max_position_embeddings). `interleaved` pairs dims (0, 1), (2, 3), ...
    (GPT-J's rotate-every-two) instead of HF's rotate-half pairs (i, i + rotary_dim / 2).
    """

    theta: float = 10000.0
    rotary_dim: int = 0
    scaling: tuple | None = None
    interleaved: bool = False


@dataclasses.dataclass(frozen=True)
class AttentionWindow:
    """LM-Infinite-style attention (Han et al. 2023), the same in every layer.

    Query i sees key j <= i when j is one of the first `n_global` tokens or one of its `n_local`
    most recent tokens (itself included): a Lambda-shaped mask over token indices. With
    `max_distance` set, rotary logits of pairs whose position-id distance exceeds it are computed
    as if the distance were `max_distance` (the trained length). The paper's Llama-2 setting is
    n_global=100, n_local=4096, max_distance=4096.
    """

    n_global: int
    n_local: int
    max_distance: int | None = None

    def __post_init__(self):
        if self.n_global < 0 or self.n_local < 1 or (self.max_distance is not None and self.max_distance < 0):
            raise ValueError(f"AttentionWindow needs n_global >= 0, n_local >= 1 and max_distance None or >= 0; "
                             f"got {self}.")


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
    # GPT-J: attention and MLP read one norm (ln1's weights; the MLP's copy is hooked as ln2.*).
    shared_norm: bool = False
    # BLOOM: a norm right after the embedding (hooked as embed.ln.*; hook_embed is its output).
    embed_norm: bool = False
    # Gemma: the embedding is multiplied by this (in the model dtype), e.g. sqrt(d_model).
    embed_scale: float = 1.0
    # Gemma: norms scale by (norm_offset + w), e.g. RMSNorm's (1 + w).
    norm_offset: float = 0.0
    # Gemma 2: norms on the attention and MLP outputs before they join the residual (ln1_post, ln2_post).
    post_norms: bool = False
    # Attention logits are q.k * query_scale (None: 1/sqrt(d_head)), then cap*tanh(s/cap) if capped.
    query_scale: float | None = None
    attn_softcap: float | None = None
    # Logits are cap*tanh(logits/cap) if set (Gemma 2).
    final_softcap: float | None = None
    dtype: str = "float32"
    initializer_range: float = 0.02
    # Per-layer sliding window in tokens (query i sees keys i - w < j <= i); 0 is full attention.
    layer_windows: tuple[int, ...] | None = None
    attention_window: AttentionWindow | None = None
    # Weight processing applied after loading, in order (jaxcirc.weight_processing), e.g.
    # ("fold_ln", "center_writing_weights"): the weights differ from the checkpoint's, the
    # log-softmax does not.
    weight_processing: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "weight_processing", tuple(self.weight_processing))  # JSON gives a list
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if isinstance(self.rope, dict):
            rope = dict(self.rope)
            if rope.get("scaling") is not None:
                rope["scaling"] = tuple(rope["scaling"])
            object.__setattr__(self, "rope", RopeConfig(**rope))
        if isinstance(self.attention_window, dict):
            object.__setattr__(self, "attention_window", AttentionWindow(**self.attention_window))
        if self.layer_windows is not None:
            windows = tuple(int(w) for w in self.layer_windows)
            object.__setattr__(self, "layer_windows", windows)
            if len(windows) != self.n_layers or min(windows) < 0:
                raise ValueError(f"layer_windows needs one window >= 0 per layer ({self.n_layers}), "
                                 f"0 meaning full attention; got {windows}.")
        if self.attention_window and self.attention_window.max_distance is not None and self.positional != "rotary":
            raise ValueError("attention_window.max_distance caps rotary distances; this model has "
                             f"positional={self.positional!r}. Leave max_distance None for a mask-only window.")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}; "
                "grouped-query attention needs each kv head to serve a whole group of query heads."
            )
        if self.shared_norm and not self.parallel_residual:
            raise ValueError("shared_norm=True (one norm for attention and MLP) needs parallel_residual=True.")
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
