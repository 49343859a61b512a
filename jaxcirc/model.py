"""`Model`: a config, its params, a tokenizer and the compiled pure forward, plus `run`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcirc.hooks import Hooks, Intervention, as_hooks
from jaxcirc.models import hook_points
from jaxcirc.models.config import ModelConfig
from jaxcirc.models.transformer import make_forward

Array = jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """A loaded model. `forward(params, tokens, hooks)` is pure and jitted; params are a plain dict.

    `source` says where the weights came from; `source_hash` identifies them (sha256 of the file
    or a digest of the parameters) so results can record exactly which model they used.
    """

    config: ModelConfig
    params: dict
    tokenizer: Any = None
    source: str = ""
    source_hash: str = ""
    forward: Callable[..., tuple[Array, dict[str, Array]]] = dataclasses.field(default=None, repr=False)

    def __post_init__(self):
        if self.forward is None:
            object.__setattr__(self, "forward", make_forward(self.config))

    def with_params(self, params: dict) -> "Model":
        """The same model with other parameters (same compiled forward)."""
        return dataclasses.replace(self, params=params)

    def hook_names(self) -> list[str]:
        return hook_points.full_names(self.config)

    def hook_dims(self, name: str) -> tuple[str, ...]:
        return hook_points.dims_of(self.config, name)

    def to_tokens(self, text: str | Sequence[str]) -> Array:
        """Text (or equal-length texts) -> int32 tokens [batch, pos] with the tokenizer's own BOS rule."""
        if self.tokenizer is None:
            raise ValueError("This model has no tokenizer; pass token ids instead of text.")
        texts = [text] if isinstance(text, str) else list(text)
        ids = [self.tokenizer.encode(t) for t in texts]
        lengths = sorted({len(i) for i in ids})
        if len(lengths) > 1:
            raise ValueError(
                f"Texts tokenize to different lengths {lengths}; pass them one at a time or as "
                "minimal pairs (jaxcirc pads those with a per-example read position)."
            )
        return jnp.asarray(np.array(ids, dtype=np.int32))

    def token_str(self, token_id: int) -> str:
        return self.tokenizer.token_str(int(token_id)) if self.tokenizer is not None else str(token_id)


def check_tokens(cfg: ModelConfig, tokens: Any) -> Array:
    """Validate token ids ([pos] or [batch, pos]) against the vocabulary and context window."""
    array = np.asarray(tokens)
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2:
        raise ValueError(f"tokens must be [batch, pos] integers, got shape {array.shape}.")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"tokens must be integers, got dtype {array.dtype}.")
    if array.shape[1] == 0:
        raise ValueError("tokens are empty: give at least one position.")
    if array.shape[1] > cfg.n_ctx:
        raise ValueError(
            f"Sequence of {array.shape[1]} tokens is longer than the model's context window "
            f"of {cfg.n_ctx}; truncate or split it."
        )
    bad = (array < 0) | (array >= cfg.d_vocab)
    if bad.any():
        b, p = np.argwhere(bad)[0]
        raise ValueError(
            f"Token id {int(array[b, p])} at [batch {b}, pos {p}] is out of range for a vocabulary "
            f"of {cfg.d_vocab} (valid ids 0..{cfg.d_vocab - 1})."
        )
    # device_put, not jnp.asarray: the latter compiles a small program per new shape.
    return jax.device_put(array.astype(np.int32))


def run(model: Model, tokens: Any, hooks: Hooks | Mapping[str, Intervention] | None = None,
        cache: Iterable[str] = (), *, params: dict | None = None, **forward_options):
    """Run `model` on tokens (ids [batch, pos] or [pos], or text) -> (logits [batch, pos, vocab], cache).

    `hooks` are interventions (see `jaxcirc.hooks`); `cache` lists hook point names (`*` for every
    layer) whose activations to return. Checks token ids and lengths before compiling.
    """
    if isinstance(tokens, str) or (isinstance(tokens, (list, tuple)) and tokens and isinstance(tokens[0], str)):
        tokens = model.to_tokens(tokens)
    if not isinstance(tokens, jax.core.Tracer):
        tokens = check_tokens(model.config, tokens)
    return model.forward(model.params if params is None else params, tokens, as_hooks(hooks, cache),
                         **forward_options)
