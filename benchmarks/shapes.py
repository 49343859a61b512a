"""The model shapes the benchmarks run (random weights of real models' sizes) and the
command-line options that pick one, its depths, batches and lengths."""

from __future__ import annotations

import argparse

from jaxcirc.models.config import ModelConfig

GPT2_SMALL = ModelConfig(family="gpt2", n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072,
                         d_vocab=50257, n_ctx=1024, qkv_bias=True, o_bias=True, mlp_bias=True)
SMOLLM2_SHAPE = ModelConfig(family="llama", n_layers=30, d_model=576, n_heads=9, n_kv_heads=3, d_head=64,
                            d_mlp=1536, d_vocab=49152, n_ctx=8192, norm="rmsnorm", activation="silu",
                            gated_mlp=True, positional="rotary", rope={"theta": 100000.0, "rotary_dim": 64},
                            tied_embeddings=True)
SHAPES = {"gpt2-small-shape": GPT2_SMALL, "smollm2-shape": SMOLLM2_SHAPE}


def forward_flops(cfg: ModelConfig, batch: int, pos: int, unembed_positions: int = 1) -> float:
    """Matmul FLOPs of one forward of [batch, pos] tokens: projections, attention (full pos x pos,
    as computed), MLP, and the unembedding at `unembed_positions` positions per sequence."""
    d, h, kv, dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head
    per_token = 2 * d * (h + 2 * kv) * dh + 2 * h * dh * d + 2 * 2 * h * pos * dh
    per_token += 2 * d * cfg.d_mlp * (3 if cfg.gated_mlp else 2)
    return batch * (pos * cfg.n_layers * per_token + unembed_positions * 2 * d * cfg.d_vocab)


def add_shape_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --batches, --pos and --layers (comma lists), as the scaling scripts take them."""
    parser.add_argument("--model", choices=tuple(SHAPES), default="gpt2-small-shape")
    parser.add_argument("--batches", default="8")
    parser.add_argument("--pos", default="16")
    parser.add_argument("--layers", default=None, help="comma list of depths (default: the model's)")


def chosen_points(args: argparse.Namespace) -> tuple[ModelConfig, list[int], list[int], list[int]]:
    """(the shape, its depths, batch sizes, lengths) that `add_shape_arguments`' options ask for."""
    base = SHAPES[args.model]
    depths = [base.n_layers] if args.layers is None else [int(x) for x in args.layers.split(",")]
    return base, depths, [int(x) for x in args.batches.split(",")], [int(x) for x in args.pos.split(",")]
