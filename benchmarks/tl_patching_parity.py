"""Exact activation patching: jaxcirc vs TransformerLens 3.9 on the same weights and pairs.

    python benchmarks/tl_patching_parity.py            # prints max |difference| and timings

A random-init HF checkpoint (a tiny GPT-2 and a tiny Llama with grouped-query attention) is
written with `save_pretrained`, loaded into TransformerLens offline (HookedTransformerConfig +
`transformer_lens.pretrained.weight_conversions`, no folding or centering, so hook activations are
the raw ones) and into jaxcirc with `load_hf_directory`. Both run denoising patching (corrupted
run, clean activations patched in) with the mean logit difference at the last position:
`get_act_patch_resid_pre` -> [layer, pos] and `get_act_patch_attn_head_out_all_pos` -> [layer, head].
`tests/test_patching.py` imports `compare` from here.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

VOCAB = 83

# name -> (transformers config class, model class, config kwargs)
CHECKPOINTS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(
        n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=VOCAB, initializer_range=0.3)),
    # TransformerLens' Llama converter has no attention/MLP biases, so none here.
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64, rms_norm_eps=1e-5,
        tie_word_embeddings=False, rope_theta=10000.0, initializer_range=0.3)),
}


def random_hf_model(config_cls: str, model_cls: str, kwargs: dict[str, Any], seed: int = 0, jitter: float = 0.1):
    """A random fp32 transformers model (eager attention); every parameter (biases and norm weights
    included) gets jitter * N(0, 1) added, so that none is at its trivial initial value."""
    import torch
    import transformers

    config = getattr(transformers, config_cls)(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).to(torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(jitter * torch.randn_like(p))
    return model


def make_hf_model(name: str, seed: int = 0):
    """The named tiny checkpoint of CHECKPOINTS, random and jittered (`random_hf_model`)."""
    config_cls, model_cls, kwargs = CHECKPOINTS[name]
    return random_hf_model(config_cls, model_cls, kwargs, seed)


def require_transformer_lens() -> None:
    """Exit with what to install when TransformerLens (the `bench` extra) is missing."""
    try:
        import transformer_lens  # noqa: F401
    except ImportError:
        sys.exit("TransformerLens is not installed; the benchmarks compare against it: pip install -e '.[bench]' "
                 "(or .venv/bin/pip install 'transformer_lens>=3.9,<4')")


def tl_model(name: str, hf_model):
    """A TransformerLens HookedTransformer holding the HF model's weights (offline, unfolded)."""
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights, convert_llama_weights

    c = hf_model.config
    if name == "gpt2":
        cfg = HookedTransformerConfig(
            d_model=c.n_embd, d_head=c.n_embd // c.n_head, n_heads=c.n_head, d_mlp=4 * c.n_embd,
            n_layers=c.n_layer, n_ctx=c.n_positions, eps=c.layer_norm_epsilon, d_vocab=c.vocab_size,
            act_fn="gelu_new", normalization_type="LN", positional_embedding_type="standard",
            original_architecture="GPT2LMHeadModel", default_prepend_bos=False, device="cpu",
            dtype=torch.float32)
        state = convert_gpt2_weights(hf_model, cfg)
    else:
        d_head = c.hidden_size // c.num_attention_heads
        cfg = HookedTransformerConfig(
            d_model=c.hidden_size, d_head=d_head, n_heads=c.num_attention_heads, d_mlp=c.intermediate_size,
            n_layers=c.num_hidden_layers, n_ctx=c.max_position_embeddings, eps=c.rms_norm_eps,
            d_vocab=c.vocab_size, act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary",
            rotary_dim=d_head, rotary_base=_rope_theta(c), rotary_adjacent_pairs=False, final_rms=True,
            gated_mlp=True, n_key_value_heads=c.num_key_value_heads, original_architecture="LlamaForCausalLM",
            default_prepend_bos=False, device="cpu", dtype=torch.float32)
        state = convert_llama_weights(hf_model, cfg)
    model = HookedTransformer(cfg)
    model.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=False,
                                      refactor_factored_attn_matrices=False)
    return model.eval()


def _rope_theta(config) -> float:
    """The HF config's rotary base (transformers 5 keeps it in `rope_parameters`)."""
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return float(theta)


def make_pairs(batch: int = 4, pos: int = 6, seed: int = 1):
    """Equal-length random clean/corrupt token pairs with answer/foil ids (numpy)."""
    rng = np.random.default_rng(seed)
    clean = rng.integers(0, VOCAB, (batch, pos)).astype(np.int32)
    corrupt = clean.copy()
    corrupt[:, 1:3] = rng.integers(0, VOCAB, (batch, 2))  # a couple of positions differ
    answer = rng.integers(0, VOCAB, batch).astype(np.int32)
    foil = (answer + 1 + rng.integers(0, VOCAB - 1, batch)) % VOCAB
    return clean, corrupt, answer, foil.astype(np.int32)


def tl_sweeps(model, clean, corrupt, answer, foil) -> dict[str, np.ndarray]:
    """TransformerLens' patching functions with the mean logit difference at the last position."""
    import torch
    from transformer_lens import patching

    rows = torch.arange(len(answer))
    answer_t, foil_t = torch.as_tensor(answer).long(), torch.as_tensor(foil).long()

    def metric(logits):
        last = logits[:, -1]
        return (last[rows, answer_t] - last[rows, foil_t]).mean()

    clean_t, corrupt_t = torch.as_tensor(clean).long(), torch.as_tensor(corrupt).long()
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean_t)
        return {
            "resid_pre": patching.get_act_patch_resid_pre(model, corrupt_t, clean_cache, metric).numpy(),
            "z": patching.get_act_patch_attn_head_out_all_pos(model, corrupt_t, clean_cache, metric).numpy(),
        }


def jaxcirc_sweeps(directory: Path, clean, corrupt, answer, foil) -> dict[str, np.ndarray]:
    from jaxcirc.model import Model
    from jaxcirc.models.hf import load_hf_directory
    from jaxcirc.pairs import from_tokens
    from jaxcirc.patching import patch_sweep

    cfg, params, _ = load_hf_directory(directory)
    model = Model(cfg, params)
    pairs = from_tokens(clean, corrupt, answer, foil)
    return {
        "resid_pre": patch_sweep(model, pairs, "resid_pre", ("layer", "pos"), direction="denoising").patch_effect,
        "z": patch_sweep(model, pairs, "z", ("layer", "head"), direction="denoising").patch_effect,
    }


def compare(name: str, directory: Path | None = None) -> dict[str, Any]:
    """Max |jaxcirc - TransformerLens| per sweep for checkpoint `name`, with the arrays and timings."""
    import torch

    torch.set_num_threads(1)
    hf_model = make_hf_model(name)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(directory or tmp) / name
        hf_model.save_pretrained(path)
        data = make_pairs()
        start = time.perf_counter()
        ours = jaxcirc_sweeps(path, *data)
        ours_s = time.perf_counter() - start
    start = time.perf_counter()
    theirs = tl_sweeps(tl_model(name, hf_model), *data)
    theirs_s = time.perf_counter() - start
    return {
        "max_abs_diff": {k: float(np.max(np.abs(ours[k] - theirs[k]))) for k in ours},
        "scale": {k: float(np.max(np.abs(theirs[k]))) for k in theirs},
        "ours": ours, "theirs": theirs, "jaxcirc_s": ours_s, "transformer_lens_s": theirs_s,
    }


def main() -> int:
    require_transformer_lens()
    worst = 0.0
    for name in CHECKPOINTS:
        result = compare(name)
        for sweep, diff in result["max_abs_diff"].items():
            worst = max(worst, diff)
            print(f"{name:6s} {sweep:10s} max|jaxcirc - TL| = {diff:.2e}  (max |effect| "
                  f"{result['scale'][sweep]:.3f})")
        print(f"{name:6s} time: jaxcirc {result['jaxcirc_s']:.2f} s (incl. compile), "
              f"TransformerLens {result['transformer_lens_s']:.2f} s")
    ok = worst <= 1e-4
    print("PASS" if ok else "FAIL", f"worst difference {worst:.2e} (tolerance 1e-4)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
