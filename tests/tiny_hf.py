"""Tiny random-init HF checkpoints for tests: configs of every ported family, saved with
`save_pretrained`, plus the reference log-softmax computed by transformers itself.

Weights are drawn with a large `initializer_range` so logits are far from uniform and a
wrong rotation, head order or bias shows up as a large difference.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

VOCAB = 67
INIT = 0.3

# name -> (transformers config class name, model class name, config kwargs)
TINY: dict[str, tuple[str, str, dict[str, Any]]] = {
    # 3 heads of 8: an odd head count.
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(
        n_layer=2, n_embd=24, n_head=3, n_positions=64, vocab_size=VOCAB, initializer_range=INIT,
        bos_token_id=0, eos_token_id=0)),
    "neox_parallel": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB,
        max_position_embeddings=64, rotary_pct=0.25, use_parallel_residual=True, initializer_range=INIT)),
    "neox_sequential": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB,
        max_position_embeddings=64, rotary_pct=0.25, use_parallel_residual=False, initializer_range=INIT)),
    # GQA (4 query heads on 2 kv heads), llama3 rope scaling that matters past position 16,
    # untied head, attention and MLP biases.
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        vocab_size=VOCAB, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
        attention_bias=True, mlp_bias=True, initializer_range=INIT,
        rope_scaling={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    # Qwen2: q/k/v bias without an o bias; tied head; 6 query heads on 2 kv heads.
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2, intermediate_size=64,
        vocab_size=VOCAB, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_theta=1000.0, initializer_range=INIT)),
    # GPT-J: 3 heads of 8, interleaved rotary on 4 of the 8 dims, untied head with a bias.
    "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(
        n_embd=24, n_layer=2, n_head=3, rotary_dim=4, n_positions=64, vocab_size=VOCAB, initializer_range=INIT,
        bos_token_id=0, eos_token_id=0)),
    # BLOOM: 6 heads (not a power of two: the extra ALiBi slopes), tied head.
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(
        hidden_size=36, n_layer=2, n_head=6, vocab_size=VOCAB, initializer_range=INIT,
        bos_token_id=0, eos_token_id=0)),
    # Gemma 2: 3 layers (sliding, global, sliding) with a window of 8 < 40 tokens, head_dim 12
    # independent of d_model / n_heads, query_pre_attn_scalar != head_dim, GQA 4/2, soft caps low
    # enough to bind on these random weights.
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
        intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64, sliding_window=8,
        query_pre_attn_scalar=20, attn_logit_softcapping=3.0, final_logit_softcapping=5.0,
        rope_theta=1000.0, initializer_range=INIT, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
}

# Configs whose 1-D parameters (biases, norm weights) get random values on top of their init by
# default: HF initialises them to 0 and 1, which would leave a wrong bias or norm mapping unseen.
# (The parity tests randomise them for every config; other tests keep the older configs' init.)
RANDOM_VECTORS = {"gptj", "bloom", "gemma2"}


def make_model(name: str, seed: int = 0, random_vectors: bool | None = None):
    """A random-init transformers model (fp32, eager attention, eval mode) of the tiny config `name`;
    `random_vectors` adds N(0, INIT) to every bias and norm weight (default: for RANDOM_VECTORS)."""
    import torch
    import transformers

    config_cls, model_cls, kwargs = TINY[name]
    config = getattr(transformers, config_cls)(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).to(torch.float32).eval()
    if name in RANDOM_VECTORS if random_vectors is None else random_vectors:
        with torch.no_grad():
            for param in model.parameters():
                if param.ndim == 1:
                    param.add_(INIT * torch.randn_like(param))
    return model


def save(model, directory: Path, **save_kwargs) -> Path:
    directory = Path(directory)
    model.save_pretrained(directory, **save_kwargs)
    return directory


def save_torch_bin(model, directory: Path) -> Path:
    """A `pytorch_model.bin` checkpoint with the tensor names `save_pretrained` writes
    (transformers 5 only writes safetensors itself, and renames some modules on saving, e.g.
    GPT-NeoX's `lm_head` -> `embed_out`)."""
    import torch
    from safetensors.torch import load_file

    directory = Path(directory)
    model.save_pretrained(directory)
    tensors = load_file(directory / "model.safetensors")
    (directory / "model.safetensors").unlink()
    torch.save(tensors, directory / "pytorch_model.bin")
    return directory


def rewrite_config(directory: Path, change) -> dict:
    """Apply `change(config_dict)` to config.json in place; returns the new dict."""
    path = Path(directory) / "config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config, indent=2))
    return config


def hf_log_softmax(model, tokens: np.ndarray) -> np.ndarray:
    """transformers' log-softmax over every position: tokens [batch, pos] -> [batch, pos, vocab] float64."""
    import torch

    with torch.no_grad():
        logits = model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits
    return torch.log_softmax(logits.double(), dim=-1).numpy()


def random_tokens(batch: int, pos: int, vocab: int = VOCAB, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, pos)).astype(np.int32)


def write_word_tokenizer(directory: Path, vocab: int = VOCAB) -> list[str]:
    """A whitespace word-level tokenizer.json (words w0..w{vocab-1}) so text prompts work on tiny models."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders

    words = [f"w{i}" for i in range(vocab)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    backend.save(str(Path(directory) / "tokenizer.json"))
    return words
