"""Interventions as data.

A hook is not a Python callback: it is a small pytree of arrays attached to a hook point name.
Because interventions are arrays, `jax.vmap` over a stack of masks runs a whole patching sweep as
one program, and `jax.grad` with respect to an `add` delta is attribution patching.

    hooks = Hooks({"blocks.3.attn.hook_z": replace(z_corrupt, mask)},
                  cache=("blocks.*.hook_resid_post",))
    logits, cache = model.forward(params, tokens, hooks)

Semantics at a hook point holding activation `x`, in this order:
  * replace: `x <- value` where `mask` is true (bool mask) or `x <- x + mask * (value - x)` (float
    mask, so masks can interpolate and be differentiated); no mask means replace everywhere;
  * add: `x <- x + add`.
Arrays must have the activation's number of dimensions (TransformerLens shapes, batch first),
each dimension equal to the activation's or 1 (broadcast), or be scalars. A name with `*` for the
layer (`blocks.*.hook_resid_pre`) intervenes at every layer at once: its arrays carry a leading
[layer] axis of full length.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import jax

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Intervention:
    """What to do at one hook point. Every field is an optional array (a pytree leaf)."""

    replace: Any = None
    mask: Any = None
    add: Any = None

    def __post_init__(self):
        if self.mask is not None and self.replace is None:
            raise ValueError("Intervention has a mask but no replace value; give replace=... too.")


def replace(value: Any, mask: Any = None) -> Intervention:
    """Replace the activation with `value` (where `mask` is set, if given)."""
    return Intervention(replace=value, mask=mask)


def add(delta: Any) -> Intervention:
    """Add `delta` to the activation (steering, o-vectors, the zero delta that AtP differentiates)."""
    return Intervention(add=delta)


def _flatten_hooks(hooks: "Hooks"):
    names = tuple(sorted(hooks.interventions))
    children = tuple(hooks.interventions[n] for n in names) + (hooks.edges,)
    return children, (names, hooks.cache)


def _unflatten_hooks(aux, children) -> "Hooks":
    names, cache = aux
    return Hooks(dict(zip(names, children[:-1])), cache, children[-1])


@dataclasses.dataclass(frozen=True)
class Hooks:
    """Interventions by hook point name, plus the names whose activations to return.

    `cache` names may use `*` for the layer (`blocks.*.attn.hook_z`). The cache names are static
    (part of the pytree structure), the interventions are data. `edges` optionally patches
    individual edges of the residual graph (`jaxcirc.edge_patch.EdgePatch`).
    """

    interventions: Mapping[str, Intervention] = dataclasses.field(default_factory=dict)
    cache: tuple[str, ...] = ()
    edges: Any = None

    def __post_init__(self):
        if isinstance(self.cache, str):
            object.__setattr__(self, "cache", (self.cache,))
        else:
            object.__setattr__(self, "cache", tuple(self.cache))
        for name, value in self.interventions.items():
            if not isinstance(value, Intervention):
                raise TypeError(
                    f"Hook {name!r}: expected an Intervention (use jaxcirc.replace(...) or "
                    f"jaxcirc.add(...)), got {type(value).__name__}."
                )

    def with_cache(self, names: Iterable[str]) -> "Hooks":
        return Hooks(self.interventions, tuple(self.cache) + tuple(names), self.edges)


jax.tree_util.register_pytree_node(Hooks, _flatten_hooks, _unflatten_hooks)


def as_hooks(hooks: "Hooks | Mapping[str, Intervention] | None", cache: Iterable[str] = ()) -> Hooks:
    """Accept None, a plain {name: Intervention} dict or a Hooks; add extra cache names."""
    if hooks is None:
        hooks = Hooks()
    elif not isinstance(hooks, Hooks):
        hooks = Hooks(dict(hooks))
    cache = tuple(cache)
    return hooks.with_cache(cache) if cache else hooks
