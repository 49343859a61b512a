"""Logit lens: every layer's residual decoded through the final norm + unembedding, checked against a
numpy hand computation (RMSNorm and LayerNorm families, untied/tied heads, unembedding bias,
parallel residual), and the rank / reciprocal-rank / probability definitions."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxcirc import Hooks, ModelConfig, RopeConfig, replace
from jaxcirc.logit_lens import SITES, chunk_indices, decode, logit_lens, pad_prompts, rank_figure, token_stats, top_k_table
from jaxcirc.model import Model
from tiny_models import random_params

LLAMA = ModelConfig(family="llama", n_layers=3, d_model=32, n_heads=4, n_kv_heads=2, d_head=8, d_mlp=64,
                    d_vocab=50, n_ctx=64, norm="rmsnorm", activation="silu", gated_mlp=True,
                    positional="rotary", rope=RopeConfig(theta=10000.0, rotary_dim=8), tied_embeddings=False,
                    initializer_range=0.3)
GPT2 = ModelConfig(family="gpt2", n_layers=2, d_model=24, n_heads=3, d_head=8, d_mlp=96, d_vocab=50, n_ctx=32,
                   qkv_bias=True, o_bias=True, mlp_bias=True, unembed_bias=True, initializer_range=0.3)
PYTHIA = ModelConfig(family="gpt_neox", n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, d_vocab=50,
                     n_ctx=32, norm="layernorm", activation="gelu", parallel_residual=True, positional="rotary",
                     rope=RopeConfig(rotary_dim=2), tied_embeddings=False, qkv_bias=True, o_bias=True,
                     mlp_bias=True, initializer_range=0.3)
ROWS = [[3, 14, 15, 9, 2, 6, 5], [35, 8, 9], [7, 9, 3, 2, 38]]  # different lengths: right padding


def hand_decode(cfg: ModelConfig, params: dict, resid: np.ndarray) -> np.ndarray:
    """numpy final norm + unembedding (float64), written from the definitions."""
    x = np.asarray(resid, np.float64)
    if cfg.norm == "layernorm":
        x = x - x.mean(-1, keepdims=True)
    x = x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg.norm_eps) * np.asarray(params["ln_final"]["w"])
    if cfg.norm == "layernorm":
        x = x + np.asarray(params["ln_final"]["b"])
    w = np.asarray(params["W_E"], np.float64).T if cfg.tied_embeddings else np.asarray(params["W_U"], np.float64)
    logits = x @ w
    return logits + np.asarray(params["b_U"]) if cfg.unembed_bias else logits


def hand_stats(logits: np.ndarray, ids: np.ndarray):
    """rank = #tokens with a strictly larger logit; rr = 1/(rank+1); prob = softmax."""
    chosen = np.take_along_axis(logits, ids, -1)
    rank = (logits[..., None, :] > chosen[..., None]).sum(-1)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return rank, 1.0 / (rank + 1.0), np.take_along_axis(p, ids, -1)


IDS = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
CONFIGS = {"llama": LLAMA, "gpt2": GPT2, "pythia": PYTHIA}


@pytest.fixture(scope="module")
def cases():
    """Per family: the model, its lens of ROWS (all sites, top 4) and a plain cached forward.
    Built once, so each family compiles the lens program once for all tests."""
    out = {}
    for name, cfg in CONFIGS.items():
        model = Model(cfg, random_params(cfg, 3))
        tokens, read_pos = pad_prompts(ROWS)
        names = ("hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out") + (
            () if cfg.parallel_residual else ("hook_resid_mid",))
        logits, cache = model.forward(model.params, jnp.asarray(tokens), Hooks(cache=tuple(f"blocks.*.{n}" for n in names)))
        out[name] = dict(model=model, lens=logit_lens(model, ROWS, IDS, sites=SITES, top_k=4), read_pos=read_pos,
                         names=names, logits=np.asarray(logits), cache={k: np.asarray(v) for k, v in cache.items()})
    return out


@pytest.mark.parametrize("family", list(CONFIGS))
def test_lens_matches_hand_computed_norm_and_unembedding(cases, family):
    case = cases[family]
    model, result, read_pos, names, cache = case["model"], case["lens"], case["read_pos"], case["names"], case["cache"]
    cfg, params, ids = model.config, model.params, IDS
    rows = np.arange(len(ROWS))
    for layer in range(cfg.n_layers):
        at = {n: cache[f"blocks.{layer}.{n}"][rows, read_pos] for n in names}
        # Pre-FFN residual by definition: after attention, before the FFN (parallel blocks: pre + attn).
        pre_ffn = at["hook_resid_pre"] + at["hook_attn_out"] if cfg.parallel_residual else at["hook_resid_mid"]
        for site, resid in [("resid_pre", at["hook_resid_pre"]), ("pre_ffn", pre_ffn), ("resid_post", at["hook_resid_post"])]:
            s = result.site(site)
            want = hand_decode(cfg, params, resid)
            rank, rr, prob = hand_stats(want, ids)
            np.testing.assert_array_equal(result.rank[s, :, layer], rank)
            np.testing.assert_allclose(result.rr[s, :, layer], rr)
            np.testing.assert_allclose(result.prob[s, :, layer], prob, rtol=1e-4, atol=1e-7)
            np.testing.assert_allclose(result.logit[s, :, layer], np.take_along_axis(want, ids, -1), rtol=1e-4, atol=1e-4)
            np.testing.assert_array_equal(result.top_ids[s, :, layer], np.argsort(-want, -1)[:, :4])
    # The last block output decodes to exactly the model's own logits.
    out = case["logits"][rows, read_pos]
    last = result.site("resid_post")
    np.testing.assert_allclose(result.logit[last, :, -1], np.take_along_axis(out, ids, -1), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(result.out_top1, out.argmax(-1))
    np.testing.assert_array_equal(result.out_rank, hand_stats(out, ids)[0])


@pytest.mark.parametrize("family", list(CONFIGS))
def test_decode_is_the_models_final_norm_and_unembedding(cases, family):
    model = cases[family]["model"]
    resid = np.random.default_rng(0).normal(size=(2, 5, model.config.d_model)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(decode(model.config, model.params, jnp.asarray(resid))),
                               hand_decode(model.config, model.params, resid), rtol=1e-4, atol=1e-4)


def test_token_stats_definitions():
    logits = jnp.array([[2.0, 5.0, 1.0, 5.0, -1.0]])
    stats = token_stats(logits, jnp.array([[1, 3, 0, 4]]))
    np.testing.assert_array_equal(stats["rank"], [[0, 0, 2, 4]])  # ties share the better rank
    np.testing.assert_allclose(stats["rr"], [[1.0, 1.0, 1 / 3, 1 / 5]])
    p = np.exp(np.array([2.0, 5.0, 1.0, 5.0, -1.0]))
    p /= p.sum()
    np.testing.assert_allclose(stats["prob"], [[p[1], p[3], p[0], p[4]]], rtol=1e-6)
    np.testing.assert_allclose(stats["logit"], [[5.0, 5.0, 2.0, -1.0]])


def test_chunking_and_padding_do_not_change_the_lens(cases):
    case = cases["llama"]
    chunked = logit_lens(case["model"], ROWS, IDS, sites=SITES, top_k=4, chunk_tokens=32)  # 2 per chunk, last padded
    for name in ("rank", "rr", "prob", "out_rank", "out_top_ids"):
        np.testing.assert_allclose(getattr(case["lens"], name), getattr(chunked, name), rtol=1e-5, atol=1e-6, err_msg=name)
    assert [c.tolist() for c in chunk_indices(5, 16, 32)] == [[0, 1], [2, 3], [4, 4]]
    assert [c.tolist() for c in chunk_indices(3, 16, 64, fixed=True)] == [[0, 1, 2, 0]]


def test_lens_under_hooks_sees_the_intervention(cases):
    """Zeroing the last FFN at the read position: the block output equals the pre-FFN residual."""
    case = cases["llama"]
    read_pos, last = case["read_pos"], LLAMA.n_layers - 1

    def hooks(idx, pos):
        mask = np.arange(pos)[None, :, None] == read_pos[idx][:, None, None]
        return Hooks({f"blocks.{last}.hook_mlp_out": replace(jnp.zeros((1, 1, LLAMA.d_model)), jnp.asarray(mask))})

    result = logit_lens(case["model"], ROWS, IDS, sites=SITES, top_k=4, hooks=hooks)
    clean = case["lens"]
    pre, post = result.site("pre_ffn"), result.site("resid_post")
    np.testing.assert_allclose(result.logit[post, :, last], result.logit[pre, :, last], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(result.logit[:, :, :last], clean.logit[:, :, :last], rtol=1e-5, atol=1e-5)
    assert not np.allclose(result.logit[post, :, last], clean.logit[post, :, last])


def test_bad_input_is_explained(cases):
    model = cases["llama"]["model"]
    with pytest.raises(ValueError, match="token_ids must be"):
        logit_lens(model, ROWS, np.zeros((2, 1), int))
    with pytest.raises(ValueError, match="sites"):
        logit_lens(model, ROWS, np.zeros(3, int), sites=("resid_middle",))
    with pytest.raises(ValueError, match="empty"):
        pad_prompts([[1, 2], []])


def test_presentation_helpers(cases):
    result = cases["gpt2"]["lens"]
    lines = top_k_table(result, str, example=1)
    assert len(lines) == GPT2.n_layers and lines[0].startswith("  0:") and lines[0].count(",") == 3
    fig = rank_figure({"answer": result.rr[2, :, :, 0], "mean": result.rr[2, 0, :, 0]}, "t", marks={"fn": 1})
    assert len(fig.axes[0].lines) == 3
    import matplotlib.pyplot as plt

    plt.close(fig)
