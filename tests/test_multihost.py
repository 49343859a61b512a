"""Two processes on this machine (localhost coordinator, gloo CPU collectives, 2 host devices
each) run patching and AtP over one (data 2 x model 2) mesh, each reading only its slice of the
pairs and writing its part of the results; the gathered parts equal a one-process run."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from jaxcirc.attribution import atp
from jaxcirc.model import Model
from jaxcirc.models.config import ModelConfig
from jaxcirc.models.transformer import init_params
from jaxcirc.multihost import gather_parts, write_part
from jaxcirc.patching import patch_sweep

ROOT = Path(__file__).resolve().parents[1]
CFG = dict(family="gpt2", n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=32, d_vocab=40, n_ctx=8)

COMMON = """
import numpy as np
from jaxcirc.models.config import ModelConfig
from jaxcirc.pairs import from_tokens

def make_pairs(rows=slice(None)):
    # Stands in for reading a pairs file: only `rows` are read.
    rng = np.random.default_rng(7)
    clean = rng.integers(1, 40, (4, 5))
    corrupt = clean.copy(); corrupt[:, 1] = rng.integers(1, 40, 4)
    answer, foil = rng.integers(1, 40, 4), rng.integers(1, 40, 4)
    lengths = np.array([5, 4, 5, 3])
    return from_tokens(clean[rows], corrupt[rows], answer[rows], foil[rows], lengths=lengths[rows])
"""

WORKER = """
import sys
from jaxcirc.multihost import initialize
initialize(f"127.0.0.1:{sys.argv[1]}", 2, int(sys.argv[2]))
import jax
from jaxcirc.attribution import atp
from jaxcirc.model import Model
from jaxcirc.models.transformer import init_params
from jaxcirc.multihost import write_part
from jaxcirc.patching import patch_sweep
from jaxcirc.sharding import host_rows, make_mesh, shard_host_batch, to_host
assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
cfg = ModelConfig(**CFG)
model = Model(cfg, init_params(cfg, seed=5))
mesh = make_mesh(data=2, model=2)
rows = host_rows(4, mesh)
pairs = shard_host_batch(make_pairs(rows), mesh, 4)      # this host reads only its rows
result = patch_sweep(model, pairs, "resid_pre", mesh=mesh)
scores = atp(cfg, model.params, pairs, per_pair=True, mesh=mesh).scores
write_part(sys.argv[3], "patch", rows, {"per_pair": result.per_pair}, axes={"per_pair": -1}, n=4)
write_part(sys.argv[3], "atp", rows, {"head": to_host(scores["head"])}, n=4)
print("ROWS", rows.start, rows.stop)
jax.distributed.shutdown()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    script = f"CFG = {CFG!r}\n" + textwrap.dedent(COMMON) + textwrap.dedent(WORKER)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    port = _free_port()
    workers = [subprocess.Popen([sys.executable, "-c", script, str(port), str(i), str(tmp_path)], env=env,
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(2)]
    # Meanwhile, the same analyses in this (one-device) process.
    namespace: dict = {}
    exec(textwrap.dedent(COMMON), namespace)
    pairs = namespace["make_pairs"]()
    cfg = ModelConfig(**CFG)
    model = Model(cfg, init_params(cfg, seed=5))
    want_patch = patch_sweep(model, pairs, "resid_pre").per_pair
    want_atp = np.asarray(atp(cfg, model.params, pairs, per_pair=True).scores["head"])
    outputs = []
    for w in workers:
        try:
            out, err = w.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for other in workers:
                other.kill()
            pytest.fail("a worker process hung")
        assert w.returncode == 0, err[-4000:]
        outputs.append(out)
    rows = sorted(tuple(map(int, l.split()[1:])) for o in outputs for l in o.splitlines() if l.startswith("ROWS"))
    assert rows == [(0, 2), (2, 4)]  # each process held (and wrote) its own half of the pairs

    got_patch = gather_parts(tmp_path, "patch")["per_pair"]
    got_atp = gather_parts(tmp_path, "atp")["head"]
    assert got_patch.shape == want_patch.shape and got_atp.shape == want_atp.shape
    np.testing.assert_array_equal(np.isnan(got_patch), np.isnan(want_patch))  # same padding cells
    np.testing.assert_allclose(got_patch, want_patch, rtol=0, atol=1e-5, equal_nan=True)
    np.testing.assert_allclose(got_atp, want_atp, rtol=0, atol=1e-5)


def test_gather_parts_checks_completeness(tmp_path):
    values = np.arange(12.0).reshape(3, 4)  # [x, pair]
    write_part(tmp_path, "r", slice(0, 2), {"v": values}, axes={"v": -1}, n=4, process_index=0, process_count=2)
    with pytest.raises(ValueError, match=r"processes \[1\] of 2 are missing"):
        gather_parts(tmp_path, "r")
    write_part(tmp_path, "r", slice(2, 4), {"v": values[:, 2:]}, axes={"v": -1}, n=4, process_index=1, process_count=2)
    np.testing.assert_array_equal(gather_parts(tmp_path, "r")["v"], values)
    write_part(tmp_path, "g", slice(0, 1), {"v": values}, axes={"v": -1}, n=4, process_index=0, process_count=2)
    write_part(tmp_path, "g", slice(2, 4), {"v": values}, axes={"v": -1}, n=4, process_index=1, process_count=2)
    with pytest.raises(ValueError, match="missing or overlap"):
        gather_parts(tmp_path, "g")
    with pytest.raises(FileNotFoundError):
        gather_parts(tmp_path, "nothing")
