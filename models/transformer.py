"""The whole decoder-only model and its pure functional boundary.

    forward = make_forward(cfg)
    logits, cache = forward(params, tokens, hooks)     # pure, jittable, vmappable, differentiable

`params` is a plain nested dict of arrays (blocks stacked on a leading layer axis); the blocks
run under `jax.lax.scan`, one block merged per step, so an L-layer model compiles one block.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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

    def run_blocks(self, x: Array, plan: HookPlan, position_ids: Array
                   ) -> tuple[Array, dict[str, Array], dict[str, Array]]:
        """Scan the stacked blocks over the residual [batch, pos, d_model]. Returns the residual,
        the scan-carried buffers (partial caches, running node outputs for edge patching) and the
        per-layer scan outputs (templates cached at every layer, stacked [layer, ...])."""
        cfg = self.cfg
        rope = rope_tables(cfg.rope, position_ids) if cfg.positional == "rotary" else None
        block_def, block_state = nnx.split(self.blocks)

        def step(carry, xs):
            resid, buffers = carry
            state, layer, layer_ops, window = xs
            hook = HookContext(plan, layer, buffers, layer_ops)
            resid = nnx.merge(block_def, state)(resid, hook, rope, position_ids, window)
            return (resid, hook.buffers), hook.outputs

        layers = jnp.arange(cfg.n_layers, dtype=jnp.int32)
        windows = None if cfg.layer_windows is None else jnp.asarray(cfg.layer_windows, jnp.int32)
        xs = (block_state, layers, plan.scanned_ops(), windows)
        (x, buffers), outputs = jax.lax.scan(step, (x, plan.init_buffers(x.dtype, x)), xs)
        return x, buffers, outputs

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

    def __call__(self, tokens: Array, hooks: Hooks, position_ids: Array | None = None,
                 logits_at: Array | None = None, logits_columns: Array | None = None) -> tuple[Array, dict[str, Array]]:
        batch, pos = tokens.shape
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(pos, dtype=jnp.int32), (batch, pos))
        plan = make_plan(self.cfg, hooks, batch, pos)
        top = HookContext(plan)
        x = self.embed(tokens, position_ids, top)
        x, buffers, outputs = self.run_blocks(x, plan, position_ids)
        if plan.edges is not None:
            x = x + plan.edges.logits_correction(buffers.pop(EDGE_OUTPUTS))
        x = self.ln_final(x, top, "ln_final")
        if logits_at is not None:
            x = x[jnp.arange(batch), logits_at]
        return self.unembed(x, logits_columns), plan.collect_cache(top.top_cache, buffers, outputs)


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
        if logits_columns is not None and logits_at is None:
            raise ValueError("logits_columns needs logits_at (one position per example).")
        return bind(cfg, params)(tokens, as_hooks(hooks), position_ids, logits_at, logits_columns)

    return jax.jit(forward) if jit else forward
