"""Token shuffles, position-id permutations, their losses, and LM-Infinite attention against an
independent NumPy forward of the same tiny Llama."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcirc.hooks import Hooks
from jaxcirc.model import Model
from jaxcirc.models.config import ModelConfig, RopeConfig
from jaxcirc.models.transformer import init_params
from jaxcirc.models.config import AttentionWindow
from jaxcirc.position_perturbation import (apply_permutation, perturbation_curve, permutations, shuffle_permutation,
                                           token_nll, windowed_nll, with_attention_window)

CFG = ModelConfig(family="llama", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_head=8, d_mlp=64,
                  d_vocab=50, n_ctx=64, norm="rmsnorm", activation="silu", gated_mlp=True, positional="rotary",
                  rope=RopeConfig(theta=10000.0, rotary_dim=8), tied_embeddings=False, initializer_range=0.3)
N = 20


@pytest.fixture(scope="module")
def model():
    return Model(CFG, init_params(CFG, 0))


@pytest.fixture(scope="module")
def tokens():
    return np.asarray(jax.random.randint(jax.random.key(1), (3, N), 0, CFG.d_vocab))


@pytest.mark.parametrize("n", [20, 101, 256])
@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 1.0])
def test_shuffle_moves_the_requested_fraction(n, fraction):
    rng = np.random.default_rng(0)
    perm, moved = shuffle_permutation(n, fraction, rng)
    eligible = n - 1
    expected = int(round(fraction * eligible))
    expected = 2 if expected == 1 else expected
    assert moved.sum() == expected
    assert sorted(perm) == list(range(n)) and perm[0] == 0  # a permutation; the first token stays
    np.testing.assert_array_equal(moved, perm != np.arange(n))
    tokens = np.arange(100, 100 + n)[None]
    shuffled = np.asarray(apply_permutation(tokens, perm[None]))
    assert (shuffled != tokens).sum() == expected  # every chosen token really changes place
    np.testing.assert_array_equal(np.sort(shuffled), tokens)
    again = permutations(2, n, fraction, seed=3)
    np.testing.assert_array_equal(again, permutations(2, n, fraction, seed=3))  # reproducible from the seed
    # Local transpositions: the same count (rounded up to even), each token moved by one place.
    perm, moved = shuffle_permutation(n, fraction, rng, style="adjacent")
    if fraction <= 0.2:
        assert moved.sum() == expected + expected % 2
    else:  # every pair of the tiling is swapped
        assert moved.sum() >= eligible - 2
    assert sorted(perm) == list(range(n)) and perm[0] == 0
    assert np.abs(perm - np.arange(n)).max() <= 1


def test_token_nll_matches_log_softmax_of_the_forward(model, tokens):
    nll, hit = token_nll(model, tokens, batch_size=2)  # 3 sequences: one padded chunk
    logits, _ = model.forward(model.params, jnp.asarray(tokens))
    logits = np.asarray(logits, np.float64)[:, :-1]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    expected = -np.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(nll, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(hit, logits.argmax(-1) == tokens[:, 1:])


def test_perplexity_unchanged_at_zero_and_changed_above(model, tokens):
    curve = perturbation_curve(model, tokens, fractions=(0.0, 0.2), seeds=(0, 1), batch_size=3)
    clean, _ = token_nll(model, tokens, batch_size=3)
    for mi in range(len(curve.modes)):
        np.testing.assert_allclose(curve.ppl[mi, 0], np.exp(clean.mean()), rtol=1e-5)
        np.testing.assert_allclose(curve.ppl_unmoved[mi, 0], curve.clean_ppl_unmoved[mi, 0], rtol=1e-5)
        assert np.all(curve.ppl[mi, 1] != curve.ppl[mi, 0])
    np.testing.assert_allclose(curve.moved_fraction[:, 1], 4 / (N - 1))  # round(0.2 * 19) = 4
    # The position-id mode is the forward with the permutation as position ids.
    assert curve.modes == ("tokens", "adjacent", "position_ids")
    perm = permutations(len(tokens), N, 0.2, seed=0)
    nll, _ = token_nll(model, tokens, position_ids=perm, batch_size=3)
    np.testing.assert_allclose(curve.ppl[2, 1, 0], np.exp(nll.mean()), rtol=1e-5)


# ----------------------------------------------------------------------------- LM-Infinite


def _reference_forward(params, tokens, allowed, distance):
    """The tiny Llama in NumPy float64, attention restricted to `allowed` [n, n] (or one such mask
    per layer) with the RoPE rotation of each (query, key) pair taken at `distance` [n, n]."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    theta = CFG.rope.theta ** (-np.arange(0, 8, 2) / 8)

    def norm(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + CFG.norm_eps) * w

    def rotate(v, d):  # rotate-half RoPE of v [..., 8] by angle d * theta
        angle = d[..., None] * theta
        c, s = np.cos(angle), np.sin(angle)
        a, b = v[..., :4], v[..., 4:]
        return np.concatenate([a * c - b * s, b * c + a * s], -1)

    x = p["W_E"][tokens]  # [n, d]
    n = len(tokens)
    per_layer = allowed if isinstance(allowed, list) else [allowed] * CFG.n_layers
    for layer in range(CFG.n_layers):
        allowed = per_layer[layer]
        blk = jax.tree.map(lambda a: a[layer], p["blocks"])
        h = norm(x, blk["ln1"]["w"])
        q = np.einsum("pd,dhk->phk", h, blk["attn"]["W_Q"])
        k = np.einsum("pd,dhk->phk", h, blk["attn"]["W_K"])
        v = np.einsum("pd,dhk->phk", h, blk["attn"]["W_V"])
        z = np.zeros((n, CFG.n_heads, 8))
        for head in range(CFG.n_heads):
            kv = head // 2
            scores = np.full((n, n), -np.inf)
            for i in range(n):
                for j in range(n):
                    if allowed[i, j]:
                        scores[i, j] = rotate(q[i, head], np.array(distance[i, j], float)) @ k[j, kv] / np.sqrt(8)
            weights = np.exp(scores - scores.max(-1, keepdims=True))
            weights /= weights.sum(-1, keepdims=True)
            z[:, head] = weights @ v[:, kv]
        x = x + np.einsum("phk,hkd->pd", z, blk["attn"]["W_O"])
        h = norm(x, blk["ln2"]["w"])
        gate = h @ blk["mlp"]["W_gate"]
        x = x + (gate / (1 + np.exp(-gate)) * (h @ blk["mlp"]["W_in"])) @ blk["mlp"]["W_out"]
    return norm(x, p["ln_final"]["w"]) @ p["W_U"]


def _lambda_mask(n, n_global, n_local):
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    return (j <= i) & ((i - j < n_local) | (j < n_global))


def test_lm_infinite_matches_an_independent_forward(model, tokens):
    window = AttentionWindow(n_global=2, n_local=4, max_distance=5)
    windowed = with_attention_window(model, window)
    logits, cache = windowed.forward(model.params, jnp.asarray(tokens[:2]), Hooks(cache=("blocks.1.attn.hook_pattern",)))
    i, j = np.arange(N)[:, None], np.arange(N)[None, :]
    allowed = _lambda_mask(N, 2, 4)
    assert allowed[10, 1] and allowed[10, 7] and not allowed[10, 5] and not allowed[3, 4]
    for b in range(2):
        expected = _reference_forward(model.params, tokens[b], allowed, np.minimum(i - j, window.max_distance))
        np.testing.assert_allclose(logits[b], expected, rtol=2e-4, atol=2e-4)
    # Hooks see the windowed attention: nothing outside the Lambda.
    pattern = np.asarray(cache["blocks.1.attn.hook_pattern"])
    assert np.all(pattern[:, :, ~allowed] == 0) and np.allclose(pattern.sum(-1), 1, atol=1e-5)
    # Without a cap only the mask changes.
    masked, _ = with_attention_window(model, AttentionWindow(2, 4)).forward(model.params, jnp.asarray(tokens[:1]))
    np.testing.assert_allclose(masked[0], _reference_forward(model.params, tokens[0], allowed, i - j), rtol=2e-4, atol=2e-4)
    # A window that allows everything is the plain model.
    nll, _ = windowed_nll(model, tokens, AttentionWindow(0, N, N), batch_size=3)
    np.testing.assert_allclose(nll, token_nll(model, tokens, batch_size=3)[0], atol=1e-5)


def test_per_layer_sliding_windows_match_an_independent_forward(model, tokens):
    cfg = CFG.replace(layer_windows=(3, 0))  # layer 0 slides over 3 tokens, layer 1 sees everything
    logits, _ = Model(cfg, model.params).forward(model.params, jnp.asarray(tokens[:1]))
    i, j = np.arange(N)[:, None], np.arange(N)[None, :]
    per_layer = [(j <= i) & (i - j < 3), j <= i]
    np.testing.assert_allclose(logits[0], _reference_forward(model.params, tokens[0], per_layer, i - j),
                               rtol=2e-4, atol=2e-4)
    with pytest.raises(ValueError, match="one window >= 0 per layer"):
        CFG.replace(layer_windows=(3,))


class _ByteTokenizer:
    """Stand-in tokenizer for a tiny vocabulary: one token per byte, modulo the vocabulary."""

    def encode(self, text, add_bos=None):
        return [b % CFG.d_vocab for b in text.encode()]


def test_position_command_writes_a_run_directory(tmp_path):
    from jaxcirc.position_report import natural_text, position_command
    from jaxcirc.rundir import read_run

    assert len(natural_text().split()) > 3000 and not natural_text().startswith("#")
    model = Model(CFG, init_params(CFG, 0), tokenizer=_ByteTokenizer(), source="tiny")
    out = position_command(model, tmp_path / "run", n_texts=2, seq_len=16, inits=("hf_normal_0.02",), random_texts=2,
                           perturb_texts=1, fractions=(0.0, 0.1), n_queries=2, lm_infinite_len=0, show_progress=False)
    results, arrays = read_run(out)
    assert arrays["trained__r"].shape == (CFG.n_layers, 2, CFG.n_heads)
    assert results["arrays"]["trained__r"]["dims"] == ["layer", "text", "head"]
    assert arrays["hf_normal_0p02_seed0__dummy_r"].shape == (CFG.n_layers, 2, CFG.n_heads, 2)
    assert arrays["perturb__ppl"].shape == (3, 2, 1)
    summary = results["scalars"]["summary"]
    assert set(summary) == {"trained", "hf_normal_0.02"} and 0 <= summary["trained"]["r"]["mean"] <= 1
    assert (out / "figures" / "r_histogram.png").exists() and "0.959" in (out / "report.md").read_text()
