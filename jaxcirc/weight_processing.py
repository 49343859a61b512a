"""TransformerLens-style weight processing: fold norms into the maps that read them, center the
weights that write to the residual stream and the unembedding, fold value biases into b_O.

    model = jaxcirc.load(path, fold_ln=True, center_writing_weights=True,
                         center_unembed=True, fold_value_biases=True)
    model = jaxcirc.process_weights(model, fold_ln=True)          # an already-loaded model

Each step is a pure `(cfg, params) -> (cfg, params)` map that leaves the log-softmax unchanged
(exactly in real arithmetic; to float rounding here) and appends its name to
`cfg.weight_processing`, so a processed model says what was done to it. Activations inside the
model change as TransformerLens' do: after `fold_ln`, `ln*.hook_normalized` is the plain
normalised residual; after `fold_value_biases`, `hook_v`/`hook_z` have no bias. Arithmetic is in
float32, the result is cast back to each parameter's dtype.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import jax
import jax.numpy as jnp

from jaxcirc.models.config import ModelConfig

Array = jax.Array
Params = dict[str, Any]

# In the order they are applied (TransformerLens' order).
OPTIONS = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases")

# Every ModelConfig switch this module has been checked against. A switch added later (a new
# family) makes processing refuse until someone checks what folding means for it.
_KNOWN_FIELDS = frozenset({
    "family", "n_layers", "d_model", "n_heads", "d_head", "d_mlp", "d_vocab", "n_ctx", "n_kv_heads",
    "norm", "norm_eps", "activation", "gated_mlp", "parallel_residual", "positional", "rope",
    "tied_embeddings", "qkv_bias", "o_bias", "mlp_bias", "unembed_bias", "shared_norm", "embed_norm",
    "embed_scale", "norm_offset", "post_norms", "query_scale", "attn_softcap", "final_softcap", "dtype",
    "initializer_range", "layer_windows", "attention_window", "weight_processing",
})
_TOP_KEYS = frozenset({"W_E", "W_pos", "ln_embed", "blocks", "ln_final", "W_U", "b_U"})
_BLOCK_KEYS = frozenset({"ln1", "attn", "ln2", "mlp", "ln1_post", "ln2_post"})


def _check(cfg: ModelConfig, params: Params, step: str) -> None:
    """Refuse configs and parameter trees this module does not know to process exactly."""
    for field in dataclasses.fields(ModelConfig):
        if field.name in _KNOWN_FIELDS:
            continue
        default = field.default if field.default is not dataclasses.MISSING else None
        if getattr(cfg, field.name) != default:
            raise ValueError(
                f"{step}: this model sets {field.name}={getattr(cfg, field.name)!r}, a switch "
                "jaxcirc.weight_processing has not been checked against, so it cannot promise the "
                "processed model computes the same function. Load it without weight processing.")
    unknown = sorted(set(params) - _TOP_KEYS) + sorted(f"blocks.{k}" for k in set(params["blocks"]) - _BLOCK_KEYS)
    if unknown:
        raise ValueError(f"{step}: parameters {unknown} are not ones weight processing knows how to "
                         "transform exactly. Load this model without weight processing.")


def _f32(x: Array) -> Array:
    return jnp.asarray(x, jnp.float32)


def _record(cfg: ModelConfig, step: str, **changes: Any) -> ModelConfig:
    done = cfg.weight_processing if step in cfg.weight_processing else cfg.weight_processing + (step,)
    return cfg.replace(weight_processing=done, **changes)


def _untied(cfg: ModelConfig, params: Params) -> tuple[ModelConfig, Params]:
    """Give a tied model its own W_U (= W_E^T), so the embedding and unembedding can change apart."""
    if not cfg.tied_embeddings:
        return cfg, params
    return cfg.replace(tied_embeddings=False), {**params, "W_U": jnp.asarray(params["W_E"]).T}


def _fold_into(W: Array, bias: Array | None, scale: Array, shift: Array | None, center: bool
               ) -> tuple[Array, Array | None]:
    """Fold a norm's `scale` [*lead, d] and `shift` [*lead, d] into the linear map it feeds.

    W is [*lead, d, *out], bias [*lead, *out] or None: (n * scale + shift) @ W + bias equals
    n @ W' + bias' with W' = scale * W and bias' = bias + shift @ W. `center` also removes W''s
    mean over d, which a LayerNorm's output n (mean zero over d) cannot see.
    """
    d_axis = scale.ndim - 1
    expand = (1,) * (W.ndim - scale.ndim)
    Wf = _f32(W)
    folded = Wf * scale.reshape(scale.shape + expand)
    new_bias = None if bias is None else _f32(bias)
    if shift is not None:
        moved = (shift.reshape(shift.shape + expand) * Wf).sum(axis=d_axis)
        new_bias = moved if new_bias is None else new_bias + moved
    if center:
        folded = folded - folded.mean(axis=d_axis, keepdims=True)
    return folded.astype(W.dtype), None if new_bias is None else new_bias.astype(W.dtype)


def fold_layer_norm(cfg: ModelConfig, params: Params) -> tuple[ModelConfig, Params]:
    """Fold every pre-norm's weight (and LayerNorm bias) into the maps reading it: ln1 into
    W_Q/W_K/W_V (+ biases), ln2 into W_in/W_gate (+ biases), ln_final into W_U (+ b_U). The norms
    are left with w = 1 (scale = 1 with Gemma's offset) and b = 0, an exact identity, so the
    forward computes the plain normalisation. For LayerNorm the folded input weights are also
    centred over d_model. Creates the q/k/v, MLP or unembedding biases a LayerNorm bias needs and
    unties a tied unembedding. BLOOM's embedding norm writes to the residual stream and is kept.
    """
    _check(cfg, params, "fold_ln")
    if cfg.post_norms:
        raise ValueError(
            "fold_ln: this model normalises the attention and MLP outputs (post-norms, as Gemma 2 "
            "does); those norms sit between W_O / W_out and the residual stream and cannot be folded "
            "into any weight exactly. Load it without fold_ln.")
    layernorm = cfg.norm == "layernorm"
    blocks = params["blocks"]
    ln1 = blocks["ln1"]
    ln2 = ln1 if cfg.shared_norm else blocks["ln2"]

    def scale(norm: dict) -> Array:
        return _f32(norm["w"]) + cfg.norm_offset

    def shift(norm: dict) -> Array | None:
        return _f32(norm["b"]) if "b" in norm else None

    attn, mlp = dict(blocks["attn"]), dict(blocks["mlp"])
    for w_name in ("W_Q", "W_K", "W_V"):
        b_name = "b_" + w_name[-1]
        attn[w_name], bias = _fold_into(attn[w_name], attn.get(b_name), scale(ln1), shift(ln1), layernorm)
        if bias is not None:
            attn[b_name] = bias
    mlp_inputs = ("W_in", "W_gate") if cfg.gated_mlp else ("W_in",)
    for w_name in mlp_inputs:
        b_name = "b_" + w_name[2:]
        mlp[w_name], bias = _fold_into(mlp[w_name], mlp.get(b_name), scale(ln2), shift(ln2), layernorm)
        if bias is not None:
            mlp[b_name] = bias
    if "b_in" in mlp and "b_out" not in mlp:  # the config's mlp_bias switch covers all three
        mlp["b_out"] = jnp.zeros(mlp["W_out"].shape[:-2] + mlp["W_out"].shape[-1:], mlp["W_out"].dtype)

    cfg, params = _untied(cfg, params)
    final = params["ln_final"]
    W_U, b_U = _fold_into(params["W_U"], params.get("b_U"), scale(final), shift(final), layernorm)

    def identity(norm: dict) -> dict:
        out = {"w": jnp.full_like(norm["w"], 1.0 - cfg.norm_offset)}
        if "b" in norm:
            out["b"] = jnp.zeros_like(norm["b"])
        return out

    new_blocks = {**blocks, "attn": attn, "mlp": mlp, "ln1": identity(ln1)}
    if not cfg.shared_norm:
        new_blocks["ln2"] = identity(ln2)
    new = {**params, "blocks": new_blocks, "ln_final": identity(final), "W_U": W_U}
    if b_U is not None:
        new["b_U"] = b_U
    cfg = _record(cfg, "fold_ln", qkv_bias="b_Q" in attn, mlp_bias="b_in" in mlp, unembed_bias="b_U" in new)
    return cfg, new


def _centered(x: Array) -> Array:
    """x minus its mean over the last axis (d_model for writers, vocab for the unembedding)."""
    xf = _f32(x)
    return (xf - xf.mean(axis=-1, keepdims=True)).astype(x.dtype)


def center_writing_weights(cfg: ModelConfig, params: Params) -> tuple[ModelConfig, Params]:
    """Remove the mean over d_model from everything that writes to the residual stream: W_E,
    W_pos, W_O, b_O, W_out, b_out. Exact because every reader of the residual stream is a
    LayerNorm, which subtracts that mean anyway; so refused for RMSNorm models. A tied
    unembedding is untied first (it reads W_E)."""
    _check(cfg, params, "center_writing_weights")
    if cfg.norm != "layernorm":
        raise ValueError(
            f"center_writing_weights: this model uses {cfg.norm}, which does not subtract the mean, so "
            "centring what writes to the residual stream would change its outputs. It is exact only "
            "for LayerNorm models (GPT-2, Pythia, GPT-J, BLOOM); use fold_ln, center_unembed and "
            "fold_value_biases here.")
    if cfg.embed_norm:
        raise ValueError(
            "center_writing_weights: this model's embedding goes through a norm (BLOOM's ln_embed) "
            "before it enters the residual stream, and that norm's output cannot be centred by "
            "changing weights. Load it without center_writing_weights.")
    cfg, params = _untied(cfg, params)
    blocks = params["blocks"]
    attn, mlp = dict(blocks["attn"]), dict(blocks["mlp"])
    for group, names in ((attn, ("W_O", "b_O")), (mlp, ("W_out", "b_out"))):
        for name in names:
            if name in group:
                group[name] = _centered(group[name])
    new = {**params, "W_E": _centered(params["W_E"]), "blocks": {**blocks, "attn": attn, "mlp": mlp}}
    if "W_pos" in params:
        new["W_pos"] = _centered(params["W_pos"])
    return _record(cfg, "center_writing_weights"), new


def center_unembed(cfg: ModelConfig, params: Params) -> tuple[ModelConfig, Params]:
    """Remove from W_U [d_model, vocab] its mean over the vocabulary (and from b_U its mean): every
    logit of a position moves by the same amount, so the log-softmax is unchanged. Unties a tied
    unembedding. Refused with a final logit soft-cap, which is not shift-invariant."""
    _check(cfg, params, "center_unembed")
    if cfg.final_softcap is not None:
        raise ValueError(
            f"center_unembed: this model soft-caps its logits (cap * tanh(logits / cap), cap "
            f"{cfg.final_softcap}), which does not commute with shifting them. Load it without center_unembed.")
    cfg, params = _untied(cfg, params)
    new = {**params, "W_U": _centered(params["W_U"])}
    if "b_U" in params:
        new["b_U"] = _centered(params["b_U"])
    return _record(cfg, "center_unembed"), new


def fold_value_biases(cfg: ModelConfig, params: Params) -> tuple[ModelConfig, Params]:
    """Move b_V into b_O: each attention pattern row sums to one, so the bias every value carries
    reaches the output as b_V @ W_O whatever the pattern. Grouped-query b_V [layer, kv_head, d_head]
    is repeated to the query heads that read it; b_O is created (o_bias) when the model has none.
    Afterwards b_V = 0, so hook_v and hook_z are bias-free."""
    _check(cfg, params, "fold_value_biases")
    attn = dict(params["blocks"]["attn"])
    if "b_V" not in attn:  # nothing to fold
        return _record(cfg, "fold_value_biases"), params
    b_V = _f32(attn["b_V"])  # [layer, kv_head, d_head]
    per_head = jnp.repeat(b_V, cfg.group_size, axis=-2)  # query head n*g + i reads kv head n
    W_O = attn["W_O"]  # [layer, head, d_head, d_model]
    moved = jnp.einsum("lhk,lhkd->ld", per_head, _f32(W_O))
    attn["b_O"] = (moved if "b_O" not in attn else _f32(attn["b_O"]) + moved).astype(W_O.dtype)
    attn["b_V"] = jnp.zeros_like(attn["b_V"])
    new = {**params, "blocks": {**params["blocks"], "attn": attn}}
    return _record(cfg, "fold_value_biases", o_bias=True), new


_STEPS = {"fold_ln": fold_layer_norm, "center_writing_weights": center_writing_weights,
          "center_unembed": center_unembed, "fold_value_biases": fold_value_biases}


def process(cfg: ModelConfig, params: Params, *, fold_ln: bool = False, center_writing_weights: bool = False,
            center_unembed: bool = False, fold_value_biases: bool = False) -> tuple[ModelConfig, Params]:
    """Apply the chosen steps in TransformerLens' order (fold_ln, center_writing_weights,
    center_unembed, fold_value_biases). Pure; traceable (jit it with cfg closed over)."""
    chosen = {"fold_ln": fold_ln, "center_writing_weights": center_writing_weights,
              "center_unembed": center_unembed, "fold_value_biases": fold_value_biases}
    for name in OPTIONS:
        if chosen[name]:
            cfg, params = _STEPS[name](cfg, params)
    return cfg, params


def _mesh_of(params: Params):
    """The mesh the params are laid out on, if they are NamedSharding-placed arrays."""
    for leaf in jax.tree.leaves(params):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding):
            return sharding.mesh
    return None


def process_params(cfg: ModelConfig, params: Params, *, donate: bool = False, mesh=None,
                   **options: bool) -> tuple[ModelConfig, Params]:
    """`process` as one compiled program. On a mesh (given, or the one the params are on) the
    results are laid out by `jaxcirc.sharding.param_partition_specs` again. `donate` lets the
    outputs reuse the inputs' memory (the inputs are then deleted)."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TypeError(f"Unknown weight processing options {unknown}; known: {list(OPTIONS)}.")
    if not any(options.values()):
        return cfg, params
    # The config is worked out while tracing: a pure function of cfg and the options.
    new_cfg: dict[str, ModelConfig] = {}

    def arrays(p: Params) -> Params:
        new_cfg["cfg"], out = process(cfg, p, **options)
        return out

    shapes = jax.eval_shape(arrays, params)
    mesh = mesh if mesh is not None else _mesh_of(params)
    out_shardings = None
    if mesh is not None:
        from jaxcirc.sharding import param_partition_specs

        specs = param_partition_specs(new_cfg["cfg"], shapes, mesh)
        out_shardings = jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s), specs)
    program = jax.jit(arrays, out_shardings=out_shardings, donate_argnums=(0,) if donate else ())
    with warnings.catch_warnings():
        # Buffers whose shape changes (a weight that gains a bias) cannot be reused; that is fine.
        warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
        out = program(params)
    return new_cfg["cfg"], out


def process_weights(model, *, fold_ln: bool = False, center_writing_weights: bool = False,
                    center_unembed: bool = False, fold_value_biases: bool = False):
    """A processed copy of a loaded `jaxcirc.Model` (its own params; the original is untouched).
    The steps done are in `model.config.weight_processing`."""
    cfg, params = process_params(model.config, model.params, fold_ln=fold_ln,
                                 center_writing_weights=center_writing_weights,
                                 center_unembed=center_unembed, fold_value_biases=fold_value_biases)
    if cfg is model.config:
        return model
    return dataclasses.replace(model, config=cfg, params=params, forward=None)
