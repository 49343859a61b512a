"""Hooks as data: caching, replace/add semantics, shapes, vmap over hook arrays, grad of add-deltas,
clear errors. Checked against independent computations (the residual identities between hook
points, a manual unembedding, Python loops of single runs, finite differences)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcirc
from jaxcirc import Hooks, ModelConfig, RopeConfig, add, replace
from jaxcirc.models import hook_points
from jaxcirc.models.transformer import Run, make_forward, make_joint_forward, param_shapes

BATCH, POS = 2, 6

LLAMA = ModelConfig(family="llama", n_layers=3, d_model=32, n_heads=4, n_kv_heads=2, d_head=8, d_mlp=64,
                    d_vocab=50, n_ctx=64, norm="rmsnorm", activation="silu", gated_mlp=True,
                    positional="rotary", rope=RopeConfig(theta=10000.0, rotary_dim=8), tied_embeddings=False,
                    initializer_range=0.3)
GPT2 = ModelConfig(family="gpt2", n_layers=2, d_model=24, n_heads=3, d_head=8, d_mlp=96, d_vocab=50, n_ctx=32,
                   qkv_bias=True, o_bias=True, mlp_bias=True, initializer_range=0.3)
PYTHIA = ModelConfig(family="gpt_neox", n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, d_vocab=50,
                     n_ctx=32, norm="layernorm", activation="gelu", parallel_residual=True, positional="rotary",
                     rope=RopeConfig(rotary_dim=2), tied_embeddings=False, qkv_bias=True, o_bias=True,
                     mlp_bias=True, initializer_range=0.3)


def random_params(cfg: ModelConfig, seed: int) -> dict:
    """Random params of `cfg`'s shapes (numpy, fast): weights ~ N(0, init), norm scales ~ 1 + N(0, 0.1)
    and biases ~ N(0, 0.3), so that biases and norm weights are exercised too."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = str(path[-1].key)
        if name.startswith("W"):
            value = cfg.initializer_range * rng.normal(size=leaf.shape)
        elif name == "w":
            value = 1.0 + 0.1 * rng.normal(size=leaf.shape)
        else:
            value = 0.3 * rng.normal(size=leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, param_shapes(cfg))


@pytest.fixture(scope="module")
def llama():
    return LLAMA, random_params(LLAMA, 0), make_forward(LLAMA)


@pytest.fixture(scope="module")
def gpt2():
    return GPT2, random_params(GPT2, 1), make_forward(GPT2)


@pytest.fixture(scope="module")
def pythia():
    return PYTHIA, random_params(PYTHIA, 2), make_forward(PYTHIA)


def tokens(cfg: ModelConfig, seed: int = 0, batch: int = BATCH, pos: int = POS) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(0, cfg.d_vocab, (batch, pos)), jnp.int32)


def expected_shape(cfg: ModelConfig, name: str, batch: int = BATCH, pos: int = POS) -> tuple[int, ...]:
    sizes = hook_points.dim_sizes(cfg, batch, pos)
    return tuple(sizes[d] for d in hook_points.dims_of(cfg, name))


def rms_unembed(cfg: ModelConfig, params: dict, resid: np.ndarray) -> np.ndarray:
    """Independent numpy final RMSNorm + unembedding of a residual [..., d_model]."""
    x = np.asarray(resid, np.float64)
    normed = x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg.norm_eps) * np.asarray(params["ln_final"]["w"])
    return normed @ np.asarray(params["W_U"], np.float64)


# ----------------------------------------------------------------------------- caching


def test_cache_returns_exactly_the_names_asked(llama):
    cfg, params, forward = llama
    asked = ("blocks.*.attn.hook_z", "hook_embed", "blocks.1.hook_resid_post", "blocks.2.attn.hook_z")
    _, cache = forward(params, tokens(cfg), Hooks(cache=asked))
    expected = {f"blocks.{l}.attn.hook_z" for l in range(3)} | {"hook_embed", "blocks.1.hook_resid_post"}
    assert set(cache) == expected
    for name, value in cache.items():
        assert value.shape == expected_shape(cfg, name), name
    assert cache["blocks.0.attn.hook_z"].shape == (BATCH, POS, 4, 8)


def test_no_cache_by_default(llama):
    cfg, params, forward = llama
    assert forward(params, tokens(cfg))[1] == {}


def test_wildcards_match_only_that_template(gpt2):
    cfg, params, forward = gpt2
    _, cache = forward(params, tokens(cfg), Hooks(cache=("blocks.*.ln1.hook_scale",)))
    assert sorted(cache) == ["blocks.0.ln1.hook_scale", "blocks.1.ln1.hook_scale"]
    assert cache["blocks.0.ln1.hook_scale"].shape == (BATCH, POS, 1)


@pytest.mark.parametrize("fixture", ["llama", "gpt2", "pythia"])
def test_every_hook_point_can_be_cached_with_its_shape(fixture, request):
    cfg, params, forward = request.getfixturevalue(fixture)
    names = hook_points.full_names(cfg)
    per_head_inputs = [n for n in names if n.split(".")[-1] in ("hook_q_input", "hook_k_input", "hook_v_input")]
    ln1 = [n for n in names if ".ln1." in n]
    # Per-head inputs make ln1 run per head, so those two groups are cached in separate runs.
    clean_logits, first = forward(params, tokens(cfg), Hooks(cache=tuple(n for n in names if n not in per_head_inputs)))
    logits, second = forward(params, tokens(cfg), Hooks(cache=tuple(n for n in names if n not in ln1)))
    cache = {**first, **second}
    assert sorted(cache) == sorted(names)
    for name in names:
        assert cache[name].shape == expected_shape(cfg, name), name
    np.testing.assert_allclose(logits, clean_logits, atol=1e-5)
    # The points really are what their names say: the residual identities hold.
    for l in range(cfg.n_layers):
        b = f"blocks.{l}."
        mid = cache[b + "hook_resid_pre"] + cache[b + "hook_attn_out"]
        if cfg.parallel_residual:
            np.testing.assert_allclose(cache[b + "hook_mlp_in"], cache[b + "hook_resid_pre"], atol=1e-6)
        else:
            np.testing.assert_allclose(cache[b + "hook_resid_mid"], mid, atol=1e-5)
        np.testing.assert_allclose(cache[b + "hook_resid_post"], mid + cache[b + "hook_mlp_out"], atol=1e-5)
        if l + 1 < cfg.n_layers:
            np.testing.assert_allclose(cache[f"blocks.{l + 1}.hook_resid_pre"], cache[b + "hook_resid_post"])
        np.testing.assert_allclose(cache[b + "attn.hook_pattern"].sum(-1), 1.0, atol=1e-5)
        q_in = cache[b + "hook_q_input"]
        for h in range(cfg.n_heads):
            np.testing.assert_array_equal(q_in[:, :, h], cache[b + "hook_resid_pre"])


# ----------------------------------------------------------------------------- replace / add


def _clean(forward, params, toks, names):
    return forward(params, toks, Hooks(cache=names))


def test_replace_with_bool_mask(llama):
    cfg, params, forward = llama
    toks = tokens(cfg)
    _, clean = _clean(forward, params, toks, ("blocks.0.hook_resid_post",))
    x = np.asarray(clean["blocks.0.hook_resid_post"])
    value = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
    mask = np.zeros((1, POS, 1), bool)
    mask[:, 2] = True  # patch position 2 of every example
    _, cache = forward(params, toks, Hooks({"blocks.0.hook_resid_post": replace(value, mask)},
                                           cache=("blocks.0.hook_resid_post", "blocks.1.hook_resid_pre")))
    expected = np.where(mask, value, x)
    np.testing.assert_array_equal(cache["blocks.0.hook_resid_post"], expected)
    np.testing.assert_array_equal(cache["blocks.1.hook_resid_pre"], expected)


def test_replace_with_float_mask_interpolates(llama):
    cfg, params, forward = llama
    toks = tokens(cfg)
    _, clean = _clean(forward, params, toks, ("blocks.1.attn.hook_z",))
    x = np.asarray(clean["blocks.1.attn.hook_z"])
    value = np.random.default_rng(2).normal(size=x.shape).astype(np.float32)
    mask = np.array([0.0, 0.25, 1.0, 0.5], np.float32).reshape(1, 1, 4, 1)  # per head
    _, cache = forward(params, toks, Hooks({"blocks.1.attn.hook_z": replace(value, mask)},
                                           cache=("blocks.1.attn.hook_z",)))
    np.testing.assert_allclose(cache["blocks.1.attn.hook_z"], x + mask * (value - x), atol=1e-6)


def test_replace_without_mask_and_scalar_value(gpt2):
    cfg, params, forward = gpt2
    _, cache = forward(params, tokens(cfg), Hooks({"blocks.0.mlp.hook_post": replace(0.0)},
                                                  cache=("blocks.0.mlp.hook_post", "blocks.0.hook_mlp_out")))
    assert not np.asarray(cache["blocks.0.mlp.hook_post"]).any()
    # A zero-ablated MLP outputs exactly its output bias.
    np.testing.assert_allclose(cache["blocks.0.hook_mlp_out"],
                               np.broadcast_to(params["blocks"]["mlp"]["b_out"][0], (BATCH, POS, cfg.d_model)),
                               atol=1e-6)


def test_add_and_replace_then_add(llama):
    cfg, params, forward = llama
    toks = tokens(cfg)
    _, clean = _clean(forward, params, toks, ("hook_embed",))
    x = np.asarray(clean["hook_embed"])
    rng = np.random.default_rng(3)
    delta = rng.normal(size=(1, POS, cfg.d_model)).astype(np.float32)  # broadcast over batch
    _, cache = forward(params, toks, Hooks({"hook_embed": add(delta)}, cache=("hook_embed",)))
    np.testing.assert_allclose(cache["hook_embed"], x + delta, atol=1e-6)
    value = rng.normal(size=x.shape).astype(np.float32)
    mask = rng.random((BATCH, POS, 1)) < 0.5
    both = jaxcirc.Intervention(replace=value, mask=mask, add=delta)
    _, cache = forward(params, toks, Hooks({"hook_embed": both}, cache=("hook_embed",)))
    np.testing.assert_allclose(cache["hook_embed"], np.where(mask, value, x) + delta, atol=1e-6)


def test_interventions_at_several_layers_of_one_template(llama):
    """Adds at layers 0 and 2 of hook_resid_post (stacked inside the scan), none at layer 1."""
    cfg, params, forward = llama
    rng = np.random.default_rng(4)
    d0, d2 = (rng.normal(size=(BATCH, POS, cfg.d_model)).astype(np.float32) for _ in range(2))
    names = tuple(f"blocks.{l}.{t}" for l in range(3) for t in ("hook_resid_pre", "hook_resid_mid", "hook_mlp_out",
                                                                 "hook_resid_post"))
    hooks = Hooks({"blocks.0.hook_resid_post": add(d0), "blocks.2.hook_resid_post": add(d2)}, cache=names)
    logits, cache = forward(params, tokens(cfg), hooks)
    c = {k: np.asarray(v) for k, v in cache.items()}
    np.testing.assert_allclose(c["blocks.0.hook_resid_post"], c["blocks.0.hook_resid_mid"] + c["blocks.0.hook_mlp_out"] + d0, atol=1e-5)
    np.testing.assert_allclose(c["blocks.1.hook_resid_post"], c["blocks.1.hook_resid_mid"] + c["blocks.1.hook_mlp_out"], atol=1e-5)
    np.testing.assert_allclose(c["blocks.2.hook_resid_post"], c["blocks.2.hook_resid_mid"] + c["blocks.2.hook_mlp_out"] + d2, atol=1e-5)
    np.testing.assert_allclose(c["blocks.1.hook_resid_pre"], c["blocks.0.hook_resid_post"])
    # The logits are the (independently computed) unembedding of the final patched residual.
    np.testing.assert_allclose(logits, rms_unembed(cfg, params, c["blocks.2.hook_resid_post"]), atol=1e-4)


def test_replacing_the_final_residual_sets_the_logits(llama):
    cfg, params, forward = llama
    value = np.random.default_rng(5).normal(size=(BATCH, POS, cfg.d_model)).astype(np.float32)
    logits, _ = forward(params, tokens(cfg), Hooks({"blocks.2.hook_resid_post": replace(value)}))
    np.testing.assert_allclose(logits, rms_unembed(cfg, params, value), atol=1e-4)


def test_intervention_on_one_layer_leaves_earlier_layers_alone(llama):
    cfg, params, forward = llama
    toks = tokens(cfg)
    names = ("blocks.*.hook_resid_post",)
    _, clean = _clean(forward, params, toks, names)
    _, patched = forward(params, toks, Hooks({"blocks.1.attn.hook_pattern": replace(1.0 / POS)}, cache=names))
    np.testing.assert_array_equal(patched["blocks.0.hook_resid_post"], clean["blocks.0.hook_resid_post"])
    assert np.abs(np.asarray(patched["blocks.1.hook_resid_post"]) - np.asarray(clean["blocks.1.hook_resid_post"])).max() > 1e-3


# ----------------------------------------------------------------------------- vmap and grad


def _logit_diff(cfg, logits):
    return logits[:, 3] - logits[:, 7]  # [batch]: an arbitrary answer-minus-foil metric


def test_vmap_over_masks_equals_a_loop_of_single_runs(llama):
    """An activation-patching sweep over (layer, pos) of resid_pre as one vmapped program."""
    cfg, params, forward = llama
    clean, corrupt = tokens(cfg, seed=10), tokens(cfg, seed=11)
    names = tuple(f"blocks.{l}.hook_resid_pre" for l in range(cfg.n_layers))
    _, corrupt_cache = forward(params, corrupt, Hooks(cache=names))
    last = jnp.full((BATCH,), POS - 1)

    def metric(masks):  # masks [layer, pos] bool
        hooks = Hooks({n: replace(corrupt_cache[n], masks[l].reshape(1, POS, 1)) for l, n in enumerate(names)})
        return _logit_diff(cfg, forward(params, clean, hooks, logits_at=last)[0])

    patches = np.zeros((cfg.n_layers * POS, cfg.n_layers, POS), bool)
    for i in range(cfg.n_layers * POS):
        patches[i, i // POS, i % POS] = True
    swept = np.asarray(jax.jit(jax.vmap(metric))(jnp.asarray(patches)))
    assert swept.shape == (cfg.n_layers * POS, BATCH)
    for i in range(cfg.n_layers * POS):
        layer, pos = divmod(i, POS)
        hooks = Hooks({names[layer]: replace(corrupt_cache[names[layer]][:, pos:pos + 1],
                                             np.arange(POS).reshape(1, POS, 1) == pos)})
        single = _logit_diff(cfg, forward(params, clean, hooks, logits_at=last)[0])
        np.testing.assert_allclose(swept[i], single, atol=1e-5, err_msg=f"layer {layer} pos {pos}")
    # Different patches have different effects: the sweep is not trivially constant.
    assert np.abs(swept - swept[0]).max() > 1e-3


def test_vmap_over_add_deltas(gpt2):
    cfg, params, forward = gpt2
    toks = tokens(cfg)
    deltas = np.random.default_rng(6).normal(size=(5, 1, 1, cfg.n_heads, cfg.d_head)).astype(np.float32)

    def run(delta):
        return forward(params, toks, Hooks({"blocks.1.attn.hook_z": add(delta)}))[0]

    batched = jax.vmap(run)(jnp.asarray(deltas))
    for i in range(len(deltas)):
        np.testing.assert_allclose(batched[i], run(deltas[i]), atol=1e-5)


def test_grad_of_add_delta_matches_finite_differences(llama):
    cfg, params, forward = llama
    toks = tokens(cfg)
    name = "blocks.1.attn.hook_z"
    shape = expected_shape(cfg, name)

    @jax.jit
    def metric(delta):
        logits = forward(params, toks, Hooks({name: add(delta)}), logits_at=jnp.full((BATCH,), POS - 1))[0]
        return _logit_diff(cfg, logits).sum()

    grad = np.asarray(jax.grad(metric)(jnp.zeros(shape)))
    assert np.abs(grad).max() > 1e-3
    rng = np.random.default_rng(7)
    for _ in range(3):
        direction = rng.normal(size=shape).astype(np.float32)
        eps = 1e-2
        fd = (float(metric(eps * direction)) - float(metric(-eps * direction))) / (2 * eps)
        np.testing.assert_allclose((grad * direction).sum(), fd, rtol=2e-2, atol=1e-3)

    # The gradient with respect to the delta at 0 is the gradient with respect to the activation.
    _, clean = forward(params, toks, Hooks(cache=(name,)))

    def metric_of_activation(z):
        logits = forward(params, toks, Hooks({name: replace(z)}), logits_at=jnp.full((BATCH,), POS - 1))[0]
        return _logit_diff(cfg, logits).sum()

    np.testing.assert_allclose(jax.grad(metric_of_activation)(clean[name]), grad, atol=1e-5)


def test_grad_of_float_mask(gpt2):
    """d metric / d mask at 0 = <grad wrt activation, value - x> (the attribution-patching estimate)."""
    cfg, params, forward = gpt2
    toks, corrupt = tokens(cfg, 0), tokens(cfg, 1)
    name = "blocks.0.hook_resid_post"
    _, clean_cache = forward(params, toks, Hooks(cache=(name,)))
    _, corrupt_cache = forward(params, corrupt, Hooks(cache=(name,)))

    def metric_mask(m):
        return _logit_diff(cfg, forward(params, toks, Hooks({name: replace(corrupt_cache[name], m)}))[0][:, -1]).sum()

    def metric_act(x):
        return _logit_diff(cfg, forward(params, toks, Hooks({name: replace(x)}))[0][:, -1]).sum()

    g_mask = jax.grad(metric_mask)(jnp.zeros((1, POS, 1)))
    g_act = jax.grad(metric_act)(clean_cache[name])
    expected = (g_act * (corrupt_cache[name] - clean_cache[name])).sum(axis=(0, 2)).reshape(1, POS, 1)
    np.testing.assert_allclose(g_mask, expected, atol=1e-4)


@pytest.mark.parametrize("fixture", ["llama", "gpt2"])
def test_joint_forward_equals_separate_runs_and_their_gradients(fixture, request):
    """Runs of different batch, length and hooks sharing one layer scan give each run's own logits,
    caches and gradients; a run the gradient does not reach changes nothing."""
    cfg, params, forward = request.getfixturevalue(fixture)
    joint = make_joint_forward(cfg)
    a, b = tokens(cfg, 1), tokens(cfg, 2, batch=3, pos=POS + 2)
    names = ("blocks.0.hook_resid_pre", "blocks.1.attn.hook_z", "blocks.*.hook_mlp_out")
    hooks_a = Hooks({"blocks.1.hook_resid_mid": add(jnp.linspace(-1.0, 1.0, cfg.d_model).reshape(1, 1, -1))}, cache=names)
    head_1 = (jnp.arange(cfg.n_heads) == 1).reshape(1, 1, cfg.n_heads, 1)
    hooks_b = Hooks({"blocks.0.attn.hook_z": replace(0.0, head_1)}, cache=names)
    at_b = jnp.asarray([POS + 1, 3, 0])
    (logits_a, cache_a), (logits_b, cache_b) = joint(params, [Run(a, hooks_a), Run(b, hooks_b, logits_at=at_b)])
    for (logits, cache), (want_logits, want_cache) in (((logits_a, cache_a), forward(params, a, hooks_a)),
                                                       ((logits_b, cache_b), forward(params, b, hooks_b, logits_at=at_b))):
        np.testing.assert_allclose(logits, want_logits, atol=1e-5)
        assert sorted(cache) == sorted(want_cache)
        for name in cache:
            np.testing.assert_allclose(cache[name], want_cache[name], atol=1e-5)
    assert not np.allclose(logits_a, forward(params, a)[0], atol=1e-3)  # the hooks did act

    name, last = "blocks.1.attn.hook_z", jnp.full((BATCH,), POS - 1)

    def metric(delta, with_b):
        runs = [Run(a, Hooks({name: add(delta)}), logits_at=last)] + ([Run(b)] if with_b else [])
        return _logit_diff(cfg, joint(params, runs)[0][0]).sum()

    def alone(delta):
        return _logit_diff(cfg, forward(params, a, Hooks({name: add(delta)}), logits_at=last)[0]).sum()

    zero = jnp.zeros(expected_shape(cfg, name))
    want = jax.grad(alone)(zero)
    assert np.abs(want).max() > 1e-3
    for with_b in (False, True):
        np.testing.assert_allclose(jax.grad(metric)(zero, with_b), want, atol=1e-6)
    with pytest.raises(ValueError, match="at least one Run"):
        joint(params, [])
    with pytest.raises(ValueError, match="logits_columns needs logits_at"):
        joint(params, [Run(a), Run(b, logits_columns=jnp.zeros((3, 2), jnp.int32))])


# ----------------------------------------------------------------------------- opt-in points


def test_per_head_inputs_leave_logits_unchanged(llama):
    cfg, params, forward = llama
    toks = tokens(cfg)
    clean_logits, _ = forward(params, toks)
    names = ("blocks.1.hook_q_input", "blocks.1.hook_k_input", "blocks.1.hook_v_input")
    logits, cache = forward(params, toks, Hooks(cache=names))
    np.testing.assert_allclose(logits, clean_logits, atol=1e-5)
    assert cache["blocks.1.hook_q_input"].shape == (BATCH, POS, cfg.n_heads, cfg.d_model)
    assert cache["blocks.1.hook_k_input"].shape == (BATCH, POS, cfg.n_kv_heads, cfg.d_model)
    # Intervening with a zero delta is a no-op too.
    zero = jnp.zeros((1, 1, cfg.n_heads, cfg.d_model))
    logits, _ = forward(params, toks, Hooks({"blocks.1.hook_q_input": add(zero)}))
    np.testing.assert_allclose(logits, clean_logits, atol=1e-5)


def test_per_head_input_changes_only_its_head(llama):
    cfg, params, forward = llama
    toks = tokens(cfg)
    names = ("blocks.1.attn.hook_q", "blocks.1.attn.hook_k")
    _, clean = forward(params, toks, Hooks(cache=names))
    delta = np.zeros((1, 1, cfg.n_heads, cfg.d_model), np.float32)
    delta[..., 2, :] = np.random.default_rng(8).normal(size=cfg.d_model)
    _, cache = forward(params, toks, Hooks({"blocks.1.hook_q_input": add(delta)}, cache=names))
    q, q0 = np.asarray(cache["blocks.1.attn.hook_q"]), np.asarray(clean["blocks.1.attn.hook_q"])
    changed = np.abs(q - q0).max(axis=(0, 1, 3))
    assert changed[2] > 1e-2 and np.all(np.delete(changed, 2) < 1e-5)
    np.testing.assert_allclose(cache["blocks.1.attn.hook_k"], clean["blocks.1.attn.hook_k"], atol=1e-5)


def test_hook_result_sums_to_attn_out(gpt2):
    cfg, params, forward = gpt2
    toks = tokens(cfg)
    clean_logits, _ = forward(params, toks)
    logits, cache = forward(params, toks, Hooks(cache=("blocks.*.attn.hook_result", "blocks.*.hook_attn_out")))
    np.testing.assert_allclose(logits, clean_logits, atol=1e-5)
    for l in range(cfg.n_layers):
        result = np.asarray(cache[f"blocks.{l}.attn.hook_result"])
        assert result.shape == (BATCH, POS, cfg.n_heads, cfg.d_model)
        b_O = np.asarray(params["blocks"]["attn"]["b_O"][l])
        assert np.abs(b_O).max() > 0.05  # a real bias, so forgetting it would fail
        np.testing.assert_allclose(result.sum(axis=2) + b_O, cache[f"blocks.{l}.hook_attn_out"], atol=1e-5)


def test_ablating_one_head_via_hook_result(gpt2):
    cfg, params, forward = gpt2
    toks = tokens(cfg)
    names = ("blocks.0.attn.hook_result", "blocks.0.hook_attn_out")
    _, clean = forward(params, toks, Hooks(cache=names))
    mask = (np.arange(cfg.n_heads) == 1).reshape(1, 1, cfg.n_heads, 1)
    _, cache = forward(params, toks, Hooks({"blocks.0.attn.hook_result": replace(0.0 * mask, mask)}, cache=names))
    np.testing.assert_allclose(cache["blocks.0.hook_attn_out"],
                               np.asarray(clean["blocks.0.hook_attn_out"]) - np.asarray(clean["blocks.0.attn.hook_result"])[:, :, 1],
                               atol=1e-5)


# ----------------------------------------------------------------------------- errors


def test_unknown_hook_name_names_the_closest(llama):
    cfg, params, forward = llama
    with pytest.raises(jaxcirc.HookNameError) as info:
        forward(params, tokens(cfg), Hooks({"blocks.1.attn.hook_zz": add(0.0)}))
    assert "blocks.1.attn.hook_z" in str(info.value) and "hook_zz" in str(info.value)
    assert isinstance(info.value, KeyError)
    with pytest.raises(jaxcirc.HookNameError, match="blocks.0.hook_resid_pre"):
        forward(params, tokens(cfg), Hooks(cache=("blocks.0.hook_resid_pr",)))
    with pytest.raises(jaxcirc.HookNameError, match="3 layers"):
        forward(params, tokens(cfg), Hooks(cache=("blocks.7.hook_resid_pre",)))
    with pytest.raises(jaxcirc.HookNameError, match="attn.hook_pattern"):
        forward(params, tokens(cfg), Hooks(cache=("blocks.*.attn.hook_patern",)))


def test_learned_position_hook_only_where_it_exists(llama):
    cfg, params, forward = llama
    with pytest.raises(jaxcirc.HookNameError, match="hook_pos_embed"):
        forward(params, tokens(cfg), Hooks(cache=("hook_pos_embed",)))


@pytest.mark.parametrize("field,shape", [("add", (BATCH, POS, 8)), ("add", (BATCH, POS, 4, 8, 1)),
                                         ("replace", (3, POS, 4, 8)), ("add", (BATCH, POS + 1, 4, 8))])
def test_wrong_shape_is_a_clear_error(llama, field, shape):
    cfg, params, forward = llama
    iv = jaxcirc.Intervention(**{field: np.zeros(shape, np.float32)})
    with pytest.raises(ValueError) as info:
        forward(params, tokens(cfg), Hooks({"blocks.0.attn.hook_z": iv}))
    message = str(info.value)
    assert "blocks.0.attn.hook_z" in message and str(shape) in message and "head=4" in message


def test_mask_without_value_is_refused():
    with pytest.raises(ValueError, match="mask"):
        jaxcirc.Intervention(mask=np.ones(3, bool))


def test_hook_value_must_be_an_intervention():
    with pytest.raises(TypeError, match="jaxcirc.add"):
        Hooks({"hook_embed": np.zeros(3)})
