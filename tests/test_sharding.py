"""Meshes and sharded analyses: sharded results equal single-device results.

The analyses run in ONE subprocess with 8 forced host devices (XLA_FLAGS must be set before JAX
starts), on meshes 4x2 (pairs over 4, heads / d_mlp / vocab over 2) and 8x1, against the same
analyses on one device in that process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from jaxcirc.models.config import ModelConfig
from jaxcirc.models.transformer import param_shapes
from jaxcirc.sharding import make_mesh, mesh_from_spec, param_partition_specs, shard_batch

ROOT = Path(__file__).resolve().parents[1]
LLAMA = ModelConfig("llama", n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, d_vocab=48, n_ctx=16,
                    n_kv_heads=2, norm="rmsnorm", activation="silu", gated_mlp=True, positional="rotary",
                    rope={"theta": 10000.0, "rotary_dim": 8}, tied_embeddings=False, qkv_bias=True)


def _specs(cfg: ModelConfig, model: int) -> dict[str, P]:
    mesh = AbstractMesh((8 // model, model), ("data", "model"))
    specs = param_partition_specs(cfg, param_shapes(cfg), mesh)
    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(specs)[0]}


def test_param_rule_shards_large_matrices_and_replicates_the_rest():
    s = _specs(LLAMA, 2)
    assert s["['blocks']['attn']['W_Q']"] == P(None, None, "model", None)     # [layer, d_model, head, d_head]
    assert s["['blocks']['attn']['W_K']"] == P(None, None, "model", None)     # 2 kv heads over 2
    assert s["['blocks']['attn']['b_Q']"] == P(None, "model", None)
    assert s["['blocks']['attn']['W_O']"] == P(None, "model", None, None)     # [layer, head, d_head, d_model]
    assert s["['blocks']['mlp']['W_in']"] == s["['blocks']['mlp']['W_gate']"] == P(None, None, "model")
    assert s["['blocks']['mlp']['W_out']"] == P(None, "model", None)
    assert s["['W_E']"] == P("model", None) and s["['W_U']"] == P(None, "model")
    assert s["['blocks']['ln1']['w']"] == s["['ln_final']['w']"] == P()
    # 4 over model: the 2 kv heads do not divide -> replicated; 4 query heads, 64 d_mlp, 48 vocab do.
    s4 = _specs(LLAMA, 4)
    assert s4["['blocks']['attn']['W_K']"] == P() and s4["['blocks']['attn']['W_Q']"] == P(None, None, "model", None)
    s8 = _specs(LLAMA, 8)
    assert s8["['blocks']['attn']['W_Q']"] == P() and s8["['W_E']"] == P("model", None)  # 4 heads / 8: no
    assert all(v == P() for v in _specs(LLAMA, 1).values())
    # A weight whose axis does not match the config (e.g. reshaped by weight processing) is replicated.
    odd = param_partition_specs(LLAMA, {"W_U": jax.ShapeDtypeStruct((32, 50), np.float32)})
    assert odd["W_U"] == P()


def test_make_mesh_and_shard_batch_errors():
    mesh = make_mesh()
    assert mesh.axis_names == ("data", "model") and mesh.devices.shape == (len(jax.devices()), 1)
    with pytest.raises(ValueError, match="does not divide"):
        make_mesh(data=3, devices=[jax.devices()[0]] * 2)
    with pytest.raises(ValueError, match="devices"):
        make_mesh(data=2, model=2, devices=jax.devices()[:1])
    with pytest.raises(ValueError, match="positive"):
        make_mesh(data=0)
    assert mesh_from_spec(None) is None and mesh_from_spec("auto").shape == mesh.shape
    assert dict(mesh_from_spec("1x1").shape) == {"data": 1, "model": 1}
    with pytest.raises(ValueError, match="DATAxMODEL"):
        mesh_from_spec("4by2")
    fake = AbstractMesh((4, 1), ("data", "model"))
    with pytest.raises(ValueError, match="A batch of 6 does not split .* data axis of 4.*4 or 8 pairs"):
        shard_batch(np.zeros((6, 3)), fake)


SCRIPT = """
import json
import jax, numpy as np
from jaxcirc.attention_logits import attention_logits
from jaxcirc.attribution import atp
from jaxcirc.logit_lens import logit_lens
from jaxcirc.model import Model
from jaxcirc.models.config import ModelConfig
from jaxcirc.models.transformer import init_params
from jaxcirc.pairs import from_tokens
from jaxcirc.patching import patch_sweep
from jaxcirc.position_decomposition import decompose
from jaxcirc.sharding import make_mesh, shard_params
assert jax.device_count() == 8, jax.devices()

cfg = ModelConfig(**CFG)
model = Model(cfg, init_params(cfg, seed=1))
rng = np.random.default_rng(0)
clean = rng.integers(1, cfg.d_vocab, (8, 6))
corrupt = clean.copy(); corrupt[:, 2] = rng.integers(1, cfg.d_vocab, 8)
lengths = np.array([6, 5, 6, 4, 6, 6, 5, 6])  # padding too
pairs = from_tokens(clean, corrupt, rng.integers(1, cfg.d_vocab, 8), rng.integers(1, cfg.d_vocab, 8), lengths=lengths)
prompts = [list(map(int, r[:l])) for r, l in zip(clean, lengths)]

def run(mesh):
    out = {}
    out["patch_resid"] = patch_sweep(model, pairs, "resid_pre", mesh=mesh).per_pair
    a = atp(cfg, model.params, pairs, sites=("head", "neuron"), per_pair=True, mesh=mesh)
    out.update({"atp_" + k: np.asarray(v) for k, v in a.scores.items()})
    lens = logit_lens(model, prompts, pairs.answer, chunk_tokens=4 * 16, mesh=mesh)
    out["lens_rank"], out["lens_prob"] = lens.rank, lens.prob
    logits = attention_logits(model, clean, mesh=mesh)
    dec = decompose(logits, max_iter=50, shares=False)
    out["attn_logits"] = np.asarray(logits)
    out["position_r"] = np.asarray(dec.r)
    return {k: np.asarray(v, np.float64) for k, v in out.items()}

want = run(None)
report = {"keys": sorted(want)}
for shape in [(4, 2), (8, 1)]:
    mesh = make_mesh(*shape)
    got = run(mesh)
    report[str(shape)] = {k: float(np.nanmax(np.abs(got[k] - want[k]))) if np.isfinite(want[k]).any() else 0.0
                          for k in want}
    report[str(shape) + "_nan_same"] = all(bool((np.isnan(got[k]) == np.isnan(want[k])).all()) for k in want)
    sp = shard_params(model.params, mesh, cfg)
    report[str(shape) + "_W_Q"] = str(sp["blocks"]["attn"]["W_Q"].sharding.spec)
print("RESULT" + json.dumps(report))
"""


def test_sharded_analyses_equal_single_device():
    import dataclasses
    cfg = {k: v for k, v in dataclasses.asdict(LLAMA).items()}
    script = f"CFG = {cfg!r}\n" + textwrap.dedent(SCRIPT)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    line = [l for l in done.stdout.splitlines() if l.startswith("RESULT")][-1]
    report = json.loads(line[len("RESULT"):])
    assert {"patch_resid", "atp_head", "atp_neuron", "lens_rank", "attn_logits", "position_r"} <= set(report["keys"])
    for shape in ["(4, 2)", "(8, 1)"]:
        assert report[shape + "_nan_same"], shape
        worst = {k: v for k, v in report[shape].items() if v > 1e-5}
        assert not worst, (shape, worst)
    # The 4x2 run really split the heads over `model`.
    assert "model" in report["(4, 2)_W_Q"] and "model" not in report["(8, 1)_W_Q"]
