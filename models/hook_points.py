"""The catalogue of hook points a configuration exposes, with TransformerLens names and shapes.

Names follow TransformerLens' classic scheme (`blocks.{l}.attn.hook_z`). Per-block points are
listed here as *templates* without the `blocks.{l}.` prefix; `full_names` expands them.
"""

from __future__ import annotations

import re

from jaxcirc.models.config import ModelConfig

Dims = tuple[str, ...]

_BLOCK_NAME = re.compile(r"^blocks\.(\d+)\.(.+)$")

# Points that change how the block computes (per-head inputs, per-head outputs); they exist only
# when a hook asks for them, because materialising them costs a head axis.
OPT_IN_TEMPLATES = ("hook_q_input", "hook_k_input", "hook_v_input", "attn.hook_result")

# Short names of the residual stream and what each sublayer writes to it, shared by the site
# tables of patching and attribution (each adds its own names for heads, neurons, q/k/v).
STREAM_SITES: dict[str, str] = {
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
}


def top_level_points(cfg: ModelConfig) -> dict[str, Dims]:
    """Hook points outside the blocks, name -> dims."""
    points: dict[str, Dims] = {}
    if cfg.embed_norm:  # BLOOM's norm after the embedding (TransformerLens' embed.ln)
        points["embed.ln.hook_scale"] = ("batch", "pos", "one")
        points["embed.ln.hook_normalized"] = ("batch", "pos", "d_model")
    points["hook_embed"] = ("batch", "pos", "d_model")
    if cfg.positional == "learned":
        points["hook_pos_embed"] = ("batch", "pos", "d_model")
    points["ln_final.hook_scale"] = ("batch", "pos", "one")
    points["ln_final.hook_normalized"] = ("batch", "pos", "d_model")
    return points


def block_points(cfg: ModelConfig) -> dict[str, Dims]:
    """Hook points of one block, template -> dims, in the order the block computes them."""
    resid = ("batch", "pos", "d_model")
    points: dict[str, Dims] = {
        "hook_resid_pre": resid,
        "hook_q_input": ("batch", "pos", "head", "d_model"),
        "hook_k_input": ("batch", "pos", "kv_head", "d_model"),
        "hook_v_input": ("batch", "pos", "kv_head", "d_model"),
        "ln1.hook_scale": ("batch", "pos", "one"),
        "ln1.hook_normalized": resid,
        "attn.hook_q": ("batch", "pos", "head", "d_head"),
        "attn.hook_k": ("batch", "pos", "kv_head", "d_head"),
        "attn.hook_v": ("batch", "pos", "kv_head", "d_head"),
    }
    if cfg.positional == "rotary":
        points["attn.hook_rot_q"] = ("batch", "pos", "head", "d_head")
        points["attn.hook_rot_k"] = ("batch", "pos", "kv_head", "d_head")
    points.update({
        "attn.hook_attn_scores": ("batch", "head", "q_pos", "k_pos"),
        "attn.hook_pattern": ("batch", "head", "q_pos", "k_pos"),
        "attn.hook_z": ("batch", "pos", "head", "d_head"),
        "attn.hook_result": ("batch", "pos", "head", "d_model"),
    })
    if cfg.post_norms:  # Gemma 2: the attention output is normalised before hook_attn_out
        points["ln1_post.hook_scale"] = ("batch", "pos", "one")
        points["ln1_post.hook_normalized"] = resid
    points["hook_attn_out"] = resid
    if not cfg.parallel_residual:
        points["hook_resid_mid"] = resid
    points.update({
        "hook_mlp_in": resid,
        "ln2.hook_scale": ("batch", "pos", "one"),
        "ln2.hook_normalized": resid,
        "mlp.hook_pre": ("batch", "pos", "d_mlp"),
    })
    if cfg.gated_mlp:
        points["mlp.hook_pre_linear"] = ("batch", "pos", "d_mlp")
    points.update({
        "mlp.hook_post": ("batch", "pos", "d_mlp"),
    })
    if cfg.post_norms:
        points["ln2_post.hook_scale"] = ("batch", "pos", "one")
        points["ln2_post.hook_normalized"] = resid
    points["hook_mlp_out"] = resid
    points["hook_resid_post"] = resid
    return points


def full_names(cfg: ModelConfig) -> list[str]:
    """Every hook point name of the model, in forward order."""
    top = top_level_points(cfg)
    embed = [n for n in top if not n.startswith("ln_final")]
    final = [n for n in top if n.startswith("ln_final")]
    blocks = [f"blocks.{l}.{t}" for l in range(cfg.n_layers) for t in block_points(cfg)]
    return embed + blocks + final


def dim_sizes(cfg: ModelConfig, batch: int, pos: int) -> dict[str, int]:
    return {
        "batch": batch, "pos": pos, "q_pos": pos, "k_pos": pos, "one": 1,
        "d_model": cfg.d_model, "head": cfg.n_heads, "kv_head": cfg.n_kv_heads,
        "d_head": cfg.d_head, "d_mlp": cfg.d_mlp,
    }


def split_name(name: str) -> tuple[int | None, str]:
    """`blocks.3.attn.hook_z` -> (3, "attn.hook_z"); `hook_embed` -> (None, "hook_embed")."""
    match = _BLOCK_NAME.match(name)
    if match:
        return int(match.group(1)), match.group(2)
    return None, name


def dims_of(cfg: ModelConfig, name: str) -> Dims:
    """Dims of a full hook name; raises KeyError for unknown names (see `check_name`)."""
    layer, template = split_name(name)
    if layer is None:
        return top_level_points(cfg)[name]
    return block_points(cfg)[template]
