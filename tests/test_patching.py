"""Exact activation patching sweeps against a plain Python loop of single patched forwards.

The loop reference is deliberately independent of the sweep's machinery: it runs the forward
eagerly (`jax.disable_jit`, so the layer scan is a Python loop), hooks only the patched layer,
builds masks and mean sources in NumPy, and computes metrics in NumPy.
"""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxcirc.hooks import Hooks, replace
from jaxcirc.memory import MemoryBudgetError
from jaxcirc.model import Model
from jaxcirc.models.config import ModelConfig, RopeConfig
from jaxcirc.models.resume import key_mask, packed_pair, pair_slots, partner_position
from jaxcirc.models.transformer import make_forward, param_shapes
from jaxcirc.pairs import from_tokens
from jaxcirc.patching import (PatchResult, after_heads, chunking, compile_log, estimate_patch_bytes,
                              patch_sweep, resolve_site, resume_schedule)

VOCAB = 41

# Equal widths across families (d_model 24, 4 heads of 6, d_mlp 48): the eager reference then
# reuses compiled ops across models.
CONFIGS = {
    "gpt2": ModelConfig(family="gpt2", n_layers=2, d_model=24, n_heads=4, d_head=6, d_mlp=48, d_vocab=VOCAB,
                        n_ctx=32, qkv_bias=True, o_bias=True, mlp_bias=True),
    "llama": ModelConfig(family="llama", n_layers=2, d_model=24, n_heads=4, n_kv_heads=2, d_head=6, d_mlp=48,
                         d_vocab=VOCAB, n_ctx=32, norm="rmsnorm", activation="silu", gated_mlp=True,
                         positional="rotary", rope=RopeConfig(theta=10000.0, rotary_dim=6), tied_embeddings=False),
    "pythia": ModelConfig(family="gpt_neox", n_layers=2, d_model=24, n_heads=4, d_head=6, d_mlp=48, d_vocab=VOCAB,
                          n_ctx=32, norm="layernorm", activation="gelu", parallel_residual=True,
                          positional="rotary", rope=RopeConfig(theta=10000.0, rotary_dim=2), tied_embeddings=False,
                          qkv_bias=True, o_bias=True, mlp_bias=True),
    # Gemma-2-style switches the resumed forward must reproduce: post-norms, soft caps, a query
    # scale, a sliding window in layer 0 (2 tokens) and interleaved rotary.
    "gemma_like": ModelConfig(family="llama", n_layers=2, d_model=24, n_heads=4, n_kv_heads=2, d_head=6, d_mlp=48,
                              d_vocab=VOCAB, n_ctx=32, norm="rmsnorm", activation="gelu_pytorch_tanh",
                              gated_mlp=True, positional="rotary",
                              rope=RopeConfig(theta=10000.0, rotary_dim=6, interleaved=True), post_norms=True,
                              query_scale=0.3, attn_softcap=2.0, final_softcap=5.0, layer_windows=(2, 0)),
}


def random_params(cfg: ModelConfig, seed: int) -> dict:
    """NumPy-drawn params (no XLA compile per shape): weights N(0, 0.3^2), biases N(0, 0.1^2),
    norm weights 1 + N(0, 0.1^2), so logits are far from uniform."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        keys = [getattr(k, "key", str(k)) for k in path]
        if any(str(k).startswith("ln") for k in keys) and keys[-1] == "w":
            value = 1 + 0.1 * rng.normal(size=leaf.shape)
        elif keys[-1].startswith("b"):
            value = 0.1 * rng.normal(size=leaf.shape)
        else:
            value = 0.3 * rng.normal(size=leaf.shape)
        return value.astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, param_shapes(cfg))


@pytest.fixture(scope="module")
def models():
    return {name: Model(cfg, random_params(cfg, i)) for i, (name, cfg) in enumerate(CONFIGS.items())}


@pytest.fixture(scope="module")
def pairs():
    """Three pairs of lengths 5, 3, 5 (the second right-padded), differing at two positions."""
    rng = np.random.default_rng(7)
    clean = [rng.integers(0, VOCAB, n).tolist() for n in (5, 3, 5)]
    corrupt = [list(c) for c in clean]
    for c in corrupt:
        c[0] = (c[0] + 1) % VOCAB
        c[-2] = (c[-2] + 5) % VOCAB
    return from_tokens(clean, corrupt, answer=[3, 9, 17], foil=[4, 30, 2], pad_id=0)


# ---------------------------------------------------------------------------- the loop reference

def _log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_metric(name, logits, p, clean_logits):
    rows = np.arange(len(logits))
    lp = _log_softmax(logits)
    if name == "logit_diff":
        return np.float64(logits[rows, p["answer"]]) - logits[rows, p["foil"]]
    if name == "logprob":
        return lp[rows, p["answer"]]
    if name == "prob_diff":
        return np.exp(lp[rows, p["answer"]]) - np.exp(lp[rows, p["foil"]])
    lq = _log_softmax(clean_logits)
    return (np.exp(lq) * (lq - lp)).sum(-1)


def loop_reference(model, pairs, site, by, direction, source, metric, max_cells=12):
    """(per-pair patched metric [*by, pair], clean metric, corrupt metric) by single patched forwards.

    Grids larger than `max_cells` are sampled (fixed seed); the fourth output marks the cells run."""
    cfg, params = model.config, model.params
    spec = resolve_site(cfg, site, by)
    template, dims = spec.template, spec.dims
    forward = make_forward(cfg, jit=False)
    p = {f: np.asarray(getattr(pairs, f)) for f in ("clean", "corrupt", "answer", "foil", "position", "mask")}
    batch, pos = p["clean"].shape
    names = [f"blocks.{l}.{template}" for l in range(cfg.n_layers)]
    base, other = (p["clean"], p["corrupt"]) if direction == "noising" else (p["corrupt"], p["clean"])

    def logits_of(tokens, hooks=None):
        with jax.disable_jit():
            return np.asarray(forward(params, tokens, hooks, logits_at=p["position"])[0], np.float64)

    clean_logits = logits_of(p["clean"])
    clean_m = np_metric(metric, clean_logits, p, clean_logits)
    corrupt_m = np_metric(metric, logits_of(p["corrupt"]), p, clean_logits)
    with jax.disable_jit():
        cache = forward(params, other, Hooks(cache=tuple(names)))[1]
    acts = np.stack([np.asarray(cache[n], np.float64) for n in names])  # [layer, *act]
    shape = acts.shape[1:]

    real = np.ones(shape, bool)  # real tokens in every positional dim
    b_axis = dims.index("batch")
    for axis, d in enumerate(dims):
        if d in ("pos", "q_pos", "k_pos"):
            sel = [None] * len(dims)
            sel[b_axis], sel[axis] = slice(None), slice(None)
            real = real & p["mask"][tuple(sel)]
    if source == "resample":
        values = acts
    elif source == "zero":
        values = np.zeros_like(acts)
    else:
        axes = (b_axis,) + ((dims.index("pos"),) if source == "mean" and "pos" in dims else ())
        axes = tuple(a + 1 for a in axes)
        w = np.broadcast_to(real, acts.shape)
        values = np.broadcast_to((acts * w).sum(axes, keepdims=True) / np.maximum(w.sum(axes, keepdims=True), 1),
                                 acts.shape)

    sizes = [cfg.n_layers if d == "layer" else shape[dims.index(d)] for d in spec.by]
    out = np.full(tuple(sizes) + (batch,), np.nan)
    cells = list(itertools.product(*map(range, sizes)))
    if len(cells) > max_cells:
        picked = np.random.default_rng(0).choice(len(cells), max_cells, replace=False)
        cells = [cells[i] for i in sorted(picked)]
    for cell in cells:
        at = dict(zip(spec.by, cell))
        mask = real.copy()
        for d, i in at.items():
            if d != "layer":
                index = [slice(None)] * len(dims)
                keep = np.zeros(shape, bool)
                index[dims.index(d)] = i
                keep[tuple(index)] = True
                mask &= keep
        layer = at["layer"]
        hooks = Hooks({names[layer]: replace(values[layer].astype(np.float32), mask)})
        value = np_metric(metric, logits_of(base, hooks), p, clean_logits)
        valid = np.ones(batch, bool)
        for d in ("pos", "q_pos"):
            if d in at:
                valid &= p["mask"][:, at[d]]
        out[cell] = np.where(valid, value, np.nan)
    ran = np.zeros(tuple(sizes), bool)
    for cell in cells:
        ran[cell] = True
    return out, clean_m, corrupt_m, ran


# ---------------------------------------------------------------------------- sweeps vs the loop

CASES = [
    # model, site, by, direction, source, metric: every site family, both directions, every source
    # and metric, grouped-query k/v, parallel residual. (TransformerLens parity adds z by (layer, head).)
    ("gpt2", "resid_pre", ("layer", "pos"), "denoising", "resample", "logit_diff"),
    ("gpt2", "z", ("layer", "head", "pos"), "noising", "pos_mean", "logprob"),
    ("gpt2", "pattern", ("layer", "head"), "noising", "mean", "kl"),
    ("llama", "k", ("layer", "head"), "denoising", "resample", "prob_diff"),
    ("llama", "v", ("layer", "head"), "noising", "zero", "logit_diff"),
    ("llama", "q", ("layer", "head"), "denoising", "mean", "kl"),
    ("pythia", "resid_pre", ("layer",), "denoising", "resample", "logit_diff"),
    ("pythia", "mlp_out", ("layer", "pos"), "noising", "pos_mean", "prob_diff"),
    ("pythia", "attn_out", ("layer", "pos"), "denoising", "zero", "logprob"),
]


@pytest.mark.parametrize("case", CASES, ids=["-".join(c[:2] + c[3:5]) for c in CASES])
def test_sweep_equals_python_loop(models, pairs, case):
    name, site, by, direction, source, metric = case
    model = models[name]
    with compile_log() as compiled:
        result = patch_sweep(model, pairs, site, by, metric=metric, direction=direction, source=source,
                             max_patches_per_chunk=5)
    assert compiled in ([], ["jit(_resumed_sweep_program)"]), compiled  # one program, whatever the chunks
    expected, clean_m, corrupt_m, ran = loop_reference(model, pairs, site, by, direction, source, metric)

    assert isinstance(result, PatchResult)
    assert result.per_pair.shape == expected.shape and result.patch_effect.shape == expected.shape[:-1]
    np.testing.assert_allclose(result.clean_metric, clean_m, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(result.corrupt_metric, corrupt_m, rtol=1e-4, atol=1e-4)
    # NaNs (padding) must line up too.
    np.testing.assert_allclose(result.per_pair[ran], expected[ran], rtol=1e-4, atol=1e-4)
    with np.errstate(invalid="ignore"):
        np.testing.assert_allclose(result.patch_effect[ran], np.nanmean(expected[ran], -1), rtol=1e-4, atol=1e-4)
    # The sweep must actually move the metric somewhere (a sweep of no-ops would pass the above).
    baseline = clean_m if direction == "noising" else corrupt_m
    assert np.nanmax(np.abs(expected - baseline)) > 1e-3
    if by == ("layer",) and source == "resample" and site == "resid_pre":
        # Denoising every real position of resid_pre at layer 0 is the clean run, padding or not.
        np.testing.assert_allclose(result.per_pair[0], result.clean_metric, rtol=1e-4, atol=1e-4)


def test_padding_positions_are_nan_and_not_counted(models, pairs):
    result = patch_sweep(models["gpt2"], pairs, "resid_pre", ("layer", "pos"), max_patches_per_chunk=5)
    assert result.dims == ("layer", "pos")
    # Pair 1 has 3 real tokens: positions 3 and 4 are padding.
    assert np.isnan(result.per_pair[:, 3:, 1]).all() and not np.isnan(result.per_pair[:, :3, 1]).any()
    np.testing.assert_allclose(result.patch_effect[:, 4], result.per_pair[:, 4, [0, 2]].mean(-1), rtol=1e-6)
    clean, corrupt = result.clean_metric[[0, 2]].mean(), result.corrupt_metric[[0, 2]].mean()
    np.testing.assert_allclose(result.normalised[:, 4], (result.patch_effect[:, 4] - corrupt) / (clean - corrupt),
                               rtol=1e-6)


def test_compiles_once_whatever_the_chunking(models, pairs):
    model = models["gpt2"]
    grid = [[l, q] for l in range(2) for q in range(5)]
    indices = [[-1, -1]] + grid  # the first patch selects nothing
    reference = patch_sweep(model, pairs, "resid_pre", ("layer", "pos"), max_patches_per_chunk=5)
    with compile_log() as compiled:
        result = patch_sweep(model, pairs, "resid_pre", ("layer", "pos"), indices=indices, max_patches_per_chunk=1)
    assert compiled == ["jit(_resumed_sweep_program)"], compiled  # 7 chunks, one compilation
    # 11 patches in 7 rows of packed position suffixes (0+4, 1+3, 2 per layer; the no-op with 1.0).
    assert (result.chunk_size, result.n_chunks, result.dims) == (1, 7, ("patch",))
    # Patching nothing gives the unpatched (corrupted, for denoising) run.
    np.testing.assert_allclose(result.per_pair[0], result.corrupt_metric, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(result.per_pair[1:].reshape(2, 5, -1), reference.per_pair, rtol=1e-5, atol=1e-5)
    with compile_log() as compiled:
        again = patch_sweep(model, pairs, "resid_pre", ("layer", "pos"), indices=indices, max_patches_per_chunk=1)
    assert compiled == [] and np.array_equal(again.per_pair, result.per_pair, equal_nan=True)


def test_memory_budget_chunking():
    assert chunking(10, 100, max_patches_per_chunk=4) == (4, 3)
    assert chunking(10, 100, max_patches_per_chunk=3) == (3, 4)
    assert chunking(10, 100, memory_budget_bytes=450) == (4, 3)  # 4 fit, evened out over 3 chunks
    assert chunking(10, 100, memory_budget_bytes=50, max_patches_per_chunk=1) == (1, 10)  # forced
    with pytest.raises(MemoryBudgetError, match="needs 100 bytes"):  # one patch does not fit: say so
        chunking(10, 100, memory_budget_bytes=50)
    assert chunking(10, 100) == (10, 1)
    cfg = CONFIGS["gpt2"]
    small, large = estimate_patch_bytes(cfg, 2, 8), estimate_patch_bytes(cfg, 4, 16)
    assert 0 < small < large


def test_result_metadata(models, pairs):
    # The same program as the llama k case above (compiled once for both).
    result = patch_sweep(models["llama"], pairs, "k", "layer,head", max_patches_per_chunk=5,
                         metric="prob_diff", direction="denoising", source="resample")
    assert result.dims == ("layer", "kv_head") and result.patch_effect.shape == (2, 2)
    meta = result.metadata()
    assert meta["hook"] == "attn.hook_k" and meta["metric"] == "prob_diff" and meta["n_patches"] == 4
    arrays = result.arrays()
    assert arrays["patch_effect"][1] == ("layer", "kv_head")
    assert arrays["patch_effect_per_pair"][0].shape == (2, 2, 3)
    np.testing.assert_allclose(result.change, np.nanmean(result.per_pair - result.corrupt_metric, -1))


@pytest.mark.parametrize("model_name, site, by, message", [
    ("gpt2", "resid", ("layer", "pos"), "Unknown patch site 'resid'"),
    ("gpt2", "resid_pre", ("pos",), "must include 'layer'"),
    ("gpt2", "resid_pre", ("layer", "head"), "cannot be patched by 'head'"),
    ("gpt2", "z", ("layer", "d_head"), "cannot be patched by 'd_head'"),
    ("pythia", "resid_mid", ("layer", "pos"), "parallel-residual"),
])
def test_bad_site_or_by(models, pairs, model_name, site, by, message):
    with pytest.raises(ValueError, match=message):
        patch_sweep(models[model_name], pairs, site, by)


def test_bad_options(models, pairs):
    with pytest.raises(ValueError, match="direction"):
        patch_sweep(models["gpt2"], pairs, "resid_pre", direction="forwards")
    with pytest.raises(ValueError, match="source"):
        patch_sweep(models["gpt2"], pairs, "resid_pre", source="random")
    with pytest.raises(ValueError, match="out of range"):
        patch_sweep(models["gpt2"], pairs, "resid_pre", indices=[[2, 0]])


# ---------------------------------------------------------------------------- TransformerLens parity

_PARITY = Path(__file__).resolve().parents[1] / "benchmarks" / "tl_patching_parity.py"


# TransformerLens is the `bench` extra (about 100 s to install), not a test dependency; without it
# the same comparison runs as `python benchmarks/tl_patching_parity.py`, which the README names.
@pytest.mark.skipif(importlib.util.find_spec("transformer_lens") is None, reason="transformer_lens not installed")
def test_equals_transformer_lens_gpt2():
    """resid_pre by (layer, pos) and head outputs by (layer, head) on a GPT-2 checkpoint. The Llama
    (grouped-query) comparison runs in benchmarks/tl_patching_parity.py (TransformerLens is slow to load)."""
    spec = importlib.util.spec_from_file_location("tl_patching_parity", _PARITY)
    parity = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(parity)
    result = parity.compare("gpt2")
    for sweep, diff in result["max_abs_diff"].items():
        assert diff < 1e-4, (sweep, diff)
        assert result["scale"][sweep] > 0.1


# ---------------------------------------------------------------------------- prefix reuse

PREFIX_CASES = [
    # resid_pre by (layer, pos): start layer + packed position suffixes (5 positions: rows of 5
    # slots, position 0 alone); heads by (layer, head): start layer only;
    # grouped-query attention with rotary (llama); windows, soft caps, post-norms (gemma_like).
    ("gpt2", "resid_pre", ("layer", "pos"), "denoising", "resample"),
    ("llama", "resid_pre", ("layer", "pos"), "noising", "pos_mean"),
    ("llama", "z", ("layer", "head"), "denoising", "resample"),
    ("pythia", "z", ("layer", "head", "pos"), "noising", "zero"),
    ("gemma_like", "resid_pre", ("layer", "pos"), "denoising", "resample"),
]


@pytest.mark.parametrize("case", PREFIX_CASES, ids=["-".join((c[0], c[1], *c[2])) for c in PREFIX_CASES])
def test_prefix_reuse_equals_full_forwards(models, pairs, case):
    name, site, by, direction, source = case
    options = dict(direction=direction, source=source, max_patches_per_chunk=3)
    full = patch_sweep(models[name], pairs, site, by, prefix_reuse=False, **options)
    fast = patch_sweep(models[name], pairs, site, by, **options)
    np.testing.assert_array_equal(np.isnan(fast.per_pair), np.isnan(full.per_pair))
    ran = ~np.isnan(full.per_pair)
    np.testing.assert_allclose(fast.per_pair[ran], full.per_pair[ran], rtol=1e-5, atol=1e-5)
    baseline = full.clean_metric if direction == "noising" else full.corrupt_metric
    assert np.nanmax(np.abs(full.per_pair - baseline)) > 1e-3  # the patches do something


def test_resume_schedule_packs_complementary_positions():
    cfg = CONFIGS["gpt2"]
    spec = resolve_site(cfg, "resid_pre", ("layer", "pos"))
    table = np.array([[1, 4], [0, 0], [1, 1], [-1, -1], [0, 3], [1, 0], [0, 2], [0, 2]], np.int32)
    starts, firsts, indices, slots = resume_schedule(table, spec, cfg.n_layers, 5, limit=2)
    # Rows of 5 slots pair p with 5 - p. Layer 0: position 0 alone (no partner), 2 with 3, the
    # second 2 alone, a padding row; layer 1 (the last: the no-op patch runs there, as position 0):
    # the no-op, 0, then 1 with 4 and a padding row.
    assert starts.tolist() == [0, 0, 1, 1] and slots.shape == (4, 2, 2)
    assert firsts.tolist() == [[0, 2], [2, 0], [0, 0], [1, 0]]
    assert slots.tolist() == [[[1, -1], [6, 4]], [[7, -1], [-1, -1]], [[3, -1], [5, -1]], [[2, 0], [-1, -1]]]
    assert (indices[slots < 0] == -1).all()  # empty segments select nothing
    np.testing.assert_array_equal(np.sort(slots[slots >= 0]), np.arange(len(table)))


def test_packed_pair_layout_and_mask():
    # An even length: 4 + 1 slots, p with 4 - 1 - p; an odd one: 5 slots, p with 5 - p.
    assert packed_pair(4, 1).positions.tolist() == [1, 2, 3, 2, 3]
    packing = packed_pair(5, 1)
    assert packing.positions.tolist() == [1, 2, 3, 4, 4]
    assert packing.segment.tolist() == [0, 0, 0, 0, 1] and packing.segment_start.tolist() == [1] * 4 + [4]
    assert packed_pair(5, 0).segment.tolist() == [0] * 5  # position 0's partner would be 5: alone
    mask = np.asarray(key_mask(CONFIGS["gpt2"], packing, n_prefix=5))
    # Slot 4 (position 4, second segment) reads the unpatched keys at 0-3 and itself, nothing of
    # the first segment; slot 1 (position 2, first segment) reads key 0 and slots 0-1.
    assert mask[4].tolist() == [True] * 4 + [False] + [False] * 4 + [True]
    assert mask[1].tolist() == [True, False, False, False, False] + [True, True, False, False, False]


def test_packed_rows_hold_every_suffix_once_and_nothing_else():
    """For every length and shared prefix, the rows `resume_schedule` asks for (p paired with its
    partner) hold the suffixes from every position past the prefix exactly once, with no empty slot
    but the lone suffix of an odd count."""
    for n_pos in range(2, 9):
        for shared in range(n_pos):
            firsts = sorted({min(p, int(partner_position(n_pos, p, shared))) for p in range(shared, n_pos)})
            held = []
            for first in firsts:
                packing = packed_pair(n_pos, first, shared)
                assert len(packing.positions) == pair_slots(n_pos, shared) <= n_pos - shared + 1
                segment, positions = np.asarray(packing.segment), np.asarray(packing.positions)
                for seg in (0, 1):
                    part = positions[segment == seg].tolist()
                    assert part == list(range(part[0], n_pos)) if part else seg == 1, (n_pos, shared, first)
                    held += part[:1]
            assert sorted(held) == list(range(shared, n_pos)), (n_pos, shared)


# ---------------------------------------------------------------------------- shared prefix

@pytest.fixture(scope="module")
def shared_pairs():
    """Three pairs of lengths 5, 3, 5 (the second right-padded) that agree at positions 0 and 1."""
    rng = np.random.default_rng(11)
    clean = [rng.integers(0, VOCAB, n).tolist() for n in (5, 3, 5)]
    corrupt = [list(c) for c in clean]
    for c in corrupt:
        c[2] = (c[2] + 3) % VOCAB
    corrupt[0][4] = (corrupt[0][4] + 1) % VOCAB
    return from_tokens(clean, corrupt, answer=[3, 9, 17], foil=[4, 30, 2], pad_id=0)


SHARED_CASES = [
    # packed suffixes in pos - 2 + 1 slots; rows of positions 2.. for heads (GQA + rotary keys
    # from the prefix); k by (layer, head); windows and soft caps; zero patches (no shared rows).
    ("gpt2", "resid_pre", ("layer", "pos"), "denoising", "resample"),
    ("pythia", "z", ("layer", "head", "pos"), "noising", "resample"),
    ("llama", "z", ("layer", "head"), "denoising", "resample"),
    ("llama", "k", ("layer", "head"), "noising", "resample"),
    ("gemma_like", "resid_pre", ("layer", "pos"), "denoising", "resample"),
    ("gpt2", "resid_pre", ("layer", "pos"), "denoising", "zero"),
    # Sites at or after hook_z: the start block reuses the unpatched heads' outputs (post-norms).
    ("gemma_like", "z", ("layer", "head"), "denoising", "resample"),
    ("llama", "mlp_out", ("layer", "pos"), "noising", "resample"),
]


@pytest.mark.parametrize("case", SHARED_CASES, ids=["-".join((c[0], c[1], *c[2], c[4])) for c in SHARED_CASES])
def test_shared_prefix_rows_equal_full_forwards(models, shared_pairs, case):
    name, site, by, direction, source = case
    assert shared_pairs.shared_prefix() == 2
    options = dict(direction=direction, source=source, max_patches_per_chunk=3)
    full = patch_sweep(models[name], shared_pairs, site, by, prefix_reuse=False, **options)
    fast = patch_sweep(models[name], shared_pairs, site, by, **options)
    np.testing.assert_array_equal(np.isnan(fast.per_pair), np.isnan(full.per_pair))
    ran = ~np.isnan(full.per_pair)
    np.testing.assert_allclose(fast.per_pair[ran], full.per_pair[ran], rtol=1e-5, atol=1e-5)
    baseline = full.clean_metric if direction == "noising" else full.corrupt_metric
    moved = np.abs(full.per_pair - baseline) > 1e-3
    assert moved.any()
    if "pos" in fast.dims:
        at = fast.dims.index("pos")
        # Resampling where both runs agree changes nothing; zeros there do change the metric.
        assert moved.take([0, 1], axis=at).any() == (source == "zero")


def test_resume_schedule_leaves_out_the_shared_prefix():
    cfg = CONFIGS["gpt2"]
    spec = resolve_site(cfg, "resid_pre", ("layer", "pos"))
    table = np.array([[0, 0], [0, 1], [0, 2], [0, 3], [0, 4], [1, 4], [1, -1], [-1, 3]], np.int32)
    starts, firsts, indices, slots = resume_schedule(table, spec, cfg.n_layers, 5, limit=2, shared=1)
    # Position 0 is shared: not run. Rows of 5 slots pair p with 5 + 1 - 1 - p: 1+4, 2+3; at layer 1
    # (the last) position 4 with the patch of no position, then the patch of no layer alone.
    assert starts.tolist() == [0, 1] and firsts.tolist() == [[1, 2], [1, 2]]
    assert slots.tolist() == [[[1, 4], [2, 3]], [[6, 5], [-1, 7]]]
    # Nothing but a shared position: one no-op row, so the baselines still run.
    starts, firsts, indices, slots = resume_schedule(table[:1], spec, cfg.n_layers, 5, limit=2, shared=1)
    assert starts.tolist() == [cfg.n_layers - 1] and (slots == -1).all() and (indices == -1).all()


def test_packed_pair_after_a_shared_prefix():
    packing = packed_pair(6, 2, shared=1)  # positions 2..5 and 5 in 6 - 1 slots (odd), 3..5 alone
    assert packing.positions.tolist() == [2, 3, 4, 5, 5]
    assert packing.segment.tolist() == [0, 0, 0, 0, 1] and packing.segment_start.tolist() == [2] * 4 + [5]
    assert packed_pair(7, 2, shared=1).positions.tolist() == [2, 3, 4, 5, 6, 5, 6]  # 7 - 1 + 1 slots (even count)


def test_sites_at_or_after_the_heads_reuse_their_outputs():
    cfg = CONFIGS["gemma_like"]
    sites = ("resid_pre", "q", "pattern", "z", "attn_out", "mlp_out", "resid_post")
    assert [after_heads(cfg, resolve_site(cfg, s, ("layer",))) for s in sites] == [False] * 3 + [True] * 4
