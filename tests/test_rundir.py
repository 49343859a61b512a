"""Run directories: layout, atomic write, refusal to overwrite, round-trip."""

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest

from jaxcirc.rundir import read_run, write_run


def _write(out, **kw):
    figure = plt.figure()
    plt.plot([0, 1], [1, 0])
    return write_run(out, command="test", config={"k": 3, "path": out},
                     arrays={"patch_effect": (np.arange(6.0).reshape(2, 3), ("layer", "pos"))},
                     scalars={"r": np.float32(0.5), "missing": float("nan")}, figures={"curve": figure},
                     report="# report\n", **kw)


def test_layout_and_round_trip(tmp_path):
    out = _write(tmp_path / "run")
    assert sorted(p.name for p in out.iterdir()) == ["arrays.npz", "figures", "report.md", "results.json"]
    results, arrays = read_run(out)
    assert results["arrays"]["patch_effect"] == {"dims": ["layer", "pos"], "shape": [2, 3], "dtype": "float64"}
    assert results["scalars"] == {"r": 0.5, "missing": None}
    assert results["versions"]["jax"]
    np.testing.assert_array_equal(arrays["patch_effect"], np.arange(6.0).reshape(2, 3))
    assert (out / "figures" / "curve.png").stat().st_size > 1000


def test_existing_run_is_kept_unless_overwrite(tmp_path):
    out = _write(tmp_path / "run")
    before = (out / "results.json").read_text()
    with pytest.raises(FileExistsError, match="already exists"):
        _write(out)
    assert (out / "results.json").read_text() == before
    _write(out, overwrite=True)
    assert json.loads((out / "results.json").read_text())["command"] == "test"
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no staging or backup left behind


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="dims"):
        write_run(tmp_path / "run", command="t", config={}, arrays={"a": (np.zeros(3), ("x", "y"))})
    assert list(tmp_path.iterdir()) == []
