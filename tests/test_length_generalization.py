"""Length generalization: the three attention variants past the trained length, and the command."""

import json

import numpy as np
import pytest

from jaxcirc.length_generalization import VARIANTS, length_command, length_curve, position_buckets, role_paragraphs
from jaxcirc.model import Model
from jaxcirc.models.config import ModelConfig, RopeConfig
from jaxcirc.models.transformer import init_params
from jaxcirc.role_corpus import RoleCorpus
from jaxcirc.training import load_config

TOKENIZER = RoleCorpus().tokenizer()
CFG = ModelConfig(family="llama", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_head=8, d_mlp=64,
                  d_vocab=TOKENIZER.vocab_size, n_ctx=8, norm="rmsnorm", activation="silu", gated_mlp=True,
                  positional="rotary", rope=RopeConfig(theta=10000.0, rotary_dim=8), initializer_range=0.3)


@pytest.fixture(scope="module")
def model():
    return Model(CFG, init_params(CFG, 0), tokenizer=TOKENIZER, source="tiny")


def test_buckets_double_past_the_trained_length():
    assert position_buckets(40, 8) == [(1, 8), (8, 16), (16, 32), (32, 40)]


def test_variants_agree_inside_the_trained_length_and_differ_past_it(model):
    tokens = role_paragraphs(TOKENIZER, 2, 24)
    assert tokens.shape == (2, 24) and tokens[0, 0] == TOKENIZER.bos_token_id
    result = length_curve(model, tokens, trained_len=8, n_global=2)
    nll = result["nll"]
    assert nll.shape == (len(VARIANTS), 2, 23) and result["ppl"].shape == (3, len(result["buckets"]))
    # Queries 0..7 see at most 8 keys at distances <= 7: the window and the cap change nothing.
    np.testing.assert_allclose(nll[1:, :, :8], np.broadcast_to(nll[0, :, :8], (2, 2, 8)), atol=1e-5)
    assert np.abs(nll[1, :, 8:] - nll[0, :, 8:]).max() > 1e-3  # the mask drops keys
    assert np.abs(nll[2, :, 8:] - nll[1, :, 8:]).max() > 1e-3  # the cap changes the global prefix's logits
    with pytest.raises(ValueError, match="eval_len > trained_len"):
        length_curve(model, tokens[:, :8], trained_len=8)


def test_length_command_writes_a_run(model, tmp_path):
    out = length_command(model, tmp_path / "run", trained_len=8, eval_len=20, n_texts=2, n_global=1, text="role")
    results = json.loads((out / "results.json").read_text())
    assert set(results["scalars"]["ppl"]) == set(VARIANTS)
    assert "| lm_infinite |" in (out / "report.md").read_text()
    assert (out / "figures" / "nll_by_position.png").is_file()
    with pytest.raises(FileNotFoundError, match="natural"):
        length_command(model, tmp_path / "other", trained_len=8, eval_len=20, text="no-such-file.txt")
    assert not (tmp_path / "other").exists()


def test_short_context_suite_config_loads():
    _, configs = load_config("short_context")
    assert configs[0].seq_len == 64 and configs[0].corpus["sentences_per_text"] == 16
