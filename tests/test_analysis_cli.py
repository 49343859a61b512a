"""`jaxcirc patch | attribute | circuit | compare` end to end on a tiny HF model with a word tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

import tiny_hf
from jaxcirc import cli
from jaxcirc.rundir import read_run

runner = CliRunner()


def invoke(*args):
    result = runner.invoke(cli.app, [str(a) for a in args])
    return result


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis")
    model_dir = tiny_hf.save(tiny_hf.make_model("llama"), root / "llama")
    tiny_hf.write_word_tokenizer(model_dir)
    rng = np.random.default_rng(0)
    records = []
    for _ in range(6):
        a, b, c, d = rng.choice(np.arange(5, 60), 4, replace=False)
        records.append({"clean": f"w1 w{a} w2 w{c}", "corrupt": f"w1 w{b} w2 w{c}", "answer": f" w{a}", "foil": f" w{b}"})
    records.append({"clean": "w1 w2", "corrupt": "w1 w2 w3", "answer": " w4", "foil": " w5"})  # lengths differ
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in records))
    return root, model_dir, pairs


def test_patch_writes_a_run(setup):
    root, model_dir, pairs = setup
    result = invoke("patch", model_dir, "--pairs", pairs, "--site", "resid_pre", "--by", "layer,pos", "--out", root / "patch")
    assert result.exit_code == 0, result.output
    results, arrays = read_run(root / "patch")
    assert results["arrays"]["patch_effect"]["dims"] == ["layer", "pos"]
    assert arrays["patch_effect"].shape == (2, 4)
    # Denoising the whole residual at layer 0, position 1 (the only differing token) restores the clean run.
    np.testing.assert_allclose(arrays["patch_effect_normalised"][0, 1], 1.0, atol=1e-4)
    assert results["scalars"]["n_pairs"] == 6 and "skipped 1" in results["config"]["pairs_report"].replace(",", "")
    assert (root / "patch" / "figures" / "patch_effect.png").exists()
    again = invoke("patch", model_dir, "--pairs", pairs, "--out", root / "patch")
    assert again.exit_code == 2 and "already exists" in again.output


def test_attribute_atp_validates_against_exact_patching(setup):
    root, model_dir, pairs = setup
    result = invoke("attribute", model_dir, "--pairs", pairs, "--method", "atp", "--validate", "--out", root / "atp")
    assert result.exit_code == 0, result.output
    results, arrays = read_run(root / "atp")
    assert arrays["attribution_head"].shape == (2, 4)
    r = results["scalars"]["pearson_atp_vs_exact_heads"]
    assert -1 <= r <= 1 and "Pearson" in (root / "atp" / "report.md").read_text()


def test_eap_ig_then_circuit_then_compare(setup):
    root, model_dir, pairs = setup
    result = invoke("attribute", model_dir, "--pairs", pairs, "--method", "eap-ig", "--out", root / "eap")
    assert result.exit_code == 0, result.output
    results, arrays = read_run(root / "eap")
    assert arrays["edge_scores"].shape == (len(results["config"]["src_names"]), len(results["config"]["dst_names"]))
    for k in (10, 30):
        result = invoke("circuit", root / "eap", "--top-edges", k, "--out", root / f"circuit{k}")
        assert result.exit_code == 0, result.output
    results, _ = read_run(root / "circuit30")
    faith = results["scalars"]["faithfulness"]
    assert faith["n_edges"] == 30 and np.isfinite(faith["faithfulness"])
    assert json.loads((root / "circuit30" / "circuit.json").read_text())["provenance"]["method"] == "eap-ig"
    result = invoke("compare", root / "circuit10", root / "circuit30", "--bins", 2, "--out", root / "compare")
    assert result.exit_code == 0, result.output
    _, arrays = read_run(root / "compare")
    nodes = arrays["node_jaccard_index"]
    assert nodes.shape == (2, 2) and nodes[0, 0] == 1 and 0 < nodes[0, 1] <= 1


def test_bad_requests_exit_2(setup):
    root, model_dir, pairs = setup
    assert invoke("attribute", model_dir, "--pairs", pairs, "--method", "magic", "--out", root / "x").exit_code == 2
    assert invoke("circuit", root / "nothing", "--out", root / "y").exit_code == 2
    assert invoke("compare", root / "nothing.json", "--out", root / "z").exit_code == 2
    tight = invoke("patch", model_dir, "--pairs", pairs, "--budget", "1KiB", "--out", root / "tight")
    assert tight.exit_code == 2 and "needs" in tight.output and "budget is 1024 bytes" in tight.output
    tight = invoke("attribute", model_dir, "--pairs", pairs, "--budget", "1KiB", "--out", root / "tight_atp")
    assert tight.exit_code == 2 and "needs" in tight.output and not (root / "tight_atp").exists()
