"""Training: learning, the checkpoint schedule, resume after a kill, loading, data parallelism."""

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

import jaxcirc
from jaxcirc.role_corpus import DEFAULT_ROLES, RoleCorpus
from jaxcirc.checkpoints import checkpoint_series, checkpoint_steps, checkpoints
from jaxcirc.training import (ShuffledWindows, StreamedWindows, TrainConfig, Trainer, corpus_from_config,
                              load_config, model_config, train_command)

ROOT = Path(__file__).resolve().parents[1]

# Learns the role task (held-out accuracy 1.0 by step ~200) in a few seconds once compiled.
NEOX = TrainConfig(model={"family": "gpt_neox", "n_layers": 2, "d_model": 32, "n_heads": 4, "initializer_range": 0.05},
                   name="neox", steps=240, batch_size=16, seq_len=16, lr=1e-2, warmup_steps=5, checkpoint_every=80,
                   corpus={"kind": "role", "n_sentences": 1000}, eval={"task": "role", "per_role": 8, "val_sentences": 32})
NEOX_STEPS = [0, 1, 2, 4, 8, 16, 32, 64, 80, 160, 240]

SUITE_TOML = """
[suite]
name = "tiny"
[train]
steps = 4
batch_size = 8
seq_len = 16
lr = 1e-2
warmup_steps = 1
checkpoint_every = 2
[corpus]
kind = "role"
n_sentences = 200
[eval]
task = "role"
per_role = 2
val_sentences = 16
[[models]]
name = "llama_tiny"
family = "llama"
n_layers = 2
d_model = 32
n_heads = 4
n_kv_heads = 2
initializer_range = 0.1
"""


def _quiet(_line: str) -> None:
    pass


def _params(step_dir: Path) -> dict:
    return jax.tree.map(np.asarray, jaxcirc.load(step_dir).params)


@pytest.fixture(scope="module")
def neox_trainer() -> Trainer:
    return Trainer(NEOX)


@pytest.fixture(scope="module")
def full_run(neox_trainer, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    return neox_trainer.run(out, log=_quiet)


def test_checkpoint_schedule_is_pythia_like():
    pythia = checkpoint_steps(143000, 1000)
    assert len(pythia) == 154
    assert pythia[:12] == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000] and pythia[-1] == 143000
    assert checkpoint_steps(240, 80) == NEOX_STEPS == NEOX.checkpoint_steps()
    assert checkpoint_steps(10, 4) == [0, 1, 2, 4, 8, 10]  # the final step is always saved
    assert TrainConfig(model={}, steps=50).checkpoint_steps() == [0, 1, 2, 4, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50]


def test_loss_decreases_and_the_role_task_is_learned(full_run):
    losses = [r["loss"] for r in full_run.metrics if r.get("loss") is not None]
    assert len(losses) == NEOX.steps
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:5])
    final = full_run.final
    assert final["step"] == NEOX.steps
    assert final["role_acc"] >= 0.6  # chance is 1/9 on prompts with held-out words
    assert full_run.metrics[0]["role_acc"] < 0.3
    out = full_run.out_dir
    for name in ("report.md", "results.json", "figures/loss.png", "figures/accuracy.png", "train_config.json"):
        assert (out / name).is_file(), name


def test_checkpoints_are_listed_and_load_with_jaxcirc_load(full_run, neox_trainer):
    listed = checkpoints(full_run.out_dir)
    assert [s for s, _ in listed] == NEOX_STEPS
    assert all(p.name == f"step_{s}" for s, p in listed)
    # Only the newest `keep_train_state` checkpoints keep their optimizer state.
    assert [s for s, p in listed if (p / "train_state").exists()] == NEOX_STEPS[-NEOX.keep_train_state:]
    model = jaxcirc.load(full_run.out_dir / "step_240")
    assert model.config == neox_trainer.model_config
    params, _, state = neox_trainer.restore(full_run.out_dir / "step_240")
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, model.params), jax.tree.map(np.asarray, params))
    assert state["step"] == 240 and state["data"]["windows_seen"] == 240 * NEOX.batch_size
    # The checkpoint carries its tokenizer: text in, the role lexicon out.
    logits, _ = jaxcirc.run(model, "The poet folded the ladder with the")
    top = model.token_str(int(np.argmax(np.asarray(logits)[0, -1])))
    assert top.strip() in DEFAULT_ROLES[0].lexicon  # instrument
    series = checkpoint_series(full_run.out_dir)
    assert series.steps == tuple(NEOX_STEPS)
    loaded = dict(series.models(steps=[0, 240]))
    assert loaded[0].forward is loaded[240].forward  # one compiled forward for the whole series
    assert not np.array_equal(np.asarray(loaded[0].params["W_E"]), np.asarray(loaded[240].params["W_E"]))


def test_killed_run_resumes_to_bit_identical_weights(full_run, neox_trainer, tmp_path):
    out = tmp_path / "killed"
    # The trainer holds only compiled functions and the (pure) data order, so reusing it is like
    # starting a new process; the run's state comes from disk.
    part = neox_trainer.run(out, stop_at=100, log=_quiet)
    assert part.final_step == 100 and not (out / "report.md").exists()
    # What a kill leaves behind: a half-written checkpoint folder and a cut-off metrics line.
    (out / ".tmp_step_160_x").mkdir()
    (out / ".tmp_step_160_x" / "junk").write_text("partial")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 101, "lo')
    assert [s for s, _ in checkpoints(out)][-1] == 80
    resumed = neox_trainer.run(out, log=_quiet)
    assert resumed.final_step == 240 and not list(out.glob(".tmp_step_*"))
    for step in NEOX_STEPS:
        a, b = _params(full_run.out_dir / f"step_{step}"), _params(out / f"step_{step}")
        jax.tree.map(np.testing.assert_array_equal, a, b)
    steps = [r["step"] for r in resumed.metrics]
    assert steps == list(range(NEOX.steps + 1))  # steps 81..100 were redone, not duplicated
    strip = lambda r: {k: v for k, v in r.items() if k != "time_s"}
    assert [strip(r) for r in resumed.metrics] == [strip(r) for r in full_run.metrics]


def test_a_run_refuses_another_config_in_the_same_folder(full_run):
    other = Trainer(TrainConfig(**{**NEOX.__dict__, "lr": 5e-3}))
    with pytest.raises(ValueError, match="different training config"):
        other.run(full_run.out_dir, log=_quiet)


def test_data_order_is_a_pure_function_of_the_step():
    windows = np.arange(10 * 3, dtype=np.int32).reshape(10, 3)
    data = ShuffledWindows(windows, np.full(10, 3), seed=7)
    first_epoch = np.concatenate([data.batch(s, 5)[0][:, 0] for s in range(2)])
    assert sorted(first_epoch.tolist()) == windows[:, 0].tolist()  # each window once per epoch
    assert np.array_equal(data.batch(3, 5)[0], ShuffledWindows(windows, np.full(10, 3), seed=7).batch(3, 5)[0])
    assert not np.array_equal(data.batch(0, 5)[0], data.batch(2, 5)[0])  # epoch 2 is reshuffled

    tok = RoleCorpus().tokenizer()
    texts = RoleCorpus().sentences(40, seed=0)
    stream = StreamedWindows(lambda: iter(texts), tok, seq_len=16)
    in_order = [stream.batch(s, 4) for s in range(5)]
    fresh = StreamedWindows(lambda: iter(texts), tok, seq_len=16)  # a resumed run fast-forwards
    for got, want in zip(fresh.batch(3, 4), in_order[3]):
        np.testing.assert_array_equal(got, want)
    tokens, mask = in_order[0]
    assert tokens.shape == (4, 17) and mask.shape == (4, 16)
    assert tokens[0, 0] == tok.bos_token_id and mask[0].sum() == len(tok.encode(texts[0]))  # ... + EOS


def test_model_specs_and_config_files(tmp_path):
    neox = model_config({"family": "gpt_neox", "n_layers": 2, "d_model": 64, "n_heads": 4}, d_vocab=100, n_ctx=16)
    assert neox.parallel_residual and neox.rope.rotary_dim == 4 and neox.d_mlp == 256 and not neox.tied_embeddings
    llama = model_config({"family": "llama", "n_layers": 2, "d_model": 48, "n_heads": 4, "n_kv_heads": 2}, 100, 16)
    assert llama.gated_mlp and llama.norm == "rmsnorm" and llama.rope.rotary_dim == 12 and llama.n_kv_heads == 2
    with pytest.raises(ValueError, match="Unknown model family"):
        model_config({"family": "t5", "n_layers": 1, "d_model": 8, "n_heads": 2}, 10, 4)
    with pytest.raises(ValueError, match="Unknown model settings"):
        model_config({"family": "llama", "n_layers": 1, "d_model": 8, "n_heads": 2, "widht": 3}, 10, 4)

    suite, runs = load_config("role_suite")
    assert [r.name for r in runs] == ["2x64", "4x128", "6x256"]
    assert [(r.model["n_layers"], r.model["d_model"]) for r in runs] == [(2, 64), (4, 128), (6, 256)]
    assert len({r.steps for r in runs}) == 1  # aligned checkpoints across sizes

    (tmp_path / "bad.toml").write_text("[train]\nstepz = 3\n[model]\nfamily='llama'\n")
    with pytest.raises(ValueError, match="stepz"):
        load_config(tmp_path / "bad.toml")
    (tmp_path / "corpus.txt").write_text("a cat sat .\n\nthe dog ran !\n")
    texts, tok, roles = corpus_from_config({"kind": "file", "path": "corpus.txt"}, base_dir=tmp_path)
    assert texts == ["a cat sat .", "the dog ran !"] and roles is None
    assert tok.decode(tok.encode(texts[1]), skip_special_tokens=True) == texts[1]


def test_llama_suite_trains_and_data_parallel_matches_one_device(tmp_path):
    config = tmp_path / "tiny.toml"
    config.write_text(SUITE_TOML)
    script = textwrap.dedent(f"""
        import jax
        from jaxcirc.training import train_command
        assert jax.device_count() == 8, jax.devices()
        train_command({str(config)!r}, {str(tmp_path / 'dp')!r}, quiet=True)
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    child = subprocess.Popen([sys.executable, "-c", script], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    results = train_command(config, tmp_path / "one", quiet=True)  # meanwhile, on one device
    _, err = child.communicate(timeout=300)
    assert child.returncode == 0, err[-3000:]
    assert len(jax.devices()) == 1

    one, dp = tmp_path / "one" / "llama_tiny", tmp_path / "dp" / "llama_tiny"
    assert [s for s, _ in checkpoints(one)] == [s for s, _ in checkpoints(dp)] == [0, 1, 2, 4]
    jax.tree.map(np.testing.assert_array_equal, _params(one / "step_0"), _params(dp / "step_0"))
    # Adam divides by sqrt(v), so float summation-order differences in near-zero gradients grow
    # to ~1e-5 after a few steps of lr 1e-2; a wrong gradient mean would differ by ~lr (1e-2).
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=1e-4),
                 _params(one / "step_4"), _params(dp / "step_4"))
    metrics = [[json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()] for d in (one, dp)]
    np.testing.assert_allclose([r.get("loss", 0) for r in metrics[0]], [r.get("loss", 0) for r in metrics[1]], rtol=1e-5)
    assert metrics[0][-1]["val_loss"] < metrics[0][0]["val_loss"]  # the llama model learns
    assert results[0].final_step == 4 and jaxcirc.load(one / "step_4").config.family == "llama"
    assert (tmp_path / "one" / "report.md").is_file() and (tmp_path / "one" / "figures" / "loss.png").is_file()


def test_pythia_style_revision_folders_form_a_series(tmp_path):
    pytest.importorskip("transformers")
    import tiny_hf

    from jaxcirc.models.hf import load_hf_directory

    root = tmp_path / "pythia"
    for step in (0, 2, 10):  # "step10" sorts before "step2" as text
        tiny_hf.save(tiny_hf.make_model("neox_parallel", seed=step), root / f"step{step}")
    (root / "step20").mkdir()  # an incomplete download: no config.json
    (root / "notes").mkdir()
    assert [(s, p.name) for s, p in checkpoints(root)] == [(0, "step0"), (2, "step2"), (10, "step10")]
    series = checkpoint_series(root)
    models = dict(series.models())
    assert models[0].forward is models[10].forward
    _, want, _ = load_hf_directory(root / "step10")
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, models[10].params), want)
    with pytest.raises(KeyError, match=r"available steps: \[0, 2, 10\]"):
        series.path(5)

    # The HF hub cache layout: refs/stepN name snapshot folders.
    cache = tmp_path / "models--EleutherAI--pythia-tiny"
    for step, commit in ((2, "abc"), (0, "def")):
        (cache / "refs").mkdir(parents=True, exist_ok=True)
        (cache / "refs" / f"step{step}").write_text(commit)
        (cache / "snapshots").mkdir(exist_ok=True)
        os.symlink(root / f"step{step}", cache / "snapshots" / commit)
    (cache / "refs" / "main").write_text("abc")
    assert [(s, p.name) for s, p in checkpoints(cache)] == [(0, "def"), (2, "abc")]
    with pytest.raises(FileNotFoundError, match="No complete checkpoints"):
        checkpoint_series(tmp_path / "pythia" / "notes")
