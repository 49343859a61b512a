"""`jaxcirc sweep`: grid validation, stable unit ids, atomic unit files, and kill-and-resume
(SIGKILL at random moments, one of them mid-write) giving every unit exactly once with the
numbers of an uninterrupted run."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import tiny_hf
from jaxcirc import cli, sweep
from jaxcirc.rundir import read_run
from jaxcirc.sweep import clean_partials, load_sweep, record_grid, run_sweep, write_unit

ROOT = Path(__file__).resolve().parents[1]


def _pairs_file(path: Path, seed: int, mismatched: bool = False) -> Path:
    rng = np.random.default_rng(seed)
    records = []
    for _ in range(6):  # 6 pairs of 4 tokens, as in test_analysis_cli: the compiled programs are shared
        a, b, c = rng.choice(np.arange(5, 60), 3, replace=False)
        corrupt = f"w1 w{b} w2 w{c}" + (" w3" if mismatched else "")
        records.append({"clean": f"w1 w{a} w2 w{c}", "corrupt": corrupt, "answer": f" w{a}", "foil": f" w{b}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Two checkpoints of one tiny Llama (HF revision folders step0/, step5/) and two pair files."""
    root = tmp_path_factory.mktemp("sweep")
    for step, seed in ((0, 0), (5, 1)):
        directory = tiny_hf.save(tiny_hf.make_model("llama", seed=seed), root / "series" / f"step{step}")
        tiny_hf.write_word_tokenizer(directory)
    _pairs_file(root / "a.jsonl", 0)
    _pairs_file(root / "b.jsonl", 1)
    _pairs_file(root / "bad.jsonl", 2, mismatched=True)
    return root


GRID = """
[sweep]
name = "test"
[[models]]
name = "tiny"
checkpoints = "series"
[[tasks]]
pairs = "a.jsonl"
[[tasks]]
pairs = "b.jsonl"
name = "b"
[methods.patch_heads]
[methods.logit_lens]
"""


def _write(root: Path, name: str, text: str) -> Path:
    path = root / name
    path.write_text(text)
    return path


def test_grid_expansion_and_stable_ids(setup):
    text = GRID + """
[methods.atp]
star = [false, true]
[options]
metric = ["logit_diff", "logprob"]
[[exclude]]
method = "atp"
star = true
metric = "logprob"
"""
    first = load_sweep(_write(setup, "grid1.toml", text))
    # 2 checkpoints x 2 tasks x (patch_heads 2 metrics + logit_lens 2 metrics + atp 4 - 1 excluded)
    assert len(first.units) == 2 * 2 * (2 + 2 + 3)
    assert len({u.id for u in first.units}) == len(first.units)
    assert all(u.config["options"]["batch_size"] == 8 for u in first.units if u.config["method"] == "atp")
    # Same grid written differently (defaults spelled out, comments, other order): same ids.
    reordered = text.replace("[methods.patch_heads]", "# comment\n[methods.patch_heads]\nsource = \"resample\"")
    assert [u.id for u in load_sweep(_write(setup, "grid2.toml", reordered)).units] == [u.id for u in first.units]
    changed = load_sweep(_write(setup, "grid3.toml", text.replace("logprob", "prob_diff")))
    assert len(set(u.id for u in changed.units) & set(u.id for u in first.units)) == 2 * 2 * 4
    # Units are grouped by model (checkpoint) so each loads once.
    keys = [u.model_key for u in first.units]
    assert keys == sorted(keys, key=lambda k: keys.index(k))


def test_the_shipped_example_is_a_valid_grid(smollm_path):
    example = load_sweep("sweep_example")
    assert len(example.units) == 6 and {u.model_path for u in example.units} == {str(smollm_path)}
    assert {u.config["method"] for u in example.units} == {"atp", "eap_ig", "patch_heads", "patch_resid", "logit_lens"}


@pytest.mark.parametrize("snippet, message", [
    ("[methods.atpp]", "Did you mean 'atp'"),
    ("[methods.eap_ig]\nsteps = 0", "must be at least 1"),
    ("[methods.eap_ig]\nstep = 3", "has no option(s) ['step']"),
    ("[methods.atp]\nstar = \"yes\"", "expected a bool"),
    ("[methods.patch_resid]\nsite = \"resid_side\"", "choose one of"),
    ("[options]\nsteps = [2]", "is an option of none of the methods"),
    ("[[exclude]]\nmethod = \"atp\"", "matches no unit"),
    ("[[exclude]]\nmodle = \"tiny\"", "unknown key(s) ['modle']"),
    ("[[models]]\nsource = \"no/such/model\"", "not found"),
    ("[[models]]\ncheckpoints = \"series\"\nname = \"again\"\nsteps = [7]", "no checkpoint for step(s) [7]"),
    ("[[tasks]]\npairs = \"missing.jsonl\"", "pairs file 'missing.jsonl' not found"),
    ("[grid]\nx = 1", "unknown key(s) ['grid']"),
])
def test_bad_sweeps_are_refused_before_anything_runs(setup, tmp_path, snippet, message):
    path = _write(setup, "bad.toml", GRID + "\n" + snippet + "\n")  # next to the fixtures it names
    out = tmp_path / "out"
    with pytest.raises(ValueError) as error:
        run_sweep(path, out)
    assert message in str(error.value)
    assert not out.exists()


def test_a_different_grid_is_refused_unless_extended(setup, tmp_path):
    small = load_sweep(_write(setup, "small.toml", GRID))
    large = load_sweep(_write(setup, "large.toml", GRID + "[methods.atp]\n"))
    out = tmp_path / "out"
    out.mkdir()
    record_grid(out, small, extend=False)
    record_grid(out, small, extend=False)  # the same grid resumes
    with pytest.raises(ValueError, match="--extend"):
        record_grid(out, large, extend=False)
    record_grid(out, large, extend=True)
    recorded = list(json.loads((out / "sweep.json").read_text())["units"])
    assert recorded[:len(small.units)] == [u.id for u in small.units]
    assert sorted(recorded) == sorted(u.id for u in large.units)
    with pytest.raises(ValueError, match="never removed"):
        record_grid(out, small, extend=True)
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds no sweep"):
        run_sweep(setup / "small.toml", stranger)


def test_unit_writes_are_all_or_nothing(setup, tmp_path, monkeypatch):
    unit = load_sweep(_write(setup, "small.toml", GRID)).units[0]
    units = tmp_path / "units"
    units.mkdir()
    arrays = {"x": (np.arange(3.0), ("i",))}
    real_write = sweep._write_file

    def failing(path, data):
        if path.name == "results.json":
            raise OSError("disk full")
        real_write(path, data)

    monkeypatch.setattr(sweep, "_write_file", failing)
    with pytest.raises(OSError, match="disk full"):
        write_unit(units, unit, {"config": unit.config, "scalars": {}}, arrays)
    assert list(units.iterdir()) == []
    monkeypatch.setattr(sweep, "_write_file", real_write)
    final = write_unit(units, unit, {"config": unit.config, "scalars": {"s": 1.0}}, arrays)
    assert json.loads((final / "results.json").read_text())["arrays"]["x"] == {"dims": ["i"], "shape": [3], "dtype": "float64"}
    with pytest.raises(FileExistsError):
        write_unit(units, unit, {"config": unit.config, "scalars": {}}, arrays)
    (units / ".partial-abc-1").mkdir()
    (tmp_path / ".results.csv.tmp-99").write_text("half")
    assert len(clean_partials(tmp_path)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["units"] and [p.name for p in units.iterdir()] == [unit.id]


def test_failed_units_are_reported_and_retried(setup, tmp_path):
    path = _write(setup, "failing.toml", GRID.replace('pairs = "b.jsonl"', 'pairs = "bad.jsonl"')
                  .replace("[[tasks]]\npairs = \"a.jsonl\"\n", "").replace("[methods.logit_lens]\n", "")
                  .replace('checkpoints = "series"', 'checkpoints = "series"\nsteps = [0]'))
    out = tmp_path / "out"
    result = CliRunner().invoke(cli.app, ["sweep", str(path), "--out", str(out)])
    assert result.exit_code == 2 and "1 unit(s) failed" in result.output
    failures = json.loads((out / "failures.json").read_text())
    assert list(failures) == [load_sweep(path).units[0].id] and "No usable pairs" in next(iter(failures.values()))
    assert "Failed units" in (out / "report.md").read_text() and list((out / "units").iterdir()) == []
    again = run_sweep(path, out)  # retried, not skipped
    assert again["done_before"] == 0 and list(again["failed"]) == list(failures)


def test_methods_write_arrays_and_consistent_summaries(setup, tmp_path):
    path = _write(setup, "methods.toml", GRID.replace('checkpoints = "series"', 'checkpoints = "series"\nsteps = [0]')
                  .replace('[[tasks]]\npairs = "b.jsonl"\nname = "b"\n', "").replace("[methods.patch_heads]\n", "")
                  .replace("[methods.logit_lens]\n", "[methods.atp]\n[methods.patch_resid]\n"
                           "[methods.eap_ig]\nfaithfulness = true\ntop_edges = 10\n"))
    out = tmp_path / "out"
    result = run_sweep(path, out)
    assert result["units"] == 3 and result["run"] == 3 and not result["failed"]
    units = {c["method"]: uid for uid, c in json.loads((out / "sweep.json").read_text())["units"].items()}
    config, scalars, arrays = _unit_numbers(out, units["atp"])
    head = arrays["attribution_head"]
    assert head.shape == (2, 4) and arrays["attribution_resid_pre"].shape == (2, 4)
    assert scalars["head_top_score"] == head[int(scalars["head_top_layer"]), int(scalars["head_top_head"])]
    assert np.isclose(scalars["head_abs_sum"], np.abs(head).sum()) and 0 < scalars["head_top5_share"] <= 1
    assert scalars["n_pairs"] == 6 and scalars["metric_clean"] != scalars["metric_corrupt"]
    _, scalars, arrays = _unit_numbers(out, units["patch_resid"])
    # Denoising the residual at layer 0, position 1 (the only differing token) restores the clean run.
    np.testing.assert_allclose(arrays["patch_effect_normalised"][0, 1], 1.0, atol=1e-4)
    assert arrays["patch_effect"].shape == (2, 4) and np.isfinite(scalars["change_top_normalised"])
    _, scalars, arrays = _unit_numbers(out, units["eap_ig"])
    record = json.loads((out / "units" / units["eap_ig"] / "results.json").read_text())
    assert arrays["edge_scores"].shape == (len(record["labels"]["src"]), len(record["labels"]["dst"]))
    assert np.isfinite(scalars["faithfulness"]) and np.isfinite(scalars["necessity"])
    assert scalars["n_edges"] > 10 and 0 < scalars["edge_top10_share"] <= 1
    rows = _rows(out)
    assert {r[4] for r in rows} == {"atp", "patch_resid", "eap_ig"} and len(rows) == sum(
        len(_unit_numbers(out, u)[1]) for u in units.values())
    assert "3 of 3 units done" in (out / "report.md").read_text()
    results, arrays = read_run(out / "units" / units["atp"])  # each unit is a run directory
    assert results["model"]["hash"] and results["arrays"]["attribution_head"]["dims"] == ["layer", "head"]
    assert "head_top_score" in (out / "units" / units["atp"] / "report.md").read_text()
    assert run_sweep(path, out)["done_before"] == 3  # a finished sweep reruns nothing


# ----------------------------------------------------------------------------- kill and resume


def _launch(toml: Path, out: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "jaxcirc.cli", "sweep", str(toml), "--out", str(out)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _units(out: Path) -> set[str]:
    units = out / "units"
    return {p.name for p in units.iterdir() if not p.name.startswith(".")} if units.is_dir() else set()


def _wait_for(condition, child: subprocess.Popen, timeout: float = 60.0) -> bool:
    """Poll until condition() holds (True) or the child exits first (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if child.poll() is not None:
            return False
        time.sleep(0.01)
    raise AssertionError("timed out waiting for the sweep subprocess")


def _kill(child: subprocess.Popen) -> bool:
    """SIGKILL the child; True when it was still running (so the kill interrupted it)."""
    alive = child.poll() is None
    if alive:
        os.kill(child.pid, signal.SIGKILL)
    child.wait()
    return alive and child.returncode == -signal.SIGKILL


def _rows(out: Path) -> list[tuple[str, ...]]:
    with open(out / "results.csv", newline="") as f:
        return [tuple(r) for r in csv.reader(f)][1:]


def _unit_numbers(out: Path, uid: str):
    record = json.loads((out / "units" / uid / "results.json").read_text())
    with np.load(out / "units" / uid / "arrays.npz") as data:
        arrays = {k: data[k] for k in data.files}
    return record["config"], record["scalars"], arrays


def test_kill_and_resume_loses_and_duplicates_nothing(setup, tmp_path):
    toml = _write(setup, "kill.toml", GRID)
    expected = {u.id for u in load_sweep(toml).units}
    assert len(expected) == 8
    # One on-disk XLA cache for every subprocess: only the first run pays the compilations
    # (a test-speed measure; numbers are compared to that first, uncached run below).
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    env.pop(sweep.DEBUG_PAUSE_ENV, None)

    reference = tmp_path / "reference"
    child = _launch(toml, reference, env)
    assert child.wait(timeout=180) == 0, child.stderr.read()
    child.stderr.close()

    # Four runs killed with SIGKILL: early (start-up, loading, compiling), inside a unit's write
    # (the documented debug pause holds the unit half-written), and twice at a random moment inside
    # a random later unit (a 0.2 s pause in each unit's write keeps every unit >= 0.2 s long, so
    # the kill lands in its computation or its write, never after the whole run has finished).
    seed = random.randrange(2**32)
    print(f"kill delays drawn with random.Random({seed})")  # shown by pytest if the test fails
    out, rng = tmp_path / "killed", random.Random(seed)
    interrupted, mid_write = 0, False
    partials = lambda: {p.name for p in (out / "units").iterdir() if p.name.startswith(".partial-")} if (out / "units").is_dir() else set()
    for attempt in ("early", "mid_write", "random", "random"):
        if _units(out) == expected:
            break
        before, old_partials = _units(out), partials()  # an earlier kill may have left one
        pause = {"early": "0.2", "mid_write": "0.5", "random": "0.2"}[attempt]
        child = _launch(toml, out, {**env, sweep.DEBUG_PAUSE_ENV: pause})
        if attempt == "early":
            time.sleep(rng.uniform(0.5, 2.0))  # start-up plus 8 units of >= 0.2 s outlast this
        elif attempt == "mid_write":
            _wait_for(lambda: bool(partials() - old_partials), child)
        else:  # after a random number of this run's units, inside the next one (>= 0.2 s long)
            left = len(expected) - len(before)
            k = rng.randint(1, left - 1) if left > 1 else 0
            if _wait_for(lambda: len(_units(out)) >= len(before) + k, child):
                time.sleep(rng.uniform(0.0, 0.15))
        killed = _kill(child)
        child.stderr.close()
        interrupted += killed
        if attempt == "mid_write":
            mid_write = killed and bool(partials() - old_partials)  # it left a half-written unit behind
        print(f"{attempt}: killed={killed}, units done {len(before)} -> {len(_units(out))}")
        assert _units(out) <= expected
    assert interrupted >= 3 and mid_write

    child = _launch(toml, out, env)  # resume to completion
    assert child.wait(timeout=180) == 0, child.stderr.read()
    child.stderr.close()

    assert _units(out) == expected == _units(reference)
    assert not [p for p in (out / "units").iterdir() if p.name.startswith(".")]  # partials cleaned
    for uid in expected:
        config, scalars, arrays = _unit_numbers(out, uid)
        ref_config, ref_scalars, ref_arrays = _unit_numbers(reference, uid)
        assert config == ref_config and scalars == ref_scalars
        assert arrays.keys() == ref_arrays.keys()
        for name in arrays:
            np.testing.assert_array_equal(arrays[name], ref_arrays[name], err_msg=f"{uid}/{name}")
    rows = _rows(out)
    assert len(rows) == len(set(rows)) and len({(r[0], r[6]) for r in rows}) == len(rows)  # no duplicates
    assert sorted(rows) == sorted(_rows(reference)) and {r[0] for r in rows} == expected
    assert "8 of 8 units done" in (out / "report.md").read_text()

    # --gather-only rebuilds the same table from the unit files.
    (out / "results.csv").unlink()
    result = CliRunner().invoke(cli.app, ["sweep", str(toml), "--out", str(out), "--gather-only"])
    assert result.exit_code == 0, result.output
    assert sorted(_rows(out)) == sorted(rows)
    try:
        import pyarrow.parquet as pq
    except ImportError:
        return
    assert pq.read_table(out / "results.parquet").num_rows == len(rows)
