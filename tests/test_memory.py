"""Memory budgets: sweeps chunk themselves to a budget and say what they need when nothing fits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcirc.attribution import atp, budget_batch_size
from jaxcirc.memory import (GiB, MemoryBudgetError, batch_for_budget, compiled_bytes, device_budget, grad_sequence_bytes,
                            parse_bytes, plan_chunks, tree_bytes)
from jaxcirc.model import Model
from jaxcirc.models.config import ModelConfig
from jaxcirc.models.transformer import init_params
from jaxcirc.pairs import from_tokens
from jaxcirc.patching import compile_log, patch_sweep, resolve_site, sweep_memory

CFG = ModelConfig("gpt2", n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=32, d_vocab=40, n_ctx=8)


@pytest.fixture(scope="module")
def setup():
    model = Model(CFG, init_params(CFG, seed=3))
    rng = np.random.default_rng(1)
    clean = rng.integers(1, CFG.d_vocab, (3, 5))
    corrupt = clean.copy()
    corrupt[:, 1] = rng.integers(1, CFG.d_vocab, 3)
    pairs = from_tokens(clean, corrupt, rng.integers(1, CFG.d_vocab, 3), rng.integers(1, CFG.d_vocab, 3))
    return model, pairs


def test_plan_chunks():
    assert plan_chunks(10, 100, 450) == (4, 3)                       # 4 fit, evened out over 3 chunks
    assert plan_chunks(10, 100, 450, fixed_bytes=150) == (3, 4)      # the fixed part comes off first
    assert plan_chunks(10, 100, 50, max_per_chunk=2) == (2, 5)       # an explicit chunk wins
    assert plan_chunks(3, 100, 10 * GiB) == (3, 1)
    with pytest.raises(MemoryBudgetError, match=r"needs 300 bytes \(0.00 GiB\).*single pair.*budget is 250"):
        plan_chunks(10, 100, 250, fixed_bytes=200, unit="pair")
    with pytest.raises(ValueError, match="at least 1"):
        plan_chunks(10, 100, 450, max_per_chunk=0)
    assert batch_for_budget(10, 100, 450, data=4) == 12  # 10 pairs over 4 devices: 3 per device (fits)
    assert parse_bytes("2GiB") == 2 * GiB and parse_bytes("512MiB") == GiB // 2 and parse_bytes(1000) == 1000
    with pytest.raises(ValueError, match="memory size"):
        parse_bytes("2 lots")


def test_device_budget_and_compiled_bytes():
    budget = device_budget()
    assert 0 < budget <= GiB  # CPU: capped (no memory stats on the host platform)
    x = jax.ShapeDtypeStruct((256, 128), jnp.float32)
    need = compiled_bytes(lambda a: a @ a.T, x)
    assert need is None or need >= (256 * 128 + 256 * 256) * 4  # argument + output at least
    assert tree_bytes({"a": x, "b": np.zeros(3, np.int8)}) == 256 * 128 * 4 + 3


def _needs(model, resumed: bool) -> tuple[int, int]:
    return sweep_memory(CFG, model.params, resolve_site(CFG, "resid_pre", ("layer", "pos")), 3, 5, resumed=resumed)


def test_sweep_that_cannot_fit_says_what_it_needs_before_compiling(setup):
    model, pairs = setup
    fixed, per = _needs(model, resumed=True)  # the default sweep reuses prefixes
    with compile_log() as compiled, pytest.raises(MemoryBudgetError) as err:
        patch_sweep(model, pairs, "resid_pre", memory_budget_bytes=fixed + per - 1)
    assert compiled == []  # raised before anything was compiled or run
    message = str(err.value)
    assert f"needs {fixed + per} bytes" in message and "per patch" in message and "memory_budget_bytes" in message


@pytest.mark.parametrize("prefix_reuse", [False, True])
def test_budget_for_k_patches_gives_chunks_of_k_and_the_same_results(setup, prefix_reuse):
    model, pairs = setup
    fixed, per = _needs(model, resumed=prefix_reuse)
    whole = patch_sweep(model, pairs, "resid_pre", memory_budget_bytes=10 * GiB, prefix_reuse=prefix_reuse)
    chunked = patch_sweep(model, pairs, "resid_pre", memory_budget_bytes=fixed + 3 * per + per // 2,
                          prefix_reuse=prefix_reuse)
    if not prefix_reuse:  # 10 patches (2 layers x 5 positions): one chunk, or 3 fit -> 4 chunks of 3
        assert (whole.chunk_size, whole.n_chunks) == (10, 1) and (chunked.chunk_size, chunked.n_chunks) == (3, 4)
    assert chunked.chunk_size <= 3  # (prefix reuse groups patches by start layer: chunks may be smaller)
    # Equal up to float rounding: a different vmap width may let XLA order a sum differently.
    np.testing.assert_allclose(chunked.per_pair, whole.per_pair, rtol=0, atol=1e-6)


def test_atp_chunks_to_a_budget_with_the_same_scores(setup):
    model, pairs = setup
    per_pair = 2 * grad_sequence_bytes(CFG, pairs.n_pos)
    fixed = tree_bytes(model.params)
    with pytest.raises(MemoryBudgetError, match=f"needs {fixed + per_pair} bytes .* single pair"):
        atp(CFG, model.params, pairs, memory_budget_bytes=fixed + per_pair - 1)
    budget = fixed + 2 * per_pair + 1  # two pairs fit: 3 pairs run as chunks of 2 (the last padded)
    assert budget_batch_size(CFG, model.params, pairs, budget) == 2
    whole = atp(CFG, model.params, pairs, sites=("head",), per_pair=True)
    chunked = atp(CFG, model.params, pairs, sites=("head",), per_pair=True, memory_budget_bytes=budget)
    np.testing.assert_allclose(np.asarray(chunked.scores["head"]), np.asarray(whole.scores["head"]), rtol=0, atol=1e-6)
