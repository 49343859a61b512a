"""The family table (one list: loader registry, `jaxcirc info`, README) and the hooks contract of
the GPT-J, BLOOM and Gemma 2 ports: the same TransformerLens hook points as every family, with the
residual stream adding up and each family's extra points holding what they say."""

from __future__ import annotations

import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import jaxcirc
import tiny_hf
from jaxcirc.attribution import _scores as qk_fix_scores
from jaxcirc.edge_patch import EdgeLayout
from jaxcirc.graph import Graph
from jaxcirc.models import families, hf
from jaxcirc.models.common import alibi_slopes

README = Path(__file__).resolve().parents[1] / "README.md"
NEW = ("gptj", "bloom", "gemma2")
TOKENS = tiny_hf.random_tokens(2, 12, seed=2)


# ----------------------------------------------------------------------------- the table


def test_table_is_the_loader_registry():
    """Every model_type the loader accepts is in the table, through the module the table names."""
    ports = hf.families()
    by_module: dict[str, set[str]] = {}
    for family in families.FAMILIES:
        by_module.setdefault(family.module, set()).update(family.model_types)
        for model_type in family.model_types:
            assert ports[model_type].__name__ == f"jaxcirc.models.{family.module}"
    for module, types in by_module.items():
        assert types == set(ports[next(iter(types))].MODEL_TYPES), module
    import transformers

    for config_cls, _, _ in tiny_hf.TINY.values():  # every parity-tested model_type has a row
        assert getattr(transformers, config_cls).model_type in ports


def test_readme_models_table_is_the_family_table():
    section = README.read_text().split("## Models", 1)[1].split("\n## ", 1)[0]
    assert families.markdown_table() in section, "README's model table differs from families.markdown_table()"


def test_parity_figures_are_within_the_bound():
    """Each figure is a measured number at or under the bound its test enforces."""
    for family in families.FAMILIES:
        figures = [float(x) for x in re.findall(r"\d+(?:\.\d+)?e-\d+", family.parity)]
        assert figures and all(f <= 1e-4 for f in figures), family


# ----------------------------------------------------------------------------- hooks contract


@pytest.fixture(scope="module")
def ported(tmp_path_factory):
    """name -> (jaxcirc Model, cache of every hook point on TOKENS): one compile per family."""
    out = {}
    for name in NEW:
        model = jaxcirc.load(tiny_hf.save(tiny_hf.make_model(name), tmp_path_factory.mktemp(name)))
        names = [n for n in model.hook_names() if not n.endswith(("_input",))]  # per-head inputs: edge mode
        _, cache = jaxcirc.run(model, TOKENS, cache=names)
        out[name] = (model, {k: np.asarray(v, np.float64) for k, v in cache.items()})
    return out


CLASSIC = ("hook_resid_pre", "ln1.hook_scale", "ln1.hook_normalized", "attn.hook_q", "attn.hook_k", "attn.hook_v",
           "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z", "attn.hook_result", "hook_attn_out",
           "hook_mlp_in", "ln2.hook_scale", "ln2.hook_normalized", "mlp.hook_pre", "mlp.hook_post",
           "hook_mlp_out", "hook_resid_post")


def close(a, b, atol=2e-5):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("name", NEW)
def test_hook_points_and_residual_stream(name, ported):
    model, c = ported[name]
    cfg = model.config
    for layer in range(cfg.n_layers):
        for template in CLASSIC:
            assert f"blocks.{layer}.{template}" in c, (name, template)
    assert "hook_embed" in c and "ln_final.hook_normalized" in c
    close(c["blocks.0.hook_resid_pre"], c["hook_embed"])
    for l in range(cfg.n_layers):
        b = lambda t: c[f"blocks.{l}.{t}"]  # noqa: E731
        if cfg.post_norms:  # Gemma 2: hook_attn_out / hook_mlp_out are the post-norms' outputs
            close(b("hook_attn_out"), b("ln1_post.hook_normalized"))
            close(b("hook_mlp_out"), b("ln2_post.hook_normalized"))
        else:
            b_o = model.params["blocks"]["attn"].get("b_O")
            close(b("hook_attn_out"), b("attn.hook_result").sum(2) + (0 if b_o is None else np.asarray(b_o[l])))
        if cfg.parallel_residual:
            assert f"blocks.{l}.hook_resid_mid" not in c
            close(b("hook_resid_post"), b("hook_resid_pre") + b("hook_attn_out") + b("hook_mlp_out"))
        else:
            close(b("hook_resid_mid"), b("hook_resid_pre") + b("hook_attn_out"))
            close(b("hook_resid_post"), b("hook_resid_mid") + b("hook_mlp_out"))
        if l + 1 < cfg.n_layers:
            close(c[f"blocks.{l + 1}.hook_resid_pre"], b("hook_resid_post"))


def test_gptj_mlp_reads_the_attention_norm(ported):
    model, c = ported["gptj"]
    assert "ln2" not in model.params["blocks"]
    close(c["blocks.1.ln2.hook_normalized"], c["blocks.1.ln1.hook_normalized"])


def test_bloom_embedding_norm_and_mlp_update(ported):
    """hook_embed is the normalised embedding; hook_mlp_out is the MLP's update alone (HF's BloomMLP
    adds the residual inside)."""
    model, c = ported["bloom"]
    close(c["hook_embed"], c["embed.ln.hook_normalized"])
    w_e = np.asarray(model.params["W_E"], np.float64)[TOKENS]
    assert np.abs(c["hook_embed"] - w_e).max() > 0.1
    mlp = model.params["blocks"]["mlp"]
    for l in range(model.config.n_layers):
        update = c[f"blocks.{l}.mlp.hook_post"] @ np.asarray(mlp["W_out"][l], np.float64) + np.asarray(mlp["b_out"][l])
        close(c[f"blocks.{l}.hook_mlp_out"], update, atol=1e-4)


def test_bloom_attn_scores_hold_relative_alibi(ported):
    """hook_attn_scores = q.k / sqrt(d_head) + slope_h * (j - i) on and below the diagonal."""
    model, c = ported["bloom"]
    cfg = model.config
    q, k = c["blocks.0.attn.hook_q"], c["blocks.0.attn.hook_k"]
    content = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(cfg.d_head)
    pos = TOKENS.shape[1]
    relative = np.arange(pos)[None, :] - np.arange(pos)[:, None]
    expected = content + alibi_slopes(cfg.n_heads)[None, :, None, None] * relative
    causal = np.tril(np.ones((pos, pos), bool))
    close(c["blocks.0.attn.hook_attn_scores"][..., causal], expected[..., causal], atol=1e-4)


def test_gemma2_embedding_scale_and_windows(ported):
    model, c = ported["gemma2"]
    cfg = model.config
    w_e = np.asarray(model.params["W_E"], np.float32)[TOKENS]
    close(c["hook_embed"], w_e * np.float32(np.sqrt(cfg.d_model)))
    window = max(cfg.layer_windows)
    for l, w in enumerate(cfg.layer_windows):
        pattern = c[f"blocks.{l}.attn.hook_pattern"]
        far = np.tril(np.ones(pattern.shape[-2:], bool), -window)  # keys at distance >= window
        assert (pattern[..., far].max() == 0) == (w > 0), l


@pytest.mark.parametrize("name", NEW)
def test_qk_fix_recomputes_the_models_scores(name, ported):
    """AtP*'s QK-fix rebuilds the attention scores from q and k: it must reproduce hook_attn_scores
    (scale, soft cap, ALiBi, sliding windows) and mask the same entries."""
    model, c = ported[name]
    cfg = model.config
    rot = "hook_rot" if cfg.positional == "rotary" else "hook"
    stack = lambda t: jnp.stack([c[f"blocks.{l}.attn.{t}"] for l in range(cfg.n_layers)])  # noqa: E731
    k = jnp.repeat(stack(f"{rot}_k"), cfg.group_size, axis=3)
    ours = np.asarray(qk_fix_scores(cfg, stack(f"{rot}_q"), k))
    model_scores = np.asarray(stack("hook_attn_scores"))
    masked = model_scores == np.finfo(np.float32).min
    np.testing.assert_array_equal(np.isinf(ours), masked)
    close(ours[~masked], model_scores[~masked], atol=1e-4)


@pytest.mark.parametrize("name", ["gptj", "bloom"])
def test_edge_patching_all_edges_is_the_corrupted_run(name, ported):
    """The residual is the sum of node outputs also with GPT-J's shared norm (the MLP re-reads the
    patched hook_mlp_in through ln1's weights) and BLOOM's embedding norm (the input node is the
    normalised hook_embed): patching every edge from a corrupted run gives its logits."""
    from jaxcirc.edge_patch import EdgePatch, node_output_cache_names, node_outputs
    from jaxcirc.hooks import Hooks

    model = ported[name][0]
    cfg, forward, params = model.config, model.forward, model.params
    clean, corrupt = TOKENS[:, :6], (TOKENS[:, :6] + 5) % tiny_hf.VOCAB
    layout = EdgeLayout.canonical(cfg)
    names = node_output_cache_names(cfg)
    clean_logits, _ = forward(params, clean, Hooks(cache=names))
    corrupt_logits, corrupt_cache = forward(params, corrupt, Hooks(cache=names))
    source = node_outputs(cfg, corrupt_cache, layout)
    every, _ = forward(params, clean, Hooks(edges=EdgePatch(jnp.ones((layout.n_src, layout.n_dst)), source, layout)))
    assert np.abs(np.asarray(corrupt_logits) - np.asarray(clean_logits)).max() > 0.1
    np.testing.assert_allclose(every, corrupt_logits, atol=5e-5)


def test_edge_patching_refuses_post_norms(ported):
    """Gemma 2's post-attention norm mixes heads, so the residual is not a sum of head outputs."""
    cfg = ported["gemma2"][0].config
    for build in (EdgeLayout.canonical, Graph.from_config):
        with pytest.raises(ValueError, match="post-norms"):
            build(cfg)
    for name in ("gptj", "bloom"):
        EdgeLayout.canonical(ported[name][0].config)


def test_info_describes_the_new_mechanisms(ported):
    from jaxcirc.cli import describe_attention, describe_positional

    gemma = describe_attention(ported["gemma2"][0].config)
    assert "sliding window 8 on layers 0, 2" in gemma and "logit soft cap 3" in gemma and "final logit soft cap 5" in gemma
    assert "interleaved pairs" in describe_positional(ported["gptj"][0].config)
    assert describe_positional(ported["bloom"][0].config) == "alibi"


def test_position_analyses_read_gptj_and_gemma2_logits(ported):
    """GPT-J's interleaved rotary pairs (2l, 2l + 1), Gemma 2's query scale and soft cap: the
    position analyses' logits are the model's attention scores, also when rebuilt from pre-RoPE
    q/k at the relative distance alone."""
    from jaxcirc.attention_logits import cache_qk, expand_kv, logits_at_distance, logits_from_qk

    for name in ("gptj", "gemma2"):
        model = ported[name][0]
        cfg = model.config
        tokens = jnp.asarray([[3, 7, 1, 9, 4, 2, 8, 5]]) % cfg.d_vocab
        names = tuple(f"blocks.{l}.attn.hook_attn_scores" for l in range(cfg.n_layers))
        _, cache = model.forward(model.params, tokens, jaxcirc.Hooks(cache=names))
        scores = np.stack([cache[n] for n in names])  # [layer, batch, head, q, k]
        qk = cache_qk(model, tokens)
        kept = scores > -1e30  # causal and, for Gemma 2's sliding layers, inside the window
        np.testing.assert_allclose(np.asarray(logits_from_qk(qk.rot_q, qk.rot_k, cfg=cfg))[kept], scores[kept],
                                   rtol=1e-5, atol=1e-5, err_msg=name)
        i, j = np.arange(8)[:, None], np.arange(8)[None, :]
        q = qk.q[:, :, :, None]  # [layer, batch, q, 1, head, d]
        k = expand_kv(qk.k, cfg.n_heads)[:, :, None]  # [layer, batch, 1, k, head, d]
        rebuilt = jnp.moveaxis(logits_at_distance(q, k, (i - j)[None, None, :, :, None], cfg), -1, 2)
        np.testing.assert_allclose(np.asarray(rebuilt)[kept], scores[kept], rtol=1e-4, atol=1e-4, err_msg=name)