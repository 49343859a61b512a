"""The model shapes the benchmarks run (random weights of real models' sizes) and the
command-line options that pick one, its depths, batches and lengths."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

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


def comma_ints(minimum: int = 1) -> Callable[[str], list[int]]:
    """argparse type: a comma list of integers, each at least `minimum` ("1,8,32")."""
    def parse(text: str) -> list[int]:
        try:
            values = [int(x) for x in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of integers (e.g. 1,8,32)") from None
        if min(values) < minimum:
            raise argparse.ArgumentTypeError(f"{text!r}: every value must be at least {minimum}")
        return values
    return parse


def names_from(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """argparse type: a comma list of names, each one of `choices`."""
    def parse(text: str) -> list[str]:
        names = [x.strip() for x in text.split(",") if x.strip()]
        unknown = [x for x in names if x not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"{text!r}: choose a comma list from {', '.join(choices)}")
        return names
    return parse


def add_shape_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --batches, --pos and --layers (comma lists), as the scaling scripts take them."""
    parser.add_argument("--model", choices=tuple(SHAPES), default="gpt2-small-shape")
    parser.add_argument("--batches", type=comma_ints(), default=[8])
    parser.add_argument("--pos", type=comma_ints(), default=[16])
    parser.add_argument("--layers", type=comma_ints(), default=None, help="comma list of depths (default: the model's)")


def chosen_points(args: argparse.Namespace) -> tuple[ModelConfig, list[int], list[int], list[int]]:
    """(the shape, its depths, batch sizes, lengths) that `add_shape_arguments`' options ask for."""
    base = SHAPES[args.model]
    return base, args.layers or [base.n_layers], args.batches, args.pos
