"""The benchmarks' shared pieces: command-line options that refuse bad values with a usage error,
the matmul ceiling's three weight layouts, and the patching bounds' FLOP counts."""

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from harness import matmul_chain_ceiling  # noqa: E402
from bench_vs_transformerlens import SWEEPS  # noqa: E402
from patching_bounds import layer_flops, resumed_flops  # noqa: E402
from shapes import SHAPES, add_shape_arguments, chosen_points, comma_ints, names_from  # noqa: E402


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_shape_arguments(parser)
    parser.add_argument("--sites", type=names_from(("resid_pre", "z")), default=["resid_pre", "z"])
    parser.add_argument("--corrupt-at", type=comma_ints(0), default=[])
    return parser.parse_args(argv)


def test_comma_lists_parse_into_the_points():
    args = parse("--model", "smollm2-shape", "--batches", "1,8,32", "--pos", "16", "--sites", "z")
    base, depths, batches, lengths = chosen_points(args)
    assert base is SHAPES["smollm2-shape"] and depths == [base.n_layers]
    assert (batches, lengths, args.sites) == ([1, 8, 32], [16], ["z"])
    assert chosen_points(parse("--layers", "4,8"))[1] == [4, 8]
    assert parse("--corrupt-at", "0,8").corrupt_at == [0, 8]


@pytest.mark.parametrize("argv, message", [
    (("--batches", "0,8"), "every value must be at least 1"),
    (("--pos", "8,x"), "not a comma list of integers"),
    (("--layers", ""), "not a comma list of integers"),
    (("--sites", "resid,z"), "choose a comma list from resid_pre, z"),
    (("--corrupt-at", "-1"), "every value must be at least 0"),
])
def test_bad_values_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse(*argv)
    assert message in capsys.readouterr().err


def test_matmul_ceiling_runs_each_weight_layout_and_refuses_others():
    cfg = SHAPES["smollm2-shape"].replace(n_layers=2, d_model=32, n_heads=2, n_kv_heads=1, d_head=16, d_mlp=64)
    rates = [matmul_chain_ceiling(cfg, 8, repeats=1, weights=w) for w in ("stacked", "per_layer", "one_layer")]
    assert all(r > 0 for r in rates)
    with pytest.raises(ValueError, match="use 'stacked', 'per_layer' or 'one_layer'"):
        matmul_chain_ceiling(cfg, 8, weights="cached")


def test_patching_bounds_count_each_sweeps_start_block_and_suffixes():
    cfg = SHAPES["gpt2-small-shape"].replace(n_layers=2)
    d, h, dh, batch, pos, shared = cfg.d_model, cfg.n_heads, cfg.d_head, 3, 6, 2
    full, mlp = layer_flops(cfg, pos + 1), 2 * 2 * d * cfg.d_mlp
    after_heads = 2 * h * dh * d + mlp  # output projection + MLP: the heads' outputs are reused
    kv_only, unembed = 2 * d * 2 * cfg.n_kv_heads * dh, 2 * 2 * d

    def mean_patch(start_block: int, positions) -> float:
        # From layer 0: the start block at the n recomputed positions, then the last block's keys and
        # values there and the rest at the metric position; from layer 1: the start block only.
        per = [0 if p < shared else (pos - p) * (start_block + kv_only) + full + (pos - p) * start_block
               for p in positions]
        return batch * (sum(per) / (cfg.n_layers * len(per)) + unembed)

    expected = {"patch_resid": mean_patch(full, range(pos)), "patch_z": mean_patch(after_heads, [shared]),
                "patch_z_pos": mean_patch(after_heads, range(pos))}
    assert set(SWEEPS) == set(expected)
    for task, (site, by, _) in SWEEPS.items():
        got = resumed_flops(cfg, batch, pos, by_position="pos" in by, from_heads=site == "z", shared=shared)
        assert got == pytest.approx(expected[task]), task
