"""The `jaxcirc` CLI: info / hooks / logits on tiny saved HF models and on SmolLM2; clear errors (exit 2)."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from typer.testing import CliRunner

import jaxcirc
import tiny_hf
from jaxcirc import cli
from jaxcirc.models import hook_points

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(cli.app, [str(a) for a in args])


@pytest.fixture(scope="module")
def hf_llama():
    return tiny_hf.make_model("llama")


@pytest.fixture(scope="module")
def llama_dir(hf_llama, tmp_path_factory):
    """Tiny HF llama (GQA, llama3 rope) with a word-level tokenizer: "w5 w6" -> [5, 6]."""
    directory = tiny_hf.save(hf_llama, tmp_path_factory.mktemp("llama"))
    tiny_hf.write_word_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """Tiny HF GPT-2 without a tokenizer."""
    return tiny_hf.save(tiny_hf.make_model("gpt2"), tmp_path_factory.mktemp("gpt2"))


# ----------------------------------------------------------------------------- pure helpers


def test_top_k_orders_by_logit_then_id():
    logits = np.array([1.0, 3.0, 2.0, 3.0, -1.0])
    assert cli.top_k(logits, 3) == [(1, 3.0), (3, 3.0), (2, 2.0)]
    assert cli.top_k(logits, 5)[-1] == (4, -1.0)
    with pytest.raises(ValueError, match="between 1 and the vocabulary size 5"):
        cli.top_k(logits, 6)


def test_log_softmax_is_normalised_and_shift_invariant():
    x = np.array([[1000.0, 1001.0, 999.0]])
    out = cli.log_softmax(x)
    np.testing.assert_allclose(np.exp(out).sum(-1), 1.0)
    np.testing.assert_allclose(out, cli.log_softmax(x - 1000.0))


def test_parse_token_ids():
    assert cli.parse_token_ids("1, 2 3,4") == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="integers"):
        cli.parse_token_ids("1, two")


def test_hook_table_and_summary_agree_with_the_catalogue(llama_dir):
    cfg = jaxcirc.load(llama_dir).config
    rows = cli.hook_table(cfg, pos=5)
    assert [r["name"] for r in rows] == hook_points.full_names(cfg)
    summary = cli.hook_summary(cfg, pos=5)
    assert summary["counts"]["total"] == len(rows)
    assert summary["counts"]["per_block"] * cfg.n_layers + summary["counts"]["top_level"] == len(rows)


# ----------------------------------------------------------------------------- commands


def test_info(llama_dir):
    result = invoke("info", llama_dir, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert (data["family"], data["n_layers"], data["d_model"], data["n_heads"], data["n_kv_heads"]) == ("llama", 2, 32, 4, 2)
    assert data["d_head"] == 8 and data["d_mlp"] == 64 and data["d_vocab"] == tiny_hf.VOCAB
    assert data["positional"].startswith("rotary") and "llama3" in data["positional"]
    assert data["norm"].startswith("rmsnorm") and data["dtype"] == "float32"
    model = jaxcirc.load(llama_dir)
    assert data["n_params"] == sum(int(np.prod(np.shape(p))) for p in jax.tree_util.tree_leaves(model.params))
    assert data["source_hash"] == model.source_hash and len(data["source_hash"]) == 64
    text = invoke("info", llama_dir)
    assert text.exit_code == 0 and "llama" in text.stdout and "n_kv_heads" in text.stdout


def test_info_without_a_model_lists_the_families(llama_dir):
    """`jaxcirc info` (or `--families`) prints the family table: every row, its model types,
    coverage and parity figure; with a model as well it is a usage error."""
    from jaxcirc.models.families import FAMILIES, family_table

    result = invoke("info", "--families", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"families": family_table()}
    names = {row["name"] for row in family_table()}
    assert {"GPT-2", "GPT-NeoX / Pythia", "Llama", "GPT-J", "BLOOM", "Gemma 2"} <= names
    text = invoke("info")
    assert text.exit_code == 0, text.output
    for family in FAMILIES:
        assert family.name in text.stdout and family.parity in text.stdout
        assert all(t in text.stdout for t in family.model_types)
    assert_clear_error(invoke("info", llama_dir, "--families"), "not both")


def test_hooks_lists_every_name_with_its_shape(llama_dir):
    cfg = jaxcirc.load(llama_dir).config
    result = invoke("hooks", llama_dir, "--json", "--pos", 7)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    names = [row["name"] for row in data["hook_points"]]
    assert names == hook_points.full_names(cfg)
    sizes = hook_points.dim_sizes(cfg, 1, 7)
    for row in data["hook_points"]:
        assert row["shape"] == [sizes[d] for d in row["dims"]]
    shapes = {row["name"]: row["shape"] for row in data["hook_points"]}
    assert shapes["blocks.1.attn.hook_k"] == [1, 7, 2, 8] and shapes["blocks.0.attn.hook_pattern"] == [1, 4, 7, 7]
    text = invoke("hooks", llama_dir, "--pos", 7)
    assert "blocks.1.attn.hook_z" in text.stdout and "[batch=1, pos=7, head=4, d_head=8]" in text.stdout


def test_hooks_summary(llama_dir):
    result = invoke("hooks", llama_dir, "--summary")
    assert result.exit_code == 0, result.output
    out = result.stdout
    total = len(hook_points.full_names(jaxcirc.load(llama_dir).config))
    assert f"{total} hook points" in out
    assert "blocks.{0..1}.attn.hook_z" in out and "[batch=1, pos=8, head=4, d_head=8]" in out
    assert "blocks.0.attn.hook_z" not in out
    data = json.loads(invoke("hooks", llama_dir, "--summary", "--json").stdout)
    assert data["counts"]["total"] == total


def test_logits_json_matches_transformers(llama_dir, hf_llama):
    result = invoke("logits", llama_dir, "--prompt", "w5 w9 w3 w60", "--top-k", 4, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["prompt"] == "w5 w9 w3 w60" and data["token_ids"] == [5, 9, 3, 60]
    assert data["tokens"] == ["w5", "w9", "w3", "w60"]
    reference = tiny_hf.hf_log_softmax(hf_llama, np.array([[5, 9, 3, 60]]))[0, -1]
    expected = [i for i, _ in cli.top_k(reference, 4)]
    assert [row["id"] for row in data["top_k"]] == expected
    assert [row["token"] for row in data["top_k"]] == [f"w{i}" for i in expected]
    logits = [row["logit"] for row in data["top_k"]]
    assert logits == sorted(logits, reverse=True)
    np.testing.assert_allclose(np.log([row["prob"] for row in data["top_k"]]), reference[expected], atol=1e-4)


def test_logits_from_token_ids_without_tokenizer(gpt2_dir):
    result = invoke("logits", gpt2_dir, "--tokens", "1,2,3", "--top-k", 2, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["token_ids"] == [1, 2, 3] and len(data["top_k"]) == 2
    text = invoke("logits", gpt2_dir, "--tokens", "1 2 3")
    assert text.exit_code == 0 and "rank" in text.stdout


# ----------------------------------------------------------------------------- errors


def assert_clear_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_unknown_model_exits_2(tmp_path):
    assert_clear_error(invoke("info", "gpt-7-zillion"), "gpt-7-zillion", "smollm2-135m")
    assert_clear_error(invoke("hooks", tmp_path / "nowhere"), "does not exist")
    assert_clear_error(invoke("logits", tmp_path, "--prompt", "x"), "config.json")


def test_unported_architecture_exits_2(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    assert_clear_error(invoke("info", tmp_path), "'t5'", "not ported")


def test_bad_logits_arguments_exit_2(llama_dir, gpt2_dir):
    assert_clear_error(invoke("logits", llama_dir), "--prompt", "--tokens")
    assert_clear_error(invoke("logits", llama_dir, "--prompt", "w1", "--tokens", "1"), "exactly one")
    assert_clear_error(invoke("logits", gpt2_dir, "--prompt", "hello"), "no tokenizer", "--tokens")
    assert_clear_error(invoke("logits", llama_dir, "--tokens", "1,500"), "Token id 500", "[batch 0, pos 1]")
    assert_clear_error(invoke("logits", llama_dir, "--tokens", "1,x"), "integers")
    assert_clear_error(invoke("logits", llama_dir, "--tokens", "1", "--top-k", 1000), "--top-k")
    assert_clear_error(invoke("logits", llama_dir, "--tokens", " ".join(["1"] * 65)), "context window of 64")
    assert_clear_error(invoke("hooks", llama_dir, "--pos", 65), "--pos 65", "64")
    assert invoke("logits", llama_dir, "--tokens", "1", "--top-k", 0).exit_code == 2  # typer's own range check


# ----------------------------------------------------------------------------- the embedded default model


def test_smollm2_puts_paris_first():
    result = invoke("logits", "smollm2-135m", "--prompt", "The capital of France is", "--top-k", 5, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["token_ids"] == [504, 3575, 282, 4649, 314]
    assert data["top_k"][0]["token"] == " Paris" and data["top_k"][0]["id"] == 7042
    assert abs(data["top_k"][0]["logit"] - 17.371) < 0.01  # transformers' value for the dequantized GGUF
    assert [row["token"] for row in data["top_k"]] == [" Paris", " the", " London", " Le", " New"]
