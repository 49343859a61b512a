"""`roles_command` end to end on a tiny model and a tiny trained 2-checkpoint suite, and the
per-pair faithfulness it uses checked against `jaxcirc.faithfulness`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jaxcirc.circuit import Circuit
from jaxcirc.edge_patch import EdgeLayout
from jaxcirc.faithfulness import faithfulness
from jaxcirc.model import Model
from jaxcirc.models.config import ModelConfig
from jaxcirc.models.transformer import init_params
from jaxcirc.pairs import from_tokens
from jaxcirc.roles_report import circuit_faithfulness, roles_command
from jaxcirc.rundir import read_run
from jaxcirc.training import train_command

SUITE_TOML = """
[suite]
name = "tiny_roles"
[train]
steps = 1
batch_size = 8
seq_len = 16
lr = 1e-2
warmup_steps = 1
checkpoint_every = 1
[model]
family = "gpt_neox"
rotary_pct = 0.25
initializer_range = 0.5
[corpus]
kind = "role"
n_sentences = 200
[eval]
task = "role"
per_role = 2
val_sentences = 16
[[models]]
name = "small"
n_layers = 1
d_model = 16
n_heads = 2
[[models]]
name = "big"
n_layers = 2
d_model = 16
n_heads = 2
"""
ROLES = ("instrument", "beneficiary", "time")
TOP_EDGES = 12


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("suite")
    config = root / "tiny_roles.toml"
    config.write_text(SUITE_TOML)
    train_command(config, root / "run", quiet=True)
    return root / "run"


@pytest.fixture(scope="module")
def run(suite, tmp_path_factory) -> Path:
    # The main model has the same config as the "big" suite model, so the compiled programs are shared.
    out = tmp_path_factory.mktemp("roles") / "out"
    return roles_command(str(suite / "big" / "step_1"), out, suite_dir=suite, pairs_per_role=3, roles=ROLES,
                         top_edges=TOP_EDGES, n_boot=20, show_progress=False)


def test_run_directory_is_complete(run):
    for name in ("results.json", "arrays.npz", "report.md"):
        assert (run / name).is_file()
    for fig in ("concentration", "faithfulness", "emergence", "overlap", "spectral_similarity", "cka"):
        assert (run / "figures" / f"{fig}.png").stat().st_size > 1000, fig
    results, arrays = read_run(run)
    models = results["scalars"]["models"]
    assert list(models) == ["step_1", "suite/small", "suite/big"]
    circuits = sorted((run / "circuits").glob("*.json"))
    drawn = sorted((run / "figures").glob("circuit__*.png"))
    n_roles = sum(len(m["roles"]) for m in models.values())
    assert len(circuits) == len(drawn) == n_roles >= 3
    np.testing.assert_array_equal(arrays["steps__suite_small"], [0, 1])
    assert results["config"]["pairs_per_role"] == 3 and results["config"]["quick"] is True


def test_circuits_and_faithfulness(run):
    results, arrays = read_run(run)
    for label, model in results["scalars"]["models"].items():
        for role, entry in model["roles"].items():
            circuit = Circuit.from_json(run / "circuits" / f"{label.replace('/', '_')}__{role}.json")
            faith = entry["faithfulness"]
            assert len(circuit) == entry["n_edges"] == min(TOP_EDGES, faith["n_valid"])
            assert circuit.provenance["task"] == f"role:{role}" and circuit.provenance["steps"] == 5
            if faith["n_edges"] == faith["n_valid"]:                # the whole graph is perfectly faithful
                assert faith["faithfulness"] == pytest.approx(1.0, abs=1e-4)
                assert faith["faithfulness_acc"] == 1.0
            # The pairs are filtered: the clean run is right on all of them, the corrupted run on none.
            assert faith["accuracy"]["full"] == 1.0 and faith["accuracy"]["null"] == 0.0
            assert faith["logit_diff"]["full"] > 0 > faith["logit_diff"]["null"]
            conc = entry["concentration"]
            assert 0 < conc["share_of_top_nodes"]["5"] <= 1 + 1e-9 and conc["n_nodes"] == len(circuit.nodes)
            scores = arrays[f"edge_scores__{label.replace('/', '_')}__{role}"]
            top = np.sort(np.abs(scores).ravel())[::-1][:len(circuit)]             # invalid edges score 0
            np.testing.assert_allclose(sorted(abs(e.score) for e in circuit.edges), sorted(top), rtol=1e-6)


def test_emergence_and_comparison(run):
    results, arrays = read_run(run)
    scalars = results["scalars"]
    for label in ("suite/small", "suite/big"):
        emergence = scalars["models"][label]["emergence"]
        assert emergence
        for role, em in emergence.items():
            assert em["steps"] == [0, 1] and em["jaccard_final"][-1] == 1.0
            assert em["structural"]["classification"] == "too few checkpoints"
            assert len(arrays[f"accuracy__{label.replace('/', '_')}__{role}"]) == 2
    assert scalars["models"]["step_1"]["emergence"] is None
    overlaps = scalars["overlaps"]
    assert set(overlaps) == {"step_1 vs suite/small", "step_1 vs suite/big", "suite/small vs suite/big"}
    # The main model IS the final "big" checkpoint with the same pairs: identical circuits.
    for role, values in overlaps["step_1 vs suite/big"].items():
        assert values["node_index"] == values["edge_index"] == 1.0, role
    names = scalars["spectral"]["names"]
    sim = arrays["spectral_similarity"]
    assert sim.shape == (len(names), len(names))
    np.testing.assert_allclose(np.diag(sim), 1.0)
    assert set(scalars["cka"]) == {"step_1 vs suite/small", "step_1 vs suite/big", "suite/small vs suite/big"}


def test_report_shows_paper_numbers_and_sample_size(run):
    report = (run / "report.md").read_text()
    for text in ("QUICK run", "3 pairs per role", "89-92 % within <= 28 nodes", "24-51 %", "11-17 %",
                 "| attribution concentration", "## Emergence over training", "wall", "CPU"):
        assert text in report, text
    results = json.loads((run / "results.json").read_text())
    assert results["scalars"]["timing"]["total"]["cpu_s"] > 0


def test_suite_only_and_missing_suite(suite, tmp_path, monkeypatch):
    # Same roles and sizes as the main run, so the compiled programs are reused.
    only = roles_command(str(suite), tmp_path / "suite_only", pairs_per_role=3, roles=ROLES,
                         top_edges=TOP_EDGES, n_boot=5, show_progress=False)
    assert list(read_run(only)[0]["scalars"]["models"]) == ["suite/small", "suite/big"]
    monkeypatch.chdir(tmp_path)                                   # no runs/role_suite here
    alone = roles_command(str(suite / "small" / "step_1"), tmp_path / "alone", pairs_per_role=3, roles=ROLES,
                          top_edges=TOP_EDGES, n_boot=5, show_progress=False)
    report = (alone / "report.md").read_text()
    assert "jaxcirc train role_suite --out runs/role_suite" in report
    with pytest.raises(FileExistsError):
        roles_command(str(suite / "small" / "step_1"), alone, show_progress=False)


def test_circuit_faithfulness_matches_faithfulness_module():
    cfg = ModelConfig(family="gpt2", n_layers=2, d_model=24, n_heads=3, d_head=8, d_mlp=96, d_vocab=50, n_ctx=32,
                      qkv_bias=True, o_bias=True, mlp_bias=True, initializer_range=0.3)
    model = Model(cfg, init_params(cfg, seed=1))
    rng = np.random.default_rng(0)
    clean = rng.integers(0, 50, size=(6, 5))
    corrupt = clean.copy()
    corrupt[:, 2] = rng.integers(0, 50, size=6)
    pairs = from_tokens(clean, corrupt, rng.integers(0, 50, 6), rng.integers(0, 50, 6))
    layout = EdgeLayout.canonical(cfg)
    circuit = Circuit.from_scores(rng.normal(size=(layout.n_src, layout.n_dst)), layout, top_k=15)
    ours = circuit_faithfulness(model, pairs, circuit.edge_mask(layout), layout, batch_size=4)
    reference = faithfulness(model, pairs, circuit, metric="logit_diff")
    for key, ref in (("full", reference.full_metric), ("null", reference.null_metric),
                     ("circuit", reference.circuit_metric), ("ablated", reference.ablated_metric)):
        assert ours["logit_diff"][key] == pytest.approx(ref, rel=1e-4, abs=1e-5), key
    assert ours["faithfulness"] == pytest.approx(reference.faithfulness, rel=1e-3, abs=1e-4)
    assert ours["necessity"] == pytest.approx(reference.necessity, rel=1e-3, abs=1e-4)
