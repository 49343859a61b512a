"""The whole decoder-only model and its pure functional boundary.

    forward = make_forward(cfg)
    logits, cache = forward(params, tokens, hooks)     # pure, jittable, vmappable, differentiable

    joint = make_joint_forward(cfg)                    # independent runs sharing one layer scan
    (logits_a, cache_a), (logits_b, cache_b) = joint(params, [Run(tokens_a, hooks_a), Run(tokens_b)])

`params` is a plain nested dict of arrays (blocks stacked on a leading layer axis); the blocks
run under `jax.lax.scan`, one block merged per step, so an L-layer model compiles one block.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcirc.hook_plan import EDGE_OUTPUTS, HookContext, HookPlan, make_plan
from jaxcirc.hooks import Hooks, as_hooks
from jaxcirc.models.common import Block, Norm, rope_tables
from jaxcirc.models.config import ModelConfig

Array = jax.Array
Params = dict[str, Any]


class Run(NamedTuple):
    """One forward of a joint forward (`make_joint_forward`): tokens [batch, pos] int32 and its
    hooks, with `make_forward`'s keyword options."""

    tokens: Array
    hooks: Hooks | None = None
    position_ids: Array | None = None
    logits_at: Array | None = None
    logits_columns: Array | None = None


class Transformer(nnx.Module):
    """Embedding, scanned blocks, final norm and unembedding."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype = jnp.dtype(cfg.dtype)
        self.W_E = nnx.Param(cfg.initializer_range * jax.random.normal(rngs.params(), (cfg.d_vocab, cfg.d_model), dtype))
        if cfg.positional == "learned":
            self.W_pos = nnx.Param(cfg.initializer_range * jax.random.normal(rngs.params(), (cfg.n_ctx, cfg.d_model), dtype))
        if cfg.embed_norm:
            self.ln_embed = Norm(cfg)

        @nnx.split_rngs(splits=cfg.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(cfg, rngs)

        self.blocks = make_blocks(rngs)
        self.ln_final = Norm(cfg)
        if not cfg.tied_embeddings:
            self.W_U = nnx.Param(cfg.initializer_range * jax.random.normal(rngs.params(), (cfg.d_model, cfg.d_vocab), dtype))
        if cfg.unembed_bias:
            self.b_U = nnx.Param(jnp.zeros((cfg.d_vocab,), dtype))

    def embed(self, tokens: Array, position_ids: Array, top: HookContext) -> Array:
        """tokens [batch, pos] -> residual [batch, pos, d_model] (hook_embed, hook_pos_embed).

        hook_embed is what enters the residual stream from the token: scaled by
        `cfg.embed_scale` (Gemma) or normalised by `ln_embed` (BLOOM, hooks embed.ln.*)."""
        cfg = self.cfg
        x = jnp.take(self.W_E[...], tokens, axis=0)
        if cfg.embed_scale != 1.0:
            # In the model dtype, as HF does (sqrt(d_model) rounded to bf16 in a bf16 model).
            x = x * jnp.asarray(cfg.embed_scale, x.dtype)
        if cfg.embed_norm:
            x = self.ln_embed(x, top, "embed.ln")
        x = top("hook_embed", x)
        if self.cfg.positional == "learned":
            x = x + top("hook_pos_embed", jnp.take(self.W_pos[...], position_ids, axis=0))
        return x

    def run_blocks(self, streams: Sequence[tuple[Array, HookPlan, Array]]
                   ) -> list[tuple[Array, dict[str, Array], dict[str, Array]]]:
        """Scan the stacked blocks over one or more independent residual streams, each (residual
        [batch, pos, d_model], its hook plan, position ids [batch, pos]). Every step reads its
        layer's weights once for all of them. Returns per stream the residual, the scan-carried
        buffers (partial caches, running node outputs for edge patching) and the per-layer scan
        outputs (templates cached at every layer, stacked [layer, ...])."""
        cfg = self.cfg
        ropes = [rope_tables(cfg.rope, ids) if cfg.positional == "rotary" else None for _, _, ids in streams]
        block_def, block_state = nnx.split(self.blocks)

        def step(carry, xs):
            state, layer, stream_ops, window = xs
            block = nnx.merge(block_def, state)
            carried, outputs = [], []
            for (resid, buffers), (_, plan, ids), rope, layer_ops in zip(carry, streams, ropes, stream_ops):
                hook = HookContext(plan, layer, buffers, layer_ops)
                carried.append((block(resid, hook, rope, ids, window), hook.buffers))
                outputs.append(hook.outputs)
            return carried, outputs

        layers = jnp.arange(cfg.n_layers, dtype=jnp.int32)
        windows = None if cfg.layer_windows is None else jnp.asarray(cfg.layer_windows, jnp.int32)
        xs = (block_state, layers, [plan.scanned_ops() for _, plan, _ in streams], windows)
        init = [(x, plan.init_buffers(x.dtype, x)) for x, plan, _ in streams]
        carried, outputs = jax.lax.scan(step, init, xs)
        return [(x, buffers, out) for (x, buffers), out in zip(carried, outputs)]

    def unembed(self, x: Array, columns: Array | None = None) -> Array:
        """Residual after the final norm [..., d_model] -> logits [..., d_vocab]; with token ids
        `columns` [batch, k] (x [batch, d_model]) only those logits of each row: [batch, k]."""
        if columns is not None:  # the rows of the unembedding that the metric reads, not all d_vocab
            w = jnp.take(self.W_E[...], columns, axis=0) if self.cfg.tied_embeddings else jnp.moveaxis(
                jnp.take(self.W_U[...], columns, axis=1), 0, -1)
            logits = jnp.einsum("bd,bkd->bk", x, w)
        else:
            logits = x @ (self.W_E[...].T if self.cfg.tied_embeddings else self.W_U[...])
        if self.cfg.unembed_bias:
            logits = logits + (self.b_U[...] if columns is None else jnp.take(self.b_U[...], columns))
        if self.cfg.final_softcap is not None:  # Gemma 2: cap * tanh(logits / cap)
            logits = self.cfg.final_softcap * jnp.tanh(logits / self.cfg.final_softcap)
        return logits

    def __call__(self, runs: Sequence[Run]) -> list[tuple[Array, dict[str, Array]]]:
        """(logits, cache) of each run; the runs share the layer scan (`run_blocks`)."""
        if not runs:
            raise ValueError("A joint forward needs at least one Run(tokens, hooks, ...).")
        streams, tops = [], []
        for run in runs:
            if run.logits_columns is not None and run.logits_at is None:
                raise ValueError("logits_columns needs logits_at (one position per example).")
            batch, pos = run.tokens.shape
            ids = run.position_ids
            if ids is None:
                ids = jnp.broadcast_to(jnp.arange(pos, dtype=jnp.int32), (batch, pos))
            plan = make_plan(self.cfg, as_hooks(run.hooks), batch, pos)
            top = HookContext(plan)
            streams.append((self.embed(run.tokens, ids, top), plan, ids))
            tops.append(top)
        results = []
        for run, (_, plan, _), top, (x, buffers, outputs) in zip(runs, streams, tops, self.run_blocks(streams)):
            if plan.edges is not None:
                x = x + plan.edges.logits_correction(buffers.pop(EDGE_OUTPUTS))
            x = self.ln_final(x, top, "ln_final")
            if run.logits_at is not None:
                x = x[jnp.arange(x.shape[0]), run.logits_at]
            results.append((self.unembed(x, run.logits_columns), plan.collect_cache(top.top_cache, buffers, outputs)))
        return results


def abstract_model(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph definition and the shapes/dtypes of every parameter, without allocating them."""
    return nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))


def init_params(cfg: ModelConfig, seed: int = 0) -> Params:
    """Randomly initialised parameters: weights normal(0, cfg.initializer_range), norm scales 1,
    biases 0. Built in one compiled program (constructing the NNX modules eagerly would compile
    one small program per parameter shape)."""
    shapes = param_shapes(cfg)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)

    sizes = [int(np.prod(leaf.shape)) for _, leaf in leaves]

    @jax.jit
    def build(key: Array) -> list[Array]:
        # One draw for every weight: a random op per shape would compile (slowly) once per shape.
        normal = cfg.initializer_range * jax.random.normal(key, (sum(sizes),), jnp.float32)
        arrays, offset = [], 0
        for (path, leaf), size in zip(leaves, sizes):
            name = str(path[-1].key)
            if name == "w":  # norm scale: offset + w = 1
                arrays.append(jnp.full(leaf.shape, 1.0 - cfg.norm_offset, leaf.dtype))
            elif name.startswith("b"):
                arrays.append(jnp.zeros(leaf.shape, leaf.dtype))
            else:
                arrays.append(normal[offset:offset + size].reshape(leaf.shape).astype(leaf.dtype))
            offset += size
        return arrays

    return jax.tree_util.tree_unflatten(treedef, build(jax.random.key(seed)))


def param_shapes(cfg: ModelConfig) -> Params:
    """The parameter tree's structure with ShapeDtypeStructs as leaves."""
    return nnx.to_pure_dict(abstract_model(cfg)[1])


def bind(cfg: ModelConfig, params: Params) -> Transformer:
    """The NNX module holding `params` (use inside a traced function)."""
    graphdef, state = abstract_model(cfg)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def make_forward(cfg: ModelConfig, jit: bool = True) -> Callable[..., tuple[Array, dict[str, Array]]]:
    """The pure forward of `cfg`: (params, tokens [batch, pos] int32, hooks) -> (logits, cache).

    Keyword options: `position_ids` [batch, pos] (default 0..pos-1), `logits_at` [batch] to
    unembed only one position per example (logits then [batch, d_vocab]) and, with it,
    `logits_columns` [batch, k] to unembed only those token ids (logits [batch, k]).
    """

    def forward(params: Params, tokens: Array, hooks: Hooks | None = None, *,
                position_ids: Array | None = None, logits_at: Array | None = None,
                logits_columns: Array | None = None):
        return bind(cfg, params)([Run(tokens, hooks, position_ids, logits_at, logits_columns)])[0]

    return jax.jit(forward) if jit else forward


def make_joint_forward(cfg: ModelConfig, jit: bool = True
                       ) -> Callable[[Params, Sequence[Run]], list[tuple[Array, dict[str, Array]]]]:
    """Several independent forwards in one layer scan: (params, [Run, ...]) -> [(logits, cache), ...],
    each as `make_forward` would return it. Each layer's weights are read once for all the runs,
    which on CPU copies them out of the stacked parameters once instead of once per run; under
    `jax.grad` a run the differentiated inputs do not reach is computed in the forward scan only.
    Runs may differ in batch, length and hooks."""

    def joint(params: Params, runs: Sequence[Run]):
        return bind(cfg, params)([Run(*run) for run in runs])

    return jax.jit(joint) if jit else joint
