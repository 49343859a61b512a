"""EAP and EAP-IG: edge sums equal node AtP, m = 1 equals EAP, integrated gradients are complete on
the input node, and one edge score equals a finite difference. Same configs and pair shapes as
tests/test_attribution.py, so compiled programs are shared within a session."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcirc.attribution import atp
from jaxcirc.eap import EdgeScores, eap, eap_chunk, eap_ig, ig_alphas
from jaxcirc.hooks import Hooks, Intervention, add
from jaxcirc.metrics import logit_diff
from jaxcirc.models.transformer import init_params, make_forward
import tiny_models
from tiny_models import llama_gqa, random_pairs


# The same static options and pair shapes as tests/test_attribution.py (shared compilations).
SITES = ("head", "mlp_out", "resid_pre")
NEOX_ATP = dict(sites=SITES, qk_fix=True, per_pair=True, batch_size=3)


@pytest.fixture(scope="module")
def llama():
    """GQA, sequential blocks. EAP in chunks of 2 pairs; AtP of the nodes."""
    cfg = llama_gqa()
    params, pairs = init_params(cfg, 0), random_pairs(1, 4, 5)
    before = eap_chunk._cache_size()
    edges = eap(cfg, params, pairs, batch_size=2)
    compiles = eap_chunk._cache_size() - before
    nodes = atp(cfg, params, pairs, sites=SITES)
    node_atp = {"head": np.asarray(nodes["head"]), "mlp_out": np.asarray(nodes["mlp_out"]),
                "input": float(np.asarray(nodes["resid_pre"])[0].sum())}
    return cfg, params, pairs, edges, node_atp, compiles


@pytest.fixture(scope="module")
def neox():
    """MHA, parallel attention + MLP (no attention -> MLP edge inside a layer)."""
    cfg = tiny_models.neox()
    params, pairs = init_params(cfg, 0), random_pairs(1, 4, 5)
    edges = eap(cfg, params, pairs)
    nodes = atp(cfg, params, pairs, **NEOX_ATP)  # per pair, chunked; head_atp is plain AtP of the heads
    node_atp = {"head": np.asarray(nodes["head_atp"]).mean(0), "mlp_out": np.asarray(nodes["mlp_out"]).mean(0),
                "input": float(np.asarray(nodes["resid_pre"]).mean(0)[0].sum())}
    return cfg, params, pairs, edges, node_atp, None


@pytest.mark.parametrize("setup", ["llama", "neox"])
def test_edge_sums_equal_node_atp(setup, request):
    """Summed over its outgoing edges, a node's EAP score is its AtP (same metric, same pairs): the
    gradient at a node's output is the sum of the gradients at the inputs it feeds."""
    cfg, params, pairs, edges, node_atp, _ = request.getfixturevalue(setup)
    g = edges.graph
    totals = edges.node_scores()
    heads = np.array([[totals[g.head_src(l, h)] for h in range(cfg.n_heads)] for l in range(cfg.n_layers)])
    mlps = np.array([totals[g.mlp_src(l)] for l in range(cfg.n_layers)])
    scale = np.abs(node_atp["head"]).max()
    assert scale > 0.05
    np.testing.assert_allclose(heads, node_atp["head"], atol=2e-5 * max(1.0, scale))
    np.testing.assert_allclose(mlps, node_atp["mlp_out"], atol=2e-5 * max(1.0, scale))
    np.testing.assert_allclose(totals[g.input_src], node_atp["input"], atol=2e-5 * max(1.0, scale))
    # Invalid edges carry nothing; the valid ones are not trivially zero.
    scores = np.asarray(edges.scores)
    assert (scores[~g.valid] == 0).all()
    assert (np.abs(scores[g.valid]) > 0).mean() > 0.5
    if cfg.parallel_residual:
        assert scores[g.head_src(0, 0), g.mlp_dst(0)] == 0


def test_chunked_eap_compiles_once(llama):
    *_, compiles = llama
    assert compiles == 1  # two chunks of two pairs: one compilation


def test_eap_ig_with_one_right_step_is_eap(neox):
    cfg, params, pairs, edges, *_ = neox
    one = eap_ig(cfg, params, pairs, steps=1, endpoint="right")
    assert one.method == "eap-ig" and one.steps == 1
    np.testing.assert_allclose(one.scores, edges.scores, atol=1e-5)


def test_eap_ig_is_complete_on_the_input_node(neox):
    """Integrated gradients along the input-embedding path: the input node's edges sum to
    (1/m) sum_k (emb' - emb) . dM/demb (x_k), a Riemann sum of the path integral, which equals
    M(corrupted) - M(clean) exactly (dM/demb is the sum of the gradients at every destination the
    input feeds). Left and right sums converge at O(1/m), their mean (the trapezoid rule) at O(1/m^2)."""
    cfg, params, pairs, edges, *_ = neox
    forward = make_forward(cfg)
    delta = float((logit_diff(forward(params, pairs.corrupt, logits_at=pairs.position)[0], pairs)
                   - logit_diff(forward(params, pairs.clean, logits_at=pairs.position)[0], pairs)).mean())
    m = 32  # in chunks of 5 steps (the last chunk padded): also exercises the step chunking
    left = float(eap_ig(cfg, params, pairs, steps=m, endpoint="left", step_chunk=5).scores[0].sum())
    right = float(eap_ig(cfg, params, pairs, steps=m, endpoint="right", step_chunk=5).scores[0].sum())
    eap_total = float(edges.scores[0].sum())
    assert abs(delta) > 0.05
    assert abs(left - delta) < 0.15 * abs(delta) and abs(right - delta) < 0.15 * abs(delta)
    assert abs((left + right) / 2 - delta) < 0.01 * abs(delta)
    assert abs(eap_total - delta) > 10 * abs((left + right) / 2 - delta)  # plain EAP is not complete
    np.testing.assert_allclose(ig_alphas(4, "left"), [0, 0.25, 0.5, 0.75])
    np.testing.assert_allclose(ig_alphas(4, "right"), [0.25, 0.5, 0.75, 1.0])


def test_one_edge_against_a_finite_difference(llama):
    """s(a0.h1 -> a2.kv0<k>) = d/de M(clean with e * (z'_u - z_u) added to kv head 0's key input), e = 0."""
    cfg, params, pairs, edges, *_ = llama
    g = edges.graph
    src, dst = g.src_index("a0.h1"), g.dst_index("a2.kv0<k>")
    forward = make_forward(cfg)
    names = ("blocks.0.attn.hook_result",)
    diff = (forward(params, pairs.corrupt, Hooks(cache=names))[1][names[0]]
            - forward(params, pairs.clean, Hooks(cache=names))[1][names[0]])[:, :, 1]      # [b, p, d]
    diff = diff * pairs.mask[:, :, None]
    kv_onehot = (jnp.arange(cfg.n_kv_heads) == 0)[None, None, :, None]

    @jax.jit
    @jax.vmap
    def metric(eps):
        hooks = Hooks({"blocks.2.hook_k_input": add(eps * diff[:, :, None, :] * kv_onehot)})
        logits, _ = forward(params, pairs.clean, hooks, logits_at=pairs.position)
        return logit_diff(logits, pairs).mean()

    eps = 1e-2
    plus, minus = metric(jnp.array([eps, -eps]))
    finite_difference = float(plus - minus) / (2 * eps)
    assert abs(finite_difference) > 1e-3
    np.testing.assert_allclose(float(edges.scores[src, dst]), finite_difference, rtol=2e-2, atol=1e-4)


def test_scores_come_with_names_and_metadata(llama):
    cfg, params, pairs, edges, *_ = llama
    assert isinstance(edges, EdgeScores) and edges.scores.shape == (edges.graph.n_src, edges.graph.n_dst)
    info = edges.describe()
    assert info["method"] == "eap" and info["metric"] == "logit_diff" and info["n_pairs"] == 4
    assert info["node_names"][0] == "input" and info["dst_names"][-1] == "logits"
    assert "corrupted" in info["sign"]
    (name, (array, dims)), = edges.arrays().items()
    assert name == "edge_scores" and dims == ("src_node", "dst") and array.shape == edges.scores.shape
    top = edges.top(3)
    assert len(top) == 3 and abs(top[0][1]) == np.abs(np.asarray(edges.scores)).max()


def test_bad_requests_are_explained(neox):
    cfg, params, pairs, *_ = neox
    with pytest.raises(ValueError, match="Unknown method"):
        eap(cfg, params, pairs, method="ig")
    with pytest.raises(ValueError, match="steps >= 1"):
        eap_ig(cfg, params, pairs, steps=0)
    with pytest.raises(ValueError, match="endpoint"):
        eap_ig(cfg, params, pairs, endpoint="middle")
    with pytest.raises(TypeError, match="MinimalPairs"):
        eap(cfg, params, {"clean": pairs.clean})
    scale = jnp.ones((len(pairs), pairs.n_pos, 1))
    with pytest.raises(ValueError, match=r"through ln1.*blocks\.0\.ln1\.hook_scale.*hook_resid_pre"):
        eap(cfg, params, pairs, hooks={"blocks.0.ln1.hook_scale": Intervention(replace=scale)})
    with pytest.raises(ValueError, match=r"q/k/v projection.*blocks\.1\.attn\.hook_k"):
        eap_ig(cfg, params, pairs, hooks={"blocks.1.attn.hook_k": Intervention(add=jnp.ones(()))})


@pytest.mark.parametrize("cfg", [
    tiny_models.llama_gqa(),                                            # RMSNorm, GQA
    tiny_models.neox(),                                                 # LayerNorm, parallel residual
    tiny_models.llama_gqa(norm_offset=1.0, n_layers=2),                 # Gemma's scale 1 + w
    tiny_models.neox(family="gpt2", parallel_residual=False, positional="learned",
                     n_layers=2),                                       # GPT-2: LayerNorm, learned positions
], ids=["llama-gqa", "neox", "norm-offset", "gpt2"])
def test_destination_grads_equal_the_per_head_input_gradients(cfg):
    """EAP reads the backward pass at hook_q/k/v and maps it through ln1 (`backward_statistics`);
    the result equals differentiating at the per-head inputs themselves (hook_q_input, ...), which
    runs ln1 and the projections once per head. Two interpolation steps' statistics add up like
    their gradients."""
    from jaxcirc.eap import _GRAD_TEMPLATES, STATISTICS_CACHE, backward_statistics, destination_grads
    params, pairs = tiny_models.random_params(cfg, 3), random_pairs(2, 3, 6)
    forward = make_forward(cfg, jit=False)
    batch, pos = pairs.clean.shape
    emb = forward(params, pairs.clean, Hooks(cache=("hook_embed",)))[1]["hook_embed"]

    def metric_grads(templates, scale):
        shapes = {"hook_q_input": (cfg.n_heads, cfg.d_model), "hook_k_input": (cfg.n_kv_heads, cfg.d_model),
                  "hook_v_input": (cfg.n_kv_heads, cfg.d_model), "attn.hook_q": (cfg.n_heads, cfg.d_head),
                  "attn.hook_k": (cfg.n_kv_heads, cfg.d_head), "attn.hook_v": (cfg.n_kv_heads, cfg.d_head),
                  "hook_mlp_in": (cfg.d_model,)}
        zeros = {t: [jnp.zeros((batch, pos) + shapes[t]) for _ in range(cfg.n_layers)] for t in templates}
        zeros["logits"] = jnp.zeros((batch, pos, cfg.d_model))

        def metric(deltas):
            hooks = {f"blocks.{l}.{t}": add(deltas[t][l]) for t in templates for l in range(cfg.n_layers)}
            hooks[f"blocks.{cfg.n_layers - 1}.hook_resid_post"] = add(deltas["logits"])
            hooks["hook_embed"] = Intervention(replace=scale * emb)
            logits, cache = forward(params, pairs.clean, Hooks(hooks, cache=STATISTICS_CACHE), logits_at=pairs.position)
            return logit_diff(logits, pairs, logits).sum(), cache
        return jax.grad(metric, has_aux=True)(zeros)

    direct = [metric_grads(("hook_q_input", "hook_k_input", "hook_v_input", "hook_mlp_in"), s)[0] for s in (1.0, 0.5)]
    stats = [backward_statistics(cfg, params, *metric_grads(_GRAD_TEMPLATES, s)) for s in (1.0, 0.5)]
    sums = jax.tree.map(lambda a, b: a + b, stats[0][0], stats[1][0])
    outer = jax.tree.map(lambda a, b: jnp.stack([a, b]), stats[0][1], stats[1][1])
    ours = destination_grads(cfg, params, sums, outer)
    for name in ("hook_q_input", "hook_k_input", "hook_v_input", "hook_mlp_in"):
        for l in range(cfg.n_layers):
            want = np.asarray(direct[0][name][l] + direct[1][name][l])
            assert np.abs(want).max() > 1e-4, (name, l)                # the check is not vacuous
            np.testing.assert_allclose(np.asarray(ours[name][l]), want, atol=2e-6 * np.abs(want).max(), rtol=1e-4,
                                       err_msg=f"{name} layer {l}")


def test_step_chunks_change_nothing_but_speed(neox):
    """IG steps run together by default when a pass has few tokens (`default_step_chunk`); any
    chunking gives the same scores as one step at a time."""
    from jaxcirc.eap import STEP_CHUNK_TOKENS, default_step_chunk

    assert default_step_chunk(5, 16) == 5 and default_step_chunk(5, STEP_CHUNK_TOKENS) == 1
    assert default_step_chunk(5, STEP_CHUNK_TOKENS // 2) == 3     # 3 + 2 steps, not 2 + 2 + 1
    assert default_step_chunk(1, 1) == 1
    cfg, params, pairs, *_ = neox
    one = np.asarray(eap_ig(cfg, params, pairs, steps=5, step_chunk=1).scores)
    for chunk in (None, 2):
        np.testing.assert_allclose(np.asarray(eap_ig(cfg, params, pairs, steps=5, step_chunk=chunk).scores), one,
                                   atol=1e-6 * np.abs(one).max())
