"""How a forward pass applies `Hooks`: validation, grouping by layer, and the per-layer context.

Blocks run inside `jax.lax.scan`, so per-block interventions are grouped by template
(`attn.hook_z`) and stacked over the layers that use them; inside the scan step the current
layer's slice is gathered. Cached activations go into carry buffers sized for the requested
layers only (TransformerLens issue 746: caching everything exhausts memory).
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch

import jax
import jax.numpy as jnp
import numpy as np

from jaxcirc.edge_patch import EdgeState
from jaxcirc.hooks import Hooks, Intervention
from jaxcirc.models import hook_points
from jaxcirc.models.config import ModelConfig

Array = jax.Array


EDGE_OUTPUTS = "__edge_outputs__"  # buffer key of the running node outputs (never a hook name)

# Edge destinations and sources at hook points: template -> (table in EdgeState.tables).
_EDGE_INPUTS = {"hook_q_input": "q", "hook_k_input": "k", "hook_v_input": "v", "hook_mlp_in": "mlp"}
_EDGE_OUTPUTS = {"attn.hook_result": "heads", "hook_mlp_out": "mlp_src"}


class HookNameError(KeyError):
    """An unknown hook point name; the message names the closest valid ones."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0])


def check_name(cfg: ModelConfig, name: str, valid: list[str] | None = None) -> None:
    """Raise HookNameError naming the closest valid hook points if `name` is not one."""
    valid = hook_points.full_names(cfg) if valid is None else valid
    if name in valid:
        return
    layer, template = hook_points.split_name(name)
    hint = ""
    if layer is not None and layer >= cfg.n_layers and template in hook_points.block_points(cfg):
        hint = f" The model has {cfg.n_layers} layers (0..{cfg.n_layers - 1})."
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.6)
    if not close:
        templates = list(hook_points.top_level_points(cfg)) + list(hook_points.block_points(cfg))
        close = difflib.get_close_matches(template, templates, n=3, cutoff=0.4)
        close = [c if c in hook_points.top_level_points(cfg) else f"blocks.{layer or 0}.{c}" for c in close]
    suggestion = f" Did you mean: {', '.join(close)}?" if close else ""
    raise HookNameError(f"Unknown hook point {name!r}.{hint}{suggestion} "
                        "(`jaxcirc hooks MODEL` lists every name and shape.)")


def expand_cache_names(cfg: ModelConfig, patterns: tuple[str, ...], valid: list[str]) -> list[str]:
    """Expand `*` wildcards; every pattern must match at least one hook point."""
    names: list[str] = []
    for pattern in patterns:
        if any(ch in pattern for ch in "*?["):
            matched = fnmatch.filter(valid, pattern)
            if not matched:
                check_name(cfg, pattern.replace("*", "0"), valid)
                raise HookNameError(f"Cache pattern {pattern!r} matches no hook point.")
            names.extend(matched)
        else:
            check_name(cfg, pattern, valid)
            names.append(pattern)
    return list(dict.fromkeys(names))


def _check_shape(name: str, field: str, array, act_shape: tuple[int, ...], dims,
                 stacked: bool = False) -> None:
    """`stacked`: a `blocks.*` intervention, whose leading layer axis must be given in full."""
    shape = tuple(np.shape(array))
    ok = (shape == () and not stacked) or (
        len(shape) == len(act_shape) and all(s in (1, a) for s, a in zip(shape, act_shape))
        and (not stacked or shape[0] == act_shape[0])
    )
    if not ok:
        described = ", ".join(f"{d}={s}" for d, s in zip(dims, act_shape))
        raise ValueError(
            f"Hook {name!r}: `{field}` has shape {shape}, but the activation is [{described}]. "
            f"Give an array of shape {act_shape}, or one with 1 in the dimensions to broadcast "
            "(same number of dimensions), or a scalar."
        )


def _stack_interventions(items: list[Intervention], ndim: int) -> Intervention:
    """Stack interventions of several layers of one template into one with a leading layer axis.

    Fields missing in some layers are filled with no-ops (add 0; replace masked out).
    """
    def lift(a):
        a = jnp.asarray(a)
        return a.reshape((1,) * ndim) if a.ndim == 0 else a

    any_replace = any(it.replace is not None for it in items)
    any_add = any(it.add is not None for it in items)
    float_mask = any(it.mask is not None and not jnp.issubdtype(jnp.asarray(it.mask).dtype, jnp.bool_)
                     for it in items)
    values, masks, adds = [], [], []
    for it in items:
        if any_replace:
            if it.replace is None:
                values.append(jnp.zeros((1,) * ndim))
                masks.append(jnp.zeros((1,) * ndim, bool))
            else:
                values.append(lift(it.replace))
                masks.append(jnp.ones((1,) * ndim, bool) if it.mask is None else lift(it.mask))
        if any_add:
            adds.append(jnp.zeros((1,) * ndim) if it.add is None else lift(it.add))

    def stack(arrays, dtype=None):
        shape = np.broadcast_shapes(*(a.shape for a in arrays))
        return jnp.stack([jnp.broadcast_to(a if dtype is None else a.astype(dtype), shape) for a in arrays])

    if any_replace:
        mask_dtype = jnp.float32 if float_mask else jnp.bool_
        value_dtype = jnp.result_type(*values)
        return Intervention(replace=stack(values, value_dtype), mask=stack(masks, mask_dtype),
                            add=stack(adds, jnp.result_type(*adds)) if any_add else None)
    return Intervention(add=stack(adds, jnp.result_type(*adds)))


def apply_intervention(x: Array, iv: Intervention) -> Array:
    """Apply one intervention to activation `x` (replace, then add)."""
    if iv.replace is not None:
        value = jnp.asarray(iv.replace).astype(x.dtype)
        if iv.mask is None:
            x = jnp.broadcast_to(value, x.shape)
        elif jnp.issubdtype(jnp.asarray(iv.mask).dtype, jnp.bool_):
            x = jnp.where(iv.mask, value, x)
        else:
            x = x + jnp.asarray(iv.mask).astype(x.dtype) * (value - x)
    if iv.add is not None:
        x = x + jnp.asarray(iv.add).astype(x.dtype)
    return x


@dataclasses.dataclass
class HookPlan:
    """Validated hooks for one forward pass of a given batch and sequence length."""

    cfg: ModelConfig
    top: dict[str, Intervention]
    layer_ops: dict[str, tuple[np.ndarray, Intervention]]  # template -> (layers, stacked)
    cache_top: list[str]
    cache_layers: dict[str, np.ndarray]  # template -> layers to keep
    shapes: dict[str, tuple[int, ...]]  # template or top-level name -> activation shape
    edges: EdgeState | None = None

    def uses(self, template: str) -> bool:
        """Whether a block template is intervened on or cached (opt-in points depend on it).

        Edge patching needs every per-head input and output, so it uses all opt-in points."""
        if self.edges is not None and template in hook_points.OPT_IN_TEMPLATES:
            return True
        return template in self.layer_ops or template in self.cache_layers

    def covers_all_layers(self, layers: np.ndarray) -> bool:
        return len(layers) == self.cfg.n_layers

    def scanned_ops(self) -> dict[str, Intervention]:
        """Interventions present at every layer, stacked [layer, ...]: fed to the layer scan as
        scanned inputs (a per-layer gather from a closed-over array would make the scan's
        gradient accumulate a full [layer, ...] cotangent per step)."""
        return {t: iv for t, (layers, iv) in self.layer_ops.items() if self.covers_all_layers(layers)}

    def init_buffers(self, dtype, embedded: Array) -> dict[str, Array]:
        """Scan-carried state: buffers for templates cached at some layers only, and the running
        node outputs for edge patching. Templates cached at every layer are scan outputs instead."""
        buffers = {t: jnp.zeros((len(layers),) + self.shapes[t], dtype)
                   for t, layers in self.cache_layers.items() if not self.covers_all_layers(layers)}
        if self.edges is not None:
            buffers[EDGE_OUTPUTS] = self.edges.initial_outputs(embedded)
        return buffers

    def collect_cache(self, top_cache: dict[str, Array], buffers: dict[str, Array],
                      outputs: dict[str, Array]) -> dict[str, Array]:
        """Cache by full hook name from top-level values, carried buffers and scan outputs."""
        cache = dict(top_cache)
        for template, layers in self.cache_layers.items():
            stacked = outputs[template] if template in outputs else buffers[template]
            for i, layer in enumerate(layers):
                cache[f"blocks.{int(layer)}.{template}"] = stacked[int(layer) if template in outputs else i]
        return cache


def make_plan(cfg: ModelConfig, hooks: Hooks, batch: int, pos: int) -> HookPlan:
    """Validate names and shapes and group interventions by layer template."""
    valid = hook_points.full_names(cfg)
    sizes = hook_points.dim_sizes(cfg, batch, pos)
    shapes: dict[str, tuple[int, ...]] = {}
    for name, dims in hook_points.top_level_points(cfg).items():
        shapes[name] = tuple(sizes[d] for d in dims)
    for template, dims in hook_points.block_points(cfg).items():
        shapes[template] = tuple(sizes[d] for d in dims)

    top: dict[str, Intervention] = {}
    per_template: dict[str, dict[int, Intervention]] = {}
    all_layers: dict[str, Intervention] = {}
    for name, iv in hooks.interventions.items():
        if name.startswith("blocks.*."):
            template = name[len("blocks.*."):]
            check_name(cfg, f"blocks.0.{template}", valid)
            dims = ("layer",) + hook_points.block_points(cfg)[template]
            for field in ("replace", "mask", "add"):
                value = getattr(iv, field)
                if value is not None:
                    _check_shape(name, field, value, (cfg.n_layers,) + shapes[template], dims, stacked=True)
            all_layers[template] = iv
            continue
        check_name(cfg, name, valid)
        layer, template = hook_points.split_name(name)
        key = name if layer is None else template
        dims = hook_points.dims_of(cfg, name)
        for field in ("replace", "mask", "add"):
            value = getattr(iv, field)
            if value is not None:
                _check_shape(name, field, value, shapes[key], dims)
        if layer is None:
            top[name] = iv
        else:
            per_template.setdefault(template, {})[layer] = iv

    layer_ops = {}
    for template, by_layer in per_template.items():
        layers = np.array(sorted(by_layer), dtype=np.int32)
        ndim = len(shapes[template])
        layer_ops[template] = (layers, _stack_interventions([by_layer[int(l)] for l in layers], ndim))
    for template, iv in all_layers.items():
        if template in layer_ops:
            raise ValueError(f"Hooks give both 'blocks.*.{template}' and single layers of it; "
                             "merge them into the stacked intervention.")
        layer_ops[template] = (np.arange(cfg.n_layers, dtype=np.int32), iv)

    cache_top, cache_sets = [], {}
    for name in expand_cache_names(cfg, hooks.cache, valid):
        layer, template = hook_points.split_name(name)
        if layer is None:
            cache_top.append(name)
        else:
            cache_sets.setdefault(template, set()).add(layer)
    cache_layers = {t: np.array(sorted(ls), dtype=np.int32) for t, ls in cache_sets.items()}

    uses_split = [t for t in ("hook_q_input", "hook_k_input", "hook_v_input")
                  if t in layer_ops or t in cache_layers]
    uses_ln1 = [t for t in ("ln1.hook_scale", "ln1.hook_normalized") if t in layer_ops or t in cache_layers]
    if uses_split and uses_ln1:
        raise ValueError(
            f"Hooks on {uses_split} give each head its own attention input, so ln1 runs per head "
            f"and {uses_ln1} has no single value; hook the per-head inputs or ln1, not both."
        )
    edges = None
    if hooks.edges is not None:
        edges = EdgeState(hooks.edges)
        expected = (edges.patch.layout.n_src, batch, pos, cfg.d_model)
        if tuple(edges.patch.source.shape) != expected:
            raise ValueError(f"Edge patch source has shape {tuple(edges.patch.source.shape)}; expected "
                             f"[n_src, batch, pos, d_model] = {expected} (see edge_patch.node_outputs).")
    if edges is not None and uses_ln1:
        raise ValueError(f"Edge patching gives each head its own input, so {uses_ln1} has no single value.")
    return HookPlan(cfg, top, layer_ops, cache_top, cache_layers, shapes, edges)


def _select_layer(layers: np.ndarray, layer) -> tuple[Array | None, Array]:
    """(present, index) of `layer` within the static `layers`; present is None when always true."""
    if layer is None:
        raise ValueError("block hook used outside a block")
    hit = jnp.asarray(layers) == layer
    return hit.any(), jnp.argmax(hit)


class HookContext:
    """Applies the plan at the hook points of one block (or of the top level, layer=None).

    Called as `x = hook("attn.hook_z", x)` by the model code. `layer_ops` holds this layer's slice
    of the interventions present at every layer; cached activations go to `outputs` (templates
    cached at every layer), `buffers` (some layers) or `top_cache` (top level).
    """

    def __init__(self, plan: HookPlan, layer=None, buffers: dict[str, Array] | None = None,
                 layer_ops: dict[str, Intervention] | None = None):
        self.plan = plan
        self.layer = layer
        self.buffers = dict(buffers or {})
        self.layer_ops = layer_ops or {}
        self.outputs: dict[str, Array] = {}
        self.top_cache: dict[str, Array] = {}

    def uses(self, template: str) -> bool:
        return self.plan.uses(template)

    def __call__(self, name: str, x: Array) -> Array:
        plan = self.plan
        if self.layer is None:
            if name in plan.top:
                x = apply_intervention(x, plan.top[name])
            if name in plan.cache_top:
                self.top_cache[name] = x
            return x
        edges = plan.edges
        if edges is not None and name in _EDGE_INPUTS:
            correction = edges.correction(self.buffers[EDGE_OUTPUTS], edges.tables[_EDGE_INPUTS[name]][self.layer])
            x = x + (correction[:, :, 0] if name == "hook_mlp_in" else correction)
        if name in self.layer_ops:
            x = apply_intervention(x, self.layer_ops[name])
        elif name in plan.layer_ops:
            layers, stacked = plan.layer_ops[name]
            present, idx = _select_layer(layers, self.layer)
            iv = jax.tree.map(lambda a: a[idx], stacked)
            x = jnp.where(present, apply_intervention(x, iv), x)
        if name in plan.cache_layers:
            layers = plan.cache_layers[name]
            if plan.covers_all_layers(layers):
                self.outputs[name] = x
            else:
                buf = self.buffers[name]
                present, idx = _select_layer(layers, self.layer)
                keep = jax.lax.dynamic_index_in_dim(buf, idx, 0, keepdims=False)
                self.buffers[name] = jax.lax.dynamic_update_index_in_dim(
                    buf, jnp.where(present, x.astype(buf.dtype), keep), idx, 0)
        if edges is not None and name in _EDGE_OUTPUTS:
            rows = edges.tables[_EDGE_OUTPUTS[name]][self.layer]
            outputs = jnp.moveaxis(x, 2, 0) if name == "attn.hook_result" else x[None]
            self.buffers[EDGE_OUTPUTS] = self.buffers[EDGE_OUTPUTS].at[rows].set(outputs)
        return x
