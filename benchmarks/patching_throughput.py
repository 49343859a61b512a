"""Patches per second of exact activation patching on a GPT-2-small-shaped random model.

    python benchmarks/patching_throughput.py [--batch 8] [--pos 16] [--dtype bfloat16] [--tl] [--loop]

Sweeps resid_pre by (layer, pos), head outputs (attn.hook_z) by (layer, head) and by (layer,
pos, head) (`bench_vs_transformerlens.SWEEPS`), denoising, logit difference. Reports the first
call (compile + run) and the steady-state time of a second call. `--loop` also times a Python
loop of single patched forwards through the same jitted forward (the TransformerLens way, in
JAX); `--tl` times TransformerLens 3.9's `get_act_patch_resid_pre` /
`get_act_patch_attn_head_out_all_pos` on a same-shaped model (one forward per patch, so the
by-position head sweep's rate is theirs too; its 2,304 forwards are not run).
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np

from jaxcirc.hooks import Hooks, replace
from jaxcirc.model import Model
from jaxcirc.models.config import ModelConfig
from jaxcirc.models.transformer import param_shapes
from jaxcirc.pairs import from_tokens
from jaxcirc.patching import compile_log, patch_sweep
from bench_vs_transformerlens import SWEEPS
from shapes import GPT2_SMALL
from tl_patching_parity import require_transformer_lens



def random_params(cfg: ModelConfig, seed: int = 0) -> dict:
    """N(0, 0.02^2) weights, unit norm weights (drawn with NumPy: no compile per shape) in
    `cfg.dtype`, on the device."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        keys = [str(getattr(k, "key", k)) for k in path]
        if keys[-1] == "w" and any(k.startswith("ln") for k in keys):
            return np.ones(leaf.shape, leaf.dtype)
        return (0.02 * rng.standard_normal(leaf.shape, np.float32)).astype(leaf.dtype)

    # On the device once: NumPy leaves would be copied to it again on every jitted call.
    return jax.device_put(jax.tree_util.tree_map_with_path(draw, param_shapes(cfg)))


def make_pairs(batch: int, pos: int, vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    clean = rng.integers(0, vocab, (batch, pos)).astype(np.int32)
    corrupt = clean.copy()
    corrupt[:, pos // 3] = rng.integers(0, vocab, batch)
    return from_tokens(clean, corrupt, rng.integers(0, vocab, batch), rng.integers(0, vocab, batch))


def time_sweep(model, pairs, site, by, **options) -> dict:
    with compile_log() as compiled:
        start = time.perf_counter()
        result = patch_sweep(model, pairs, site, by, **options)
        first = time.perf_counter() - start
    start = time.perf_counter()
    patch_sweep(model, pairs, site, by, **options)
    steady = time.perf_counter() - start
    return {"site": site, "by": by, "n_patches": result.n_patches, "chunk": result.chunk_size,
            "n_chunks": result.n_chunks, "first_s": first, "steady_s": steady,
            "patches_per_s": result.n_patches / steady, "compiled": compiled}


def time_loop(model, pairs, n: int = 8) -> float:
    """Seconds per patch of single patched forwards through the jitted forward (resid_pre at one
    layer and the last position, a different value each call; compile excluded)."""
    name = "blocks.5.hook_resid_pre"
    _, cache = model.forward(model.params, pairs.clean, Hooks(cache=(name,)))
    mask = np.zeros((1, pairs.n_pos, 1), bool)
    mask[0, -1] = True

    def one(scale):
        hooks = Hooks({name: replace(cache[name] * scale, mask)})
        return jax.block_until_ready(model.forward(model.params, pairs.corrupt, hooks, logits_at=pairs.position))

    one(1.0)
    start = time.perf_counter()
    for i in range(n):
        one(1.0 + i)
    return (time.perf_counter() - start) / n


def time_transformer_lens(batch: int, pos: int) -> dict:
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig, patching

    torch.manual_seed(0)
    c = GPT2_SMALL
    model = HookedTransformer(HookedTransformerConfig(
        d_model=c.d_model, d_head=c.d_head, n_heads=c.n_heads, d_mlp=c.d_mlp, n_layers=c.n_layers,
        n_ctx=c.n_ctx, d_vocab=c.d_vocab, act_fn="gelu_new", normalization_type="LN", device="cpu")).eval()
    rng = np.random.default_rng(0)
    clean = torch.as_tensor(rng.integers(0, c.d_vocab, (batch, pos)))
    corrupt = clean.clone()
    corrupt[:, pos // 3] = torch.as_tensor(rng.integers(0, c.d_vocab, batch))
    answer, foil = torch.as_tensor(rng.integers(0, c.d_vocab, batch)), torch.as_tensor(rng.integers(0, c.d_vocab, batch))
    rows = torch.arange(batch)

    def metric(logits):
        return (logits[rows, -1, answer] - logits[rows, -1, foil]).mean()

    out = {}
    with torch.no_grad():
        _, cache = model.run_with_cache(clean)
        for name, fn, n in (("resid_pre", patching.get_act_patch_resid_pre, c.n_layers * pos),
                            ("z", patching.get_act_patch_attn_head_out_all_pos, c.n_layers * c.n_heads)):
            start = time.perf_counter()
            fn(model, corrupt, cache, metric)
            out[name] = n / (time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--pos", type=int, default=16)
    parser.add_argument("--max-patches-per-chunk", type=int, default=None)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--loop", action="store_true")
    parser.add_argument("--tl", action="store_true")
    args = parser.parse_args()
    if args.tl:
        require_transformer_lens()
    print(f"device: {jax.devices()[0].device_kind} x{len(jax.devices())}, CPUs {os.cpu_count()}, "
          f"model GPT-2-small shape ({args.dtype}), batch {args.batch} x {args.pos} tokens")
    cfg = GPT2_SMALL.replace(dtype=args.dtype)
    model = Model(cfg, random_params(cfg))
    pairs = make_pairs(args.batch, args.pos, GPT2_SMALL.d_vocab)
    options = {"max_patches_per_chunk": args.max_patches_per_chunk}
    for site, by, _ in SWEEPS.values():
        r = time_sweep(model, pairs, site, by, **options)
        print(f"{site:9s} by {','.join(by):14s}: {r['n_patches']} patches in {r['n_chunks']} chunk(s) of "
              f"{r['chunk']}; first call {r['first_s']:.1f} s (compiled {r['compiled']}), steady "
              f"{r['steady_s']:.2f} s = {r['patches_per_s']:.1f} patches/s")
    if args.loop:
        per = time_loop(model, pairs)
        print(f"python loop of single patched forwards (jitted, compile excluded): {1 / per:.1f} patches/s")
    if args.tl:
        for name, rate in time_transformer_lens(args.batch, args.pos).items():
            print(f"TransformerLens 3.9 {name}: {rate:.1f} patches/s")


if __name__ == "__main__":
    main()
