"""AtP and AtP* against independent computations: loops of patched forwards (exact patching), a
setting where the model is exactly linear in the patched activation, and the structure of GradDrop.

Compilation dominates the run time, so the tests share programs: one exact-patching function per
model (the patch masks are data), and the same configs, pair shapes and static options as
tests/test_eap.py (jit caches are per process)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcirc.attribution import Attribution, atp, atp_chunk
from jaxcirc.eap import eap
from jaxcirc.hooks import Hooks, replace
from jaxcirc.metrics import logit_diff
from jaxcirc.models.transformer import init_params, make_forward
import tiny_models
from tiny_models import llama_gqa, random_pairs


# The same static options and pair shapes as tests/test_eap.py, so the compiled programs are shared.
SITES = ("head", "mlp_out", "resid_pre")
NEOX_ATP = dict(sites=SITES, qk_fix=True, per_pair=True, batch_size=3)

_PATCHED = {"z": "attn.hook_z", "mlp": "hook_mlp_out", "neuron": "mlp.hook_post",
            "q": "attn.hook_rot_q", "k": "attn.hook_rot_k", "v": "attn.hook_v"}


def _no_patch(cfg, pos):
    L, H, K = cfg.n_layers, cfg.n_heads, cfg.n_kv_heads
    return {"z": np.zeros((L, H), bool), "mlp": np.zeros(L, bool), "neuron": np.zeros((L, cfg.d_mlp), bool),
            "q": np.zeros((L, pos, H), bool), "k": np.zeros((L, pos, K), bool), "v": np.zeros((L, pos, K), bool)}


def _one_patch(cfg, pos, kind, index):
    masks = _no_patch(cfg, pos)
    masks[kind][index] = True
    return masks


def _exact_patching(cfg, params, pairs):
    """Exact activation patching by patched forwards. Returns caches(tokens) and a jitted
    metric(base, masks) -> logit_diff [n, batch] for stacked mask dicts (see `_no_patch`; each a
    leading n axis): the selected heads' z, MLP outputs, neurons, or (position, head) entries of the
    rotated queries, keys and values of the clean run are replaced by their corrupted values.
    Masks are data, so every patch of a model runs through one compiled program."""
    forward = make_forward(cfg, jit=False)
    L = cfg.n_layers
    names = tuple(f"blocks.*.{t}" for t in _PATCHED.values()) + ("ln_final.hook_scale",)
    caches = jax.jit(lambda tokens: forward(params, tokens, Hooks(cache=names))[1])
    corrupt = caches(pairs.corrupt)

    def shaped(kind, mask):  # mask for one layer -> broadcastable to the activation
        if kind == "z":
            return mask[None, None, :, None]
        if kind == "mlp":
            return mask.reshape(1, 1, 1)
        if kind == "neuron":
            return mask[None, None, :]
        return mask[None, :, :, None]

    @jax.jit
    @jax.vmap
    def metric(base, masks):
        hooks = dict(base)
        for l in range(L):
            for kind, template in _PATCHED.items():
                name = f"blocks.{l}.{template}"
                hooks[name] = replace(corrupt[name], shaped(kind, masks[kind][l]))
        logits, _ = forward(params, pairs.clean, Hooks(hooks), logits_at=pairs.position)
        return logit_diff(logits, pairs)

    def run(base, mask_list):
        stacked = {k: jnp.asarray(np.stack([m[k] for m in mask_list])) for k in mask_list[0]}
        n = len(mask_list)
        return np.asarray(metric(jax.tree.map(lambda a: jnp.broadcast_to(a, (n,) + a.shape), base), stacked))

    return caches, run


@pytest.fixture(scope="module")
def neox():
    """2-layer parallel model; per-pair AtP (with QK-fix parts) in chunks of 3, the last one padded."""
    cfg = tiny_models.neox()
    params, pairs = init_params(cfg, 0), random_pairs(1, 4, 5)
    per_pair = atp(cfg, params, pairs, **NEOX_ATP)
    mean = {site: np.asarray(v).mean(0) for site, v in per_pair.scores.items()}
    return cfg, params, pairs, mean, per_pair


def test_atp_correlates_with_exact_head_patching(neox):
    """Per pair and per head, AtP (and AtP with QK-fix) against a loop of patched forwards, on
    small weights (near the linear regime, where AtP is meant to work). Same compiled program as
    the fixture: only the parameters differ."""
    cfg, _, pairs, *_ = neox
    params = init_params(cfg.replace(initializer_range=0.1), 1)
    result = atp(cfg, params, pairs, **NEOX_ATP)
    P, L, H = pairs.clean.shape[1], cfg.n_layers, cfg.n_heads
    _, run = _exact_patching(cfg, params, pairs)
    masks = [_no_patch(cfg, P)] + [_one_patch(cfg, P, "z", (l, h)) for l in range(L) for h in range(H)]
    values = run({}, masks)                                               # [1 + L*H, batch]
    exact = (values[1:] - values[0]).reshape(L, H, -1).transpose(2, 0, 1)  # [batch, layer, head]
    assert np.abs(exact).max() > 0.05
    for key in ("head_atp", "head"):
        estimate = np.asarray(result[key])
        assert estimate.shape == exact.shape
        assert np.corrcoef(exact.ravel(), estimate.ravel())[0, 1] > 0.95, key


def test_atp_and_qk_fix_are_exact_where_the_model_is_linear():
    """GQA parallel model with the final norm's scale frozen at its clean value: the last layer's
    heads, MLP output and neurons reach the logit difference linearly, and so does its attention
    pattern (z = A v). There AtP equals exact patching, and QK-fix (which recomputes the softmax
    exactly) equals exact patching of one query or key position."""
    # Grouped-query attention with a parallel block: attention of the last layer feeds the logits
    # only through the final norm, which the linear test freezes.
    cfg = llama_gqa(n_layers=2, parallel_residual=True)
    params, pairs = init_params(cfg, 0), random_pairs(1, 4, 5)
    L, H, K, P, g, last = cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, pairs.clean.shape[1], cfg.group_size, cfg.n_layers - 1
    caches, run = _exact_patching(cfg, params, pairs)
    base = {"ln_final.hook_scale": replace(caches(pairs.clean)["ln_final.hook_scale"])}

    before = atp_chunk._cache_size()
    result = atp(cfg, params, pairs, sites=("head", "mlp_out", "neuron"), qk_fix=True, per_position=True,
                 hooks=base, batch_size=2)
    assert atp_chunk._cache_size() - before == 1  # two chunks, one compilation
    assert isinstance(result, Attribution) and result.metadata["method"] == "atp+qk_fix"
    assert result.dims["head_k"] == ("layer", "head", "pos") and result.dims["neuron"] == ("layer", "pos", "neuron")

    neurons = np.argsort(-np.abs(np.asarray(result["neuron"]).sum(1)[last]))[:4]
    patches = ([("z", (l, h)) for l in range(L) for h in range(H)] + [("mlp", last)]
               + [("neuron", (last, n)) for n in neurons]
               + [("q", (last, s, h)) for s in range(P) for h in range(H)]
               + [(kind, (last, t, j)) for kind in ("k", "v") for t in range(P) for j in range(K)])
    values = run(base, [_no_patch(cfg, P)] + [_one_patch(cfg, P, kind, index) for kind, index in patches])
    exact = dict(zip(patches, (values[1:] - values[0]).mean(-1)))

    def close(actual, expected):
        np.testing.assert_allclose(actual, expected, rtol=1e-3, atol=3e-5)

    heads = np.asarray(result["head_atp"]).sum(-1)
    close(heads[last], [exact[("z", (last, h))] for h in range(H)])
    assert np.abs(heads[0] - [exact[("z", (0, h))] for h in range(H)]).max() > 1e-3  # layer 0: not linear
    close(np.asarray(result["mlp_out"]).sum(-1)[last], exact[("mlp", last)])
    close(np.asarray(result["neuron"]).sum(1)[last, neurons], [exact[("neuron", (last, n))] for n in neurons])
    close(result["head_q"][last], [[exact[("q", (last, s, h))] for s in range(P)] for h in range(H)])
    # A key or value of kv head j is shared by its group of query heads; patching it moves them all.
    for kind in ("k", "v"):
        grouped = np.asarray(result[f"head_{kind}"][last]).reshape(K, g, P).sum(1)
        close(grouped, [[exact[(kind, (last, t, j))] for t in range(P)] for j in range(K)])
    assert max(abs(exact[("k", (last, t, j))]) for t in range(P) for j in range(K)) > 1e-2
    np.testing.assert_allclose(result["head"], result["head_q"] + result["head_k"] + result["head_v"], atol=1e-6)


def test_grad_drop_structure(neox):
    """2-layer parallel model: holding layer 1 constant leaves a layer-0 head only its direct path to
    the logits (its EAP edge into `logits`); holding a head's own layer gives 0; holding an earlier
    layer changes nothing. GD = 1/(L-1) sum_l |AtP_GD_l|."""
    cfg, params, pairs, plain, _ = neox
    result = atp(cfg, params, pairs, sites=("head",), grad_drop=True)
    signed = np.asarray(result.metadata["grad_drop_signed"]["head"])            # [drop_layer, layer, head]
    edges = eap(cfg, params, pairs)
    g = edges.graph
    direct = np.array([edges.scores[g.head_src(0, h), g.logits_dst] for h in range(cfg.n_heads)])
    np.testing.assert_allclose(signed[1, 0], direct, atol=1e-5)
    np.testing.assert_allclose(signed[0, 1], plain["head_atp"][1], atol=1e-5)
    np.testing.assert_array_equal(signed[0, 0], 0)
    np.testing.assert_array_equal(signed[1, 1], 0)
    np.testing.assert_allclose(result["head"], np.abs(signed).sum(0) / (cfg.n_layers - 1), atol=1e-7)
    assert (np.asarray(result["head"]) >= 0).all() and result.metadata["method"] == "atp+grad_drop"
    assert np.abs(direct - plain["head_atp"][0]).max() > 1e-3  # the indirect path matters
    # The same program's plain AtP (whole batch at once) equals the mean of the chunked per-pair AtP.
    np.testing.assert_allclose(result.metadata["atp_without_grad_drop"]["head"], plain["head_atp"], atol=1e-6)


def test_per_pair_results_and_named_arrays(neox):
    cfg, params, pairs, mean, per_pair = neox
    assert per_pair["head"].shape == (4, cfg.n_layers, cfg.n_heads)
    assert per_pair.dims["resid_pre"] == ("batch", "layer", "pos")
    assert per_pair.metadata["n_pairs"] == 4 and per_pair.metadata["metric"] == "logit_diff"
    arrays = per_pair.arrays()
    assert arrays["attribution_resid_pre"][1] == ("batch", "layer", "pos")
    assert arrays["attribution_resid_pre"][0].shape == (4, cfg.n_layers, pairs.clean.shape[1])
    # resid_pre of layer 0 is the embedding: zero wherever the clean and corrupted tokens agree.
    same = np.asarray(pairs.clean == pairs.corrupt)
    assert (np.asarray(per_pair["resid_pre"])[:, 0][same] == 0).all()
    assert np.abs(np.asarray(per_pair["resid_pre"])[:, 0][~same]).min() > 0


def test_bad_requests_are_explained(neox):
    cfg, params, pairs, *_ = neox
    with pytest.raises(ValueError, match="Unknown attribution sites"):
        atp(cfg, params, pairs, sites=("heads",))
    with pytest.raises(ValueError, match="resid_mid does not exist"):
        atp(cfg, params, pairs, sites=("resid_mid",))
    with pytest.raises(ValueError, match="include 'head'"):
        atp(cfg, params, pairs, sites=("mlp_out",), qk_fix=True)
    with pytest.raises(ValueError, match="at least 2 layers"):
        atp(cfg.replace(n_layers=1), params, pairs, grad_drop=True)
    with pytest.raises(ValueError, match="only hold interventions"):
        atp(cfg, params, pairs, hooks=Hooks(cache=("hook_embed",)))
    with pytest.raises(ValueError, match="batch_size"):
        atp(cfg, params, pairs, batch_size=0)
    with pytest.raises(ValueError, match="Unknown metric"):
        atp(cfg, params, pairs, metric="accuracy")
