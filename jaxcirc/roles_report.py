"""`jaxcirc roles MODEL_OR_SUITE --out DIR`: semantic-role circuits end to end (experiments.md A).

    from jaxcirc.roles_report import roles_command
    roles_command("smollm2-135m", "runs/roles", suite_dir="runs/role_suite")          # quick
    roles_command("smollm2-135m", "runs/roles_full", suite_dir="runs/role_suite", quick=False)

For a pretrained model (default SmolLM2-135M) and, when given or found, the built-in trained suite
(`jaxcirc train role_suite --out runs/role_suite`; a folder of model runs with step_N checkpoints,
or a folder of Pythia step revisions):
  1. role-cross minimal pairs per model (`jaxcirc.role_pairs`), filtered to pairs the model (the
     final checkpoint of a series) gets right in both contexts; kept/dropped counts per role;
  2. per role: EAP-IG (5 steps, metric log p(target), A.4/A.5) averaged over the role's pairs, the
     top-200-edge circuit, its attribution concentration (A.6) and its faithfulness by exact edge
     patching with corrupted activations (A.7; logit difference and accuracy versions);
  3. per series: the circuit, accuracy and node Jaccard at every checkpoint, consolidation time and
     change-point fits with bootstrap CIs (`jaxcirc.emergence`, A.8);
  4. across models: node and edge overlap (index and depth-normalised matching), Laplacian spectral
     similarity (k = 16) and linear CKA on shared prompts (A.9);
and writes a run directory (`jaxcirc.rundir`) whose report puts each measured number next to the
paper's (A.1). Nothing here is tuned to the paper's numbers: every setting is fixed in advance and
recorded in results.json.

The quick run (default) samples `QUICK["pairs_per_role"]` pairs per role per model; `quick=False`
uses `FULL`. The report says which.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcirc import rundir
from jaxcirc.circuit import Circuit, draw_circuit, edge_ranks
from jaxcirc.concentration import Concentration, concentration
from jaxcirc.edge_patch import EdgeLayout, EdgePatch, node_output_cache_names, node_outputs
from jaxcirc.emergence import (RULE, NodeIndex, RoleEmergence, analyse_role, bootstrap_counts, chance_jaccard,
                               checkpoint_nodes, chunk_size, emergence_figure, per_pair_edge_scores, top_k_edges)
from jaxcirc.hooks import Hooks
from jaxcirc.models.config import ModelConfig
from jaxcirc.models.transformer import make_forward
from jaxcirc.overlap import overlap
from jaxcirc.pairs import MinimalPairs
from jaxcirc.role_pairs import RolePairs, build_role_pairs, default_role_set
from jaxcirc.spectral import compare_spectra

Array = jax.Array

QUICK = {"pairs_per_role": 16, "suite_pairs_per_role": 16}
FULL = {"pairs_per_role": 256, "suite_pairs_per_role": 128}
SUITE_LOCATIONS = ("runs/role_suite",)
TRAIN_HINT = "jaxcirc train role_suite --out runs/role_suite   (= jaxcirc/suites/role_suite.toml; about 15 min on 2 CPU cores)"
DEPTH_BINS = 4
SPECTRAL_K = 16
N_BOOT = 200
METRIC = "logprob"
# Faithfulness is also measured for these bigger top-k circuits (when smaller than the graph), to show
# how many edges a model needs, since 200 edges is a far smaller share of a 30-layer model's graph.
LARGER_CIRCUITS = (1000, 10000)

# experiments.md A.1 (abstract of v1 and of v2 / ACL Findings; the edge-overlap row is secondary).
PAPER = {
    "concentration": ("89-94 % within <= 28 nodes", "89-92 % within <= 28 nodes"),
    "node_overlap": ("24-59 %", "24-51 %"),
    "edge_overlap": ("-", "11-17 %"),
    "spectral": ("high", "high; larger models reuse similar components while rewiring connections"),
    "emergence": ("gradual structural refinement, not phase transitions",
                  "gradual; structure stabilises before functional engagement"),
    "consolidation": ("Pythia checkpoints; transition steps 32, 128, ~2k, 5k, 10k, 50k of 143k (A.2, A.8)",
                      "'all consolidate within ~2k steps' (Table 2; other tables give 5k and 50k)"),
    "models": "Pythia-14M / 410M / 1B and Llama-3.2-1B; 6,028-7,988 pairs per model; EAP-IG m = 5",
}


# ----------------------------------------------------------------------------- timing


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class _Clock:
    """Wall and CPU seconds per named stage (CPU time matters on a shared machine)."""

    def __init__(self):
        self.start_wall, self.start_cpu = time.perf_counter(), _cpu_seconds()
        self.stages: dict[str, dict[str, float]] = {}

    def stage(self, name: str):
        clock = self

        class _Stage:
            def __enter__(self):
                self.wall, self.cpu = time.perf_counter(), _cpu_seconds()

            def __exit__(self, *exc):
                entry = clock.stages.setdefault(name, {"wall_s": 0.0, "cpu_s": 0.0})
                entry["wall_s"] += time.perf_counter() - self.wall
                entry["cpu_s"] += _cpu_seconds() - self.cpu

        return _Stage()

    def total(self) -> dict[str, float]:
        return {"wall_s": time.perf_counter() - self.start_wall, "cpu_s": _cpu_seconds() - self.start_cpu}


# ----------------------------------------------------------------------------- per-pair model values


@partial(jax.jit, static_argnames=("cfg",))
def _pair_values(params: Any, pairs: MinimalPairs, *, cfg: ModelConfig) -> Array:
    """[batch, 3]: clean-context logit(target), logit(foil), log p(target)."""
    forward = make_forward(cfg, jit=False)
    logits, _ = forward(params, pairs.clean, None, logits_at=pairs.position)
    logits = logits.astype(jnp.float32)
    rows = jnp.arange(logits.shape[0])
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.stack([logits[rows, pairs.answer], logits[rows, pairs.foil], logp[rows, pairs.answer]], axis=-1)


@partial(jax.jit, static_argnames=("cfg", "layout"))
def _patched_pair_logits(params: Any, pairs: MinimalPairs, masks: Array, *, cfg: ModelConfig,
                         layout: EdgeLayout) -> Array:
    """[2 + n_masks, batch, 2] logit(target), logit(foil) of the clean run, the corrupted run, and the
    clean run with each mask's edges [n_masks, n_src, n_dst] patched to corrupted activations."""
    forward = make_forward(cfg, jit=False)
    corrupt_logits, cache = forward(params, pairs.corrupt, Hooks(cache=node_output_cache_names(cfg)),
                                    logits_at=pairs.position)
    source = node_outputs(cfg, cache, layout)
    clean_logits, _ = forward(params, pairs.clean, None, logits_at=pairs.position)

    def patched(mask: Array) -> Array:
        logits, _ = forward(params, pairs.clean, Hooks(edges=EdgePatch(mask, source, layout)), logits_at=pairs.position)
        return logits

    logits = jnp.concatenate([clean_logits[None], corrupt_logits[None], jax.vmap(patched)(masks)]).astype(jnp.float32)
    rows = jnp.arange(logits.shape[1])
    return jnp.stack([logits[:, rows, pairs.answer], logits[:, rows, pairs.foil]], axis=-1)


def _chunked(pairs: MinimalPairs, size: int, fn: Callable[[MinimalPairs], Array], axis: int = 0) -> np.ndarray:
    """Apply fn to chunks of exactly `size` pairs (the last padded by repeats: one compiled shape) and
    concatenate the real rows along `axis`."""
    n = len(pairs)
    out = []
    for start in range(0, n, size):
        idx = np.minimum(np.arange(start, start + size), n - 1)
        value = np.asarray(fn(pairs.take(idx)))
        out.append(np.take(value, np.arange(min(size, n - start)), axis=axis))
    return np.concatenate(out, axis=axis)


def pair_values(model: Any, pairs: MinimalPairs, batch_size: int | None = None) -> np.ndarray:
    """[n, 3] clean-context logit(target), logit(foil), log p(target) of every pair (chunks of
    `batch_size`, default chunk_size(n, 64))."""
    size = batch_size or chunk_size(len(pairs), 64)
    return _chunked(pairs, size, lambda p: _pair_values(model.params, p, cfg=model.config))


def circuit_faithfulness(model: Any, pairs: MinimalPairs, keep: np.ndarray, layout: EdgeLayout,
                         batch_size: int | None = None, larger: Mapping[int, np.ndarray] | None = None
                         ) -> dict[str, Any]:
    """Faithfulness of the circuit `keep` [n_src, n_dst] (bool) by exact edge patching (A.7).

    Corrupted-activation patching. full = clean run, null = corrupted run (every edge patched),
    circuit = only the circuit's edges keep clean activations, ablated = only the circuit's edges
    patched. F = (circuit - null) / (full - null) of the batch-mean logit difference; necessity =
    1 - (ablated - null) / (full - null); the accuracy versions use the fraction of pairs with
    logit(target) > logit(foil) (A.7's F = (acc_circuit - acc_null) / (acc_full - acc_null)).
    `larger`: {n_edges: keep mask} of bigger circuits whose F (both versions) is reported as "by_size".
    Chunks of `batch_size` pairs (default chunk_size(n, 8); memory grows with it and the masks).
    """
    valid = layout.valid()
    keep = np.asarray(keep, bool) & valid
    larger = dict(larger or {})
    keeps = [np.asarray(m, bool) & valid for m in larger.values()]
    masks = jnp.asarray(np.stack([valid & ~keep, keep] + [valid & ~m for m in keeps]).astype(np.float32))
    size = batch_size or chunk_size(len(pairs), 8)
    values = _chunked(pairs, size, lambda p: _patched_pair_logits(model.params, p, masks, cfg=model.config,
                                                                  layout=layout), axis=1)
    diff = values[..., 0] - values[..., 1]          # [4 + len(larger), n]: full, null, circuit, ablated, larger
    ld = diff.mean(1)
    acc = (diff > 0).mean(1)

    def norm(v: np.ndarray, i: int) -> float:
        span = v[0] - v[1]
        return float((v[i] - v[1]) / span) if span != 0 else float("nan")

    return {"faithfulness": norm(ld, 2), "necessity": 1 - norm(ld, 3), "faithfulness_acc": norm(acc, 2),
            "necessity_acc": 1 - norm(acc, 3), "logit_diff": {k: float(v) for k, v in zip(
                ("full", "null", "circuit", "ablated"), ld)},
            "accuracy": {k: float(v) for k, v in zip(("full", "null", "circuit", "ablated"), acc)},
            "by_size": {int(k): {"faithfulness": norm(ld, 4 + i), "faithfulness_acc": norm(acc, 4 + i)}
                        for i, k in enumerate(larger)},
            "n_edges": int(keep.sum()), "n_valid": int(valid.sum()), "n_pairs": len(pairs),
            "ablation": "corrupt (exact edge patching)"}


# ----------------------------------------------------------------------------- per model


@dataclasses.dataclass
class RoleResult:
    """One model's circuit for one role."""

    role: str
    n_pairs: int
    scores: np.ndarray                      # [n_src, n_dst] mean EAP-IG score
    circuit: Circuit
    concentration: Concentration
    faithfulness: dict[str, Any]


@dataclasses.dataclass
class ModelResult:
    """Everything measured on one model (a pretrained model or a series' final checkpoint)."""

    label: str
    kind: str                               # "pretrained" | "series"
    source: str
    source_hash: str
    config: ModelConfig
    pairs: RolePairs
    roles: dict[str, RoleResult]
    emergence: dict[str, RoleEmergence] | None = None
    steps: tuple[int, ...] | None = None
    series_scores: dict[str, np.ndarray] | None = None   # role -> [T, n_src, n_dst]
    chance_jaccard: tuple[float, float] | None = None     # (node, edge) Jaccard of two random circuits


@dataclasses.dataclass(frozen=True)
class Chunks:
    """Pairs per compiled chunk for one model: EAP-IG, exact edge patching, plain forwards. Fixed for
    all of a model's roles and checkpoints, so each program compiles once per model config."""

    eap: int
    patch: int
    values: int

    @classmethod
    def for_model(cls, cfg: ModelConfig, n_max: int, batch_size: int | None = None) -> "Chunks":
        # Small chunks for big models (EAP-IG memory grows fast with the batch), bigger for tiny ones.
        eap = int(batch_size) if batch_size else (8 if cfg.n_layers * cfg.d_model > 4096 else 32)
        return cls(chunk_size(n_max, eap), chunk_size(n_max, min(eap, 8)), chunk_size(n_max, 64))


def _role_result(model: Any, label: str, role: str, scores: np.ndarray, pairs: MinimalPairs, layout: EdgeLayout,
                 top_k: int, steps: int, role_set: str, batch_size: int | None) -> RoleResult:
    provenance = {"model": label, "model_hash": model.source_hash, "task": f"role:{role}", "method": "eap-ig",
                  "steps": steps, "metric": METRIC, "n_pairs": len(pairs), "role_set": role_set}
    circuit = Circuit.from_scores(scores, layout, top_k=top_k, provenance=provenance)
    ranks = edge_ranks(scores, layout)
    n_valid = int(layout.valid().sum())
    larger = {k: ranks < k for k in LARGER_CIRCUITS if top_k < k < n_valid}
    faith = circuit_faithfulness(model, pairs, circuit.edge_mask(layout), layout, batch_size=batch_size,
                                 larger=larger)
    return RoleResult(role, len(pairs), scores, circuit, concentration(circuit), faith)


def analyse_model(model: Any, label: str, *, pairs_per_role: int, roles: Sequence[str] | None, steps: int,
                  top_k: int, seed: int, role_set: str = "auto", batch_size: int | None = None,
                  log: Callable = lambda items, description, total=None: items) -> ModelResult:
    """Pairs, per-role EAP-IG circuits, concentration and faithfulness of one model."""
    cfg = model.config
    rs = default_role_set(model.tokenizer) if role_set == "auto" else role_set
    rp = build_role_pairs(model, rs, pairs_per_role=pairs_per_role, role_names=roles, seed=seed)
    if not rp.roles:
        raise ValueError(f"{label}: no role has a minimal pair the model gets right in both contexts "
                         f"(pair counts before filtering: {pairs_per_role} per role); the model is too weak "
                         "for the role analysis (train it longer) or the roles were filtered out.")
    layout = EdgeLayout.canonical(cfg)
    chunks = Chunks.for_model(cfg, max(rp.counts().values()), batch_size)
    results = {}
    for role in log(rp.roles, f"{label}: EAP-IG + faithfulness per role"):
        scores = per_pair_edge_scores(cfg, model.params, rp.pairs[role], steps=steps, metric=METRIC,
                                      batch_size=chunks.eap)
        results[role] = _role_result(model, label, role, scores.mean(0), rp.pairs[role], layout, top_k, steps, rs,
                                     chunks.patch)
    return ModelResult(label, "pretrained", model.source, model.source_hash, cfg, rp, results)


def analyse_series(series: Any, label: str, *, pairs_per_role: int, roles: Sequence[str] | None, steps: int,
                   top_k: int, seed: int, n_boot: int = N_BOOT, role_set: str = "auto",
                   batch_size: int | None = None,
                   log: Callable = lambda items, description, total=None: items) -> ModelResult:
    """Emergence over a checkpoint series: pairs filtered by the final checkpoint (A.3), then per
    checkpoint per role the per-pair EAP-IG scores, top-k node sets (and bootstrap resamples), and
    clean-context accuracy; the final checkpoint's circuits get concentration and faithfulness."""
    final_step = series.steps[-1]
    final = series.load(final_step)
    cfg = final.config
    rs = default_role_set(final.tokenizer) if role_set == "auto" else role_set
    rp = build_role_pairs(final, rs, pairs_per_role=pairs_per_role, role_names=roles, seed=seed)
    layout = EdgeLayout.canonical(cfg)
    index = NodeIndex.from_layout(layout)
    chunks = Chunks.for_model(cfg, max(rp.counts().values()), batch_size)
    role_list = rp.roles
    counts = {r: bootstrap_counts(len(rp.pairs[r]), n_boot, seed + 1000 + i) for i, r in enumerate(role_list)}
    presence = {r: [] for r in role_list}
    edges = {r: [] for r in role_list}
    boot_presence = {r: [] for r in role_list}
    means = {r: [] for r in role_list}
    values = {r: [] for r in role_list}
    for step, model in log(series.models(), f"{label}: checkpoints", total=len(series)):
        if model.config != cfg:
            raise ValueError(f"{label}: checkpoint step {step} has a different architecture than the final one.")
        for role in role_list:
            scores = per_pair_edge_scores(cfg, model.params, rp.pairs[role], steps=steps, metric=METRIC,
                                          batch_size=chunks.eap)
            mean, nodes, boot = checkpoint_nodes(scores, counts[role], index, top_k)
            means[role].append(mean)
            presence[role].append(nodes)
            edges[role].append(top_k_edges(mean, index, top_k))
            boot_presence[role].append(boot)
            values[role].append(pair_values(model, rp.pairs[role], chunks.values))
    steps_list = tuple(int(s) for s in series.steps)
    emergence, results = {}, {}
    for role in role_list:
        v = np.stack(values[role])                                   # [T, n, 3]
        emergence[role] = analyse_role(steps_list, np.stack(presence[role]), np.stack(boot_presence[role]),
                                       v[..., 0] > v[..., 1], v[..., 2], counts[role], n_valid=index.n_valid,
                                       top_k=top_k, edge_presence=np.stack(edges[role]))
        results[role] = _role_result(final, label, role, means[role][-1], rp.pairs[role], layout, top_k, steps,
                                     rs, chunks.patch)
    return ModelResult(label, "series", str(series.directory), final.source_hash, cfg, rp, results, emergence,
                       steps_list, {r: np.stack(means[r]) for r in role_list}, chance_jaccard(index, top_k, seed=seed))


# ----------------------------------------------------------------------------- across models


def compare_models(results: Sequence[ModelResult], bins: int = DEPTH_BINS, k: int = SPECTRAL_K) -> dict[str, Any]:
    """Per role and model pair: node/edge Jaccard (index and depth rules); spectral similarity of
    every circuit against every other (models x roles)."""
    labels = [r.label for r in results]
    roles = [role for role in results[0].roles if all(role in r.roles for r in results)] if results else []
    overlaps: dict[str, dict[str, dict[str, float]]] = {}
    for a, b in itertools.combinations(range(len(results)), 2):
        key = f"{labels[a]} vs {labels[b]}"
        overlaps[key] = {}
        for role in roles:
            ca, cb = results[a].roles[role].circuit, results[b].roles[role].circuit
            index, depth = overlap(ca, cb, "index"), overlap(ca, cb, "depth", bins=bins)
            overlaps[key][role] = {"node_index": index.node_jaccard, "edge_index": index.edge_jaccard,
                                   "node_depth": depth.node_jaccard, "edge_depth": depth.edge_jaccard}
    circuits, names = [], []
    for r in results:
        for role, rr in r.roles.items():
            circuits.append(rr.circuit)
            names.append((r.label, role))
    spectral = compare_spectra(circuits, k=k) if len(circuits) > 1 else None
    return {"labels": labels, "roles": roles, "overlaps": overlaps, "spectral": spectral, "spectral_names": names,
            "depth_bins": bins, "spectral_k": k}


def spectral_ranges(comparison: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Similarity ranges: same role in different models, and different roles within one model."""
    spec, names = comparison["spectral"], comparison["spectral_names"]
    out: dict[str, list[float]] = {"same role, different models": [], "different roles, same model": []}
    per_pair: dict[str, list[float]] = {}
    if spec is None:
        return {}
    for i, j in itertools.combinations(range(len(names)), 2):
        (ma, ra), (mb, rb) = names[i], names[j]
        s = float(spec.similarity[i, j])
        if ra == rb and ma != mb:
            out["same role, different models"].append(s)
            per_pair.setdefault(f"{ma} vs {mb}", []).append(s)
        elif ma == mb and ra != rb:
            out["different roles, same model"].append(s)
    summary = {k: _range(v) for k, v in out.items() if v}
    summary.update({k: _range(v) for k, v in per_pair.items()})
    return summary


def _range(values: Sequence[float]) -> dict[str, float]:
    v = np.asarray([x for x in values if np.isfinite(x)], np.float64)
    if not v.size:
        return {"min": float("nan"), "max": float("nan"), "mean": float("nan"), "n": 0}
    return {"min": float(v.min()), "max": float(v.max()), "mean": float(v.mean()), "n": int(v.size)}


@partial(jax.jit, static_argnames=("cfg",))
def _last_resid(params: Any, tokens: Array, position: Array, *, cfg: ModelConfig) -> Array:
    """[n_layers, batch, d_model] resid_post of every layer at each example's `position`."""
    forward = make_forward(cfg, jit=False)
    _, cache = forward(params, tokens, Hooks(cache=("blocks.*.hook_resid_post",)), logits_at=position)
    rows = jnp.arange(tokens.shape[0])
    return jnp.stack([cache[f"blocks.{l}.hook_resid_post"][rows, position] for l in range(cfg.n_layers)])


def last_position_states(model: Any, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
    """[n_layers, n_texts, d_model] residual stream after every layer at each text's last token."""
    rows = [model.tokenizer.encode(t) for t in texts]
    width = max(len(r) for r in rows)
    tokens = np.zeros((len(rows), width), np.int32)
    position = np.array([len(r) - 1 for r in rows], np.int32)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = r
    out = []
    size = min(batch_size, len(rows))
    for start in range(0, len(rows), size):
        idx = np.minimum(np.arange(start, start + size), len(rows) - 1)
        states = _last_resid(model.params, jax.device_put(tokens[idx]), jax.device_put(position[idx]), cfg=model.config)
        out.append(np.asarray(states)[:, :min(size, len(rows) - start)])
    return np.concatenate(out, axis=1)


def cka_between(models: Mapping[str, Any], texts: Sequence[str]) -> dict[str, np.ndarray]:
    """Unbiased linear CKA [L_a, L_b] between every pair of models' last-token residual streams on `texts`
    (the unbiased estimator: with few prompts and many features the biased one is near 1 for anything)."""
    from jaxcirc.cka import cka_grid

    states = {label: last_position_states(m, texts) for label, m in models.items()}
    return {f"{a} vs {b}": cka_grid(states[a], states[b], unbiased=True) for a, b in itertools.combinations(states, 2)}


# ----------------------------------------------------------------------------- suite discovery


def find_suite(path: str | Path) -> dict[str, Any]:
    """{name: CheckpointSeries} of a suite folder (one sub-folder per model, each with step checkpoints),
    or of a single run / revisions folder (one series named after the folder)."""
    from jaxcirc.checkpoints import checkpoint_series

    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"Suite folder {path} does not exist. Train it first: {TRAIN_HINT}")
    try:
        return {path.name: checkpoint_series(path)}
    except FileNotFoundError:
        pass
    found = {}
    for child in sorted(path.iterdir()):
        if child.is_dir():
            try:
                found[child.name] = checkpoint_series(child)
            except FileNotFoundError:
                continue
    if not found:
        raise FileNotFoundError(f"{path} holds no checkpoint series (folders with step_N/ checkpoints). "
                                f"Train the built-in suite with: {TRAIN_HINT}")
    return found


def _is_suite_path(source: str) -> bool:
    from jaxcirc import checkpoint

    path = Path(source).expanduser()
    if not path.is_dir() or checkpoint.is_checkpoint(path) or (path / "config.json").exists():
        return False
    try:
        find_suite(path)
        return True
    except FileNotFoundError:
        return False


# ----------------------------------------------------------------------------- the command


def roles_command(model_or_suite: str = "smollm2-135m", out_dir: str | Path = "runs/roles", *,
                  pairs_per_role: int | None = None, suite_dir: str | Path | None = None,
                  roles: Sequence[str] | None = None, steps: int = 5, top_edges: int = 200, seed: int = 0,
                  quick: bool = True, suite_pairs_per_role: int | None = None, train_suite: bool = False,
                  n_boot: int = N_BOOT, role_set: str = "auto", batch_size: int | None = None,
                  overwrite: bool = False, show_progress: bool = True) -> Path:
    """Run the semantic-role pipeline and write a run directory to `out_dir`; returns its path.

    model_or_suite: a model for `jaxcirc.load` (registry name, HF dir, GGUF, jaxcirc checkpoint) or a
    suite folder. suite_dir: the trained suite (default: the first of SUITE_LOCATIONS that exists;
    `train_suite=True` trains it there first when missing, otherwise the report says how).
    pairs_per_role / suite_pairs_per_role default to QUICK or FULL (`quick`); a given pairs_per_role also
    applies to the suite unless suite_pairs_per_role is given. roles: a subset of role
    names. steps: EAP-IG steps; top_edges: circuit size; n_boot: bootstrap resamples over pairs.
    role_set: "auto" (corpus roles for role-corpus models, natural English otherwise), "natural", "corpus".
    """
    from jaxcirc.progress import progress

    clock = _Clock()
    log = progress if show_progress else (lambda items, description, total=None: items)
    preset = QUICK if quick else FULL
    n_main = int(pairs_per_role or preset["pairs_per_role"])
    n_suite = int(suite_pairs_per_role or pairs_per_role or preset["suite_pairs_per_role"])
    if steps < 1 or top_edges < 1 or n_boot < 1:
        raise ValueError(f"steps ({steps}), top_edges ({top_edges}) and n_boot ({n_boot}) must all be at least 1.")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists and is not empty; choose another --out or pass overwrite.")

    main_source: str | None = None
    suite_path: Path | None = None
    if _is_suite_path(str(model_or_suite)):
        suite_path = Path(model_or_suite)
        if suite_dir is not None and Path(suite_dir).resolve() != suite_path.resolve():
            raise ValueError(f"{model_or_suite} is itself a suite folder; do not also pass suite_dir={suite_dir}.")
    else:
        main_source = str(model_or_suite)
    suite_note = ""
    if suite_path is None:
        if suite_dir is not None:
            suite_path = Path(suite_dir)
            if not suite_path.exists() and train_suite:
                suite_path = _train_suite(suite_path, clock)
        else:
            found = [Path(p) for p in SUITE_LOCATIONS if Path(p).is_dir()]
            if found:
                suite_path = found[0]
            elif train_suite:
                suite_path = _train_suite(Path(SUITE_LOCATIONS[0]), clock)
            else:
                suite_note = (f"No trained suite was given or found (looked for {', '.join(SUITE_LOCATIONS)}), so "
                              f"the emergence and cross-scale parts were skipped. Train it with `{TRAIN_HINT}` "
                              "and rerun with `--suite runs/role_suite` (or pass `train_suite=True`).")
    suite = find_suite(suite_path) if suite_path is not None else {}

    results: list[ModelResult] = []
    loaded: dict[str, Any] = {}
    if main_source is not None:
        from jaxcirc.loading import load

        with clock.stage("load model"):
            model = load(main_source)
        label = Path(main_source).name if Path(main_source).exists() else main_source
        with clock.stage(f"{label}: pairs + circuits"):
            results.append(analyse_model(model, label, pairs_per_role=n_main, roles=roles, steps=steps, top_k=top_edges,
                                         seed=seed, role_set=role_set, batch_size=batch_size, log=log))
        loaded[label] = model
    series_order = sorted(suite.items(), key=lambda kv: _series_size(kv[1]))
    for name, series in series_order:
        label = f"suite/{name}"
        with clock.stage(f"{label}: emergence"):
            result = analyse_series(series, label, pairs_per_role=n_suite, roles=roles, steps=steps, top_k=top_edges,
                                    seed=seed, n_boot=n_boot, batch_size=batch_size, log=log)
        results.append(result)
        loaded[label] = series.load(series.steps[-1])
    if not results:
        raise ValueError("Nothing to analyse: give a model or a suite folder.")

    with clock.stage("cross-model comparison"):
        comparison = compare_models(results)
        cka, cka_texts = {}, []
        suite_results = [r for r in results if r.kind == "series"]
        if len(loaded) > 1 and suite_results:
            cka_texts = sorted({rec[side] for r in suite_results for recs in r.pairs.records.values()
                                for rec in recs for side in ("clean", "corrupt")})
            if len(cka_texts) >= 4:
                cka = cka_between(loaded, cka_texts)

    config = {"model_or_suite": str(model_or_suite), "main_model": main_source,
              "suite_dir": None if suite_path is None else str(suite_path), "quick": quick,
              "pairs_per_role": n_main, "suite_pairs_per_role": n_suite, "full_run_pairs_per_role": FULL,
              "roles": list(roles) if roles else None, "eap_ig_steps": steps, "eap_metric": METRIC,
              "top_edges": top_edges, "seed": seed, "n_boot": n_boot, "role_set": role_set,
              "depth_bins": DEPTH_BINS, "spectral_k": SPECTRAL_K, "consolidation": {"threshold": 0.6, "hold": 2},
              "change_point_rule": RULE, "pair_settings": {r.label: r.pairs.settings for r in results}}
    out_dir.absolute().parent.mkdir(parents=True, exist_ok=True)
    extras = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.circuits-", dir=out_dir.absolute().parent))
    try:
        with clock.stage("figures and circuit drawings"):
            figures = _figures(results, comparison, cka)
            _write_circuits(extras, results, log)
        timing = {"stages": clock.stages, "total": clock.total()}
        scalars = _scalars(results, comparison, cka, timing)
        arrays = _arrays(results, comparison, cka)
        drawings = [(r, role) for r in results for role in r.roles]
        report = render_report(results, comparison, cka, cka_texts, config, timing, list(figures), drawings,
                               suite_note)
        model = loaded.get(results[0].label) if results[0].kind == "pretrained" else None
        path = rundir.write_run(out_dir, command=f"jaxcirc roles {model_or_suite}", config=config, arrays=arrays,
                                scalars=scalars, model=model, figures=figures, report=report, overwrite=overwrite)
        # write_run takes Figure objects only; the drawings and circuit files are moved in afterwards.
        for folder in ("circuits", "figures"):
            (path / folder).mkdir(exist_ok=True)
            for file in sorted((extras / folder).iterdir()):
                os.replace(file, path / folder / file.name)
    finally:
        shutil.rmtree(extras, ignore_errors=True)
    return path


def _series_size(series: Any) -> int:
    import json

    try:
        cfg = json.loads((series.path(series.steps[-1]) / "jaxcirc.json").read_text())["config"]
        return int(cfg["n_layers"]) * int(cfg["d_model"])
    except (OSError, KeyError, ValueError):
        cfg_path = series.path(series.steps[-1]) / "config.json"
        try:
            cfg = json.loads(cfg_path.read_text())
            return int(cfg.get("num_hidden_layers", 0)) * int(cfg.get("hidden_size", 0))
        except (OSError, ValueError):
            return 0


def _train_suite(path: Path, clock: _Clock) -> Path:
    from jaxcirc.training import train_command

    with clock.stage("train suite"):
        train_command("role_suite", path)
    return path


def _slug(label: str) -> str:
    return label.replace("/", "_").replace(" ", "_")


def _write_circuits(path: Path, results: Sequence[ModelResult], log: Callable) -> None:
    """Circuit JSON files (circuits/) and drawings (figures/circuit__*.png) under `path`."""
    (path / "circuits").mkdir(exist_ok=True)
    (path / "figures").mkdir(exist_ok=True)
    jobs = [(r, role) for r in results for role in r.roles]
    for r, role in log(jobs, "circuit files and drawings"):
        circuit = r.roles[role].circuit
        circuit.to_json(path / "circuits" / f"{_slug(r.label)}__{role}.json")
        draw_circuit(circuit, path / "figures" / f"circuit__{_slug(r.label)}__{role}.png",
                     title=f"{r.label} / {role}: top-{len(circuit)} EAP-IG edges", max_edges=80)


# ----------------------------------------------------------------------------- outputs


def _scalars(results: Sequence[ModelResult], comparison: Mapping[str, Any], cka: Mapping[str, np.ndarray],
             timing: Mapping[str, Any]) -> dict[str, Any]:
    models = {}
    for r in results:
        models[r.label] = {
            "kind": r.kind, "source": r.source, "source_hash": r.source_hash,
            "config": {"n_layers": r.config.n_layers, "d_model": r.config.d_model, "n_heads": r.config.n_heads,
                       "n_kv_heads": r.config.n_kv_heads, "family": r.config.family},
            "pairs": r.pairs.report,
            "roles": {role: {"n_pairs": rr.n_pairs, "concentration": rr.concentration.summary(),
                             "faithfulness": rr.faithfulness, "n_edges": len(rr.circuit)}
                      for role, rr in r.roles.items()},
            "emergence": None if r.emergence is None else {role: em.summary() for role, em in r.emergence.items()},
            "chance_jaccard": None if r.chance_jaccard is None else {"nodes": r.chance_jaccard[0],
                                                                     "edges": r.chance_jaccard[1]},
        }
    spectral = comparison["spectral"]
    return {"models": models, "overlaps": comparison["overlaps"],
            "spectral": None if spectral is None else {"settings": spectral.settings,
                                                       "names": [list(n) for n in comparison["spectral_names"]],
                                                       "ranges": spectral_ranges(comparison)},
            "cka": {k: {"max": float(np.nanmax(v)), "mean_best_match": float(np.nanmean(np.nanmax(v, axis=1)))}
                    for k, v in cka.items()},
            "paper": PAPER, "timing": timing, "headline": headline(results, comparison)}


def _arrays(results: Sequence[ModelResult], comparison: Mapping[str, Any], cka: Mapping[str, np.ndarray]) -> dict:
    arrays: dict[str, tuple[np.ndarray, tuple[str, ...]]] = {}
    for r in results:
        m = _slug(r.label)
        for role, rr in r.roles.items():
            arrays[f"edge_scores__{m}__{role}"] = (rr.scores.astype(np.float32), ("src_node", "dst"))
            arrays[f"concentration__{m}__{role}"] = (rr.concentration.cumulative, ("top_nodes",))
        if r.emergence:
            arrays[f"steps__{m}"] = (np.asarray(r.steps), ("checkpoint",))
            for role, em in r.emergence.items():
                arrays[f"accuracy__{m}__{role}"] = (em.accuracy, ("checkpoint",))
                arrays[f"jaccard_prev__{m}__{role}"] = (em.jaccard_prev, ("checkpoint",))
                arrays[f"jaccard_final__{m}__{role}"] = (em.jaccard_final, ("checkpoint",))
                if em.edge_jaccard_final is not None:
                    arrays[f"edge_jaccard_final__{m}__{role}"] = (em.edge_jaccard_final, ("checkpoint",))
                arrays[f"edge_scores_over_training__{m}__{role}"] = (r.series_scores[role].astype(np.float32),
                                                                       ("checkpoint", "src_node", "dst"))
    if comparison["spectral"] is not None:
        arrays["spectral_similarity"] = (comparison["spectral"].similarity, ("circuit", "circuit_b"))
    for key, grid in cka.items():
        a, b = key.split(" vs ")
        arrays[f"cka__{_slug(a)}__{_slug(b)}"] = (grid, ("layer_a", "layer_b"))
    return arrays


def headline(results: Sequence[ModelResult], comparison: Mapping[str, Any]) -> dict[str, Any]:
    """The measured counterparts of the paper's claims (A.1), as JSON data."""
    out: dict[str, Any] = {"concentration": {}, "faithfulness": {}, "overlap": {}, "emergence": {}}
    for r in results:
        shares = [rr.concentration.share(20) for rr in r.roles.values()]
        nodes = [rr.concentration.n_nodes for rr in r.roles.values()]
        out["concentration"][r.label] = {"share_top20": _range(shares), "nodes_spanned": _range(nodes)}
        out["faithfulness"][r.label] = {"logit_diff": _range([rr.faithfulness["faithfulness"] for rr in r.roles.values()]),
                                        "accuracy": _range([rr.faithfulness["faithfulness_acc"] for rr in r.roles.values()])}
        if r.emergence:
            out["emergence"][r.label] = {
                "structural": _count([em.structural.classification for em in r.emergence.values()]),
                "functional": _count([em.functional.classification for em in r.emergence.values()]),
                "t_cons_final": {role: em.t_cons_final for role, em in r.emergence.items()},
                "t_cons_prev": {role: em.t_cons_prev for role, em in r.emergence.items()},
                "structure_first": _structure_first(r.emergence),
                "spans_all_nodes": any(em.spans_all_nodes for em in r.emergence.values())}
    for key, per_role in comparison["overlaps"].items():
        out["overlap"][key] = {m: _range([v[m] for v in per_role.values()])
                               for m in ("node_index", "edge_index", "node_depth", "edge_depth")}
    kinds = {r.label: r.kind for r in results}
    groups: dict[str, list[Mapping[str, float]]] = {"across scales (suite)": [], "across architectures": []}
    for key, per_role in comparison["overlaps"].items():
        a, b = key.split(" vs ")
        group = "across scales (suite)" if kinds[a] == kinds[b] == "series" else "across architectures"
        groups[group].extend(per_role.values())
    out["overlap_groups"] = {g: {m: _range([v[m] for v in vals]) for m in ("node_index", "edge_index", "node_depth",
                                                                             "edge_depth")}
                             for g, vals in groups.items() if vals}
    out["spectral"] = spectral_ranges(comparison)
    return out


def _structure_first(emergence: Mapping[str, RoleEmergence]) -> dict[str, int]:
    """In how many roles the node set (and the edge set) consolidated vs final no later than the
    behavioural breakpoint."""
    out = {}
    for name, attr in (("nodes", "t_cons_final"), ("edges", "t_cons_edges")):
        compared = [(getattr(em, attr), em.functional.breakpoint_step) for em in emergence.values()
                    if getattr(em, attr) is not None and em.functional.breakpoint_step is not None]
        out[name] = sum(t <= b for t, b in compared)
        out[f"{name}_compared"] = len(compared)
    return out


def _count(labels: Sequence[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for label in labels:
        out[label] = out.get(label, 0) + 1
    return out


def _figures(results: Sequence[ModelResult], comparison: Mapping[str, Any], cka: Mapping[str, np.ndarray]) -> dict:
    from matplotlib.figure import Figure

    figures = {}
    # Concentration curves: one panel per model, one curve per role.
    fig = Figure(figsize=(4.2 * len(results), 3.4))
    axes = fig.subplots(1, len(results), squeeze=False)[0]
    for ax, r in zip(axes, results):
        for role, rr in r.roles.items():
            c = rr.concentration
            ax.plot(np.arange(0, c.n_nodes + 1), np.concatenate([[0.0], c.cumulative]), marker=".", markersize=2,
                    label=role)
        for mark in (20, 28):
            ax.axvline(mark, color="0.6", linewidth=0.7, linestyle="--")
        ax.set_title(f"{r.label}: concentration (top-{next(iter(r.roles.values())).concentration.n_edges} edges)",
                     fontsize=8)
        ax.set_xlabel("top-n nodes")
        ax.set_ylabel("cumulative share of |score| mass")
        ax.set_ylim(0, 1.02)
        ax.grid(linewidth=0.3, alpha=0.5)
        ax.legend(fontsize=6)
    fig.tight_layout()
    figures["concentration"] = fig

    # Faithfulness per role and model.
    fig = Figure(figsize=(8, 3.4))
    ax = fig.add_subplot()
    roles = list(dict.fromkeys(role for r in results for role in r.roles))
    width = 0.8 / len(results)
    for i, r in enumerate(results):
        vals = [r.roles[role].faithfulness["faithfulness"] if role in r.roles else np.nan for role in roles]
        ax.bar(np.arange(len(roles)) + i * width, vals, width, label=r.label)
    ax.set_xticks(np.arange(len(roles)) + 0.4 - width / 2)
    ax.set_xticklabels(roles, rotation=30, fontsize=7)
    ax.axhline(1, color="0.5", linewidth=0.7)
    ax.set_ylabel("faithfulness (logit diff)")
    ax.legend(fontsize=6)
    ax.set_title("Faithfulness of the top-200-edge circuits (corrupt patching)", fontsize=8)
    fig.tight_layout()
    figures["faithfulness"] = fig

    series = {r.label: r.emergence for r in results if r.emergence}
    if series:
        figures["emergence"] = emergence_figure(series)

    labels = comparison["labels"]
    if len(labels) > 1 and comparison["roles"]:
        fig = Figure(figsize=(12, 3.6))
        axes = fig.subplots(1, 3)
        for ax, metric, title in zip(axes, ("node_index", "node_depth", "edge_depth"),
                                     ("node Jaccard (index)", f"node Jaccard (depth, {DEPTH_BINS} bins)",
                                      f"edge Jaccard (depth, {DEPTH_BINS} bins)")):
            matrix = np.eye(len(labels))
            for a, b in itertools.combinations(range(len(labels)), 2):
                per_role = comparison["overlaps"][f"{labels[a]} vs {labels[b]}"]
                matrix[a, b] = matrix[b, a] = np.nanmean([v[metric] for v in per_role.values()])
            _matrix(ax, matrix, labels, labels, f"{title}, mean over roles")
        fig.tight_layout()
        figures["overlap"] = fig
    spec = comparison["spectral"]
    if spec is not None:
        names = [f"{m}:{r}" for m, r in comparison["spectral_names"]]
        size = max(5.0, 0.22 * len(names) + 2)
        fig = Figure(figsize=(size, size))
        _matrix(fig.add_subplot(), spec.similarity, names, names,
                f"Spectral similarity 1/(1+d), top-{SPECTRAL_K} normalized-Laplacian eigenvalues", annotate=False)
        fig.tight_layout()
        figures["spectral_similarity"] = fig
    if cka:
        fig = Figure(figsize=(3.8 * len(cka), 3.6))
        axes = fig.subplots(1, len(cka), squeeze=False)[0]
        for ax, (key, grid) in zip(axes, cka.items()):
            a, b = key.split(" vs ")
            im = ax.imshow(grid, origin="lower", aspect="auto", vmin=0, vmax=1, cmap="viridis")
            ax.set_xlabel(f"{b} layer")
            ax.set_ylabel(f"{a} layer")
            ax.set_title("unbiased linear CKA (last token)", fontsize=8)
            fig.colorbar(im, ax=ax, fraction=0.046)
        fig.tight_layout()
        figures["cka"] = fig
    return figures


def _matrix(ax: Any, matrix: np.ndarray, rows: Sequence[str], cols: Sequence[str], title: str,
            annotate: bool = True) -> None:
    im = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(cols, rotation=60, ha="right", fontsize=6)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(rows, fontsize=6)
    ax.set_title(title, fontsize=8)
    if annotate:
        for i in range(matrix.shape[0]):
            for j in range(matrix.shape[1]):
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if matrix[i, j] < 0.5 else "black")
    ax.figure.colorbar(im, ax=ax, fraction=0.046)


# ----------------------------------------------------------------------------- report


def _pct(value: float | None) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{100 * value:.0f} %"


def _num(value: float | None, fmt: str = ".2f") -> str:
    return "n/a" if value is None or not np.isfinite(value) else format(value, fmt)


def _pct_range(r: Mapping[str, float]) -> str:
    if not r or not r.get("n"):
        return "n/a"
    return f"{100 * r['min']:.0f}-{100 * r['max']:.0f} %"


def _step(value: float | int | None) -> str:
    return "never" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def render_report(results: Sequence[ModelResult], comparison: Mapping[str, Any], cka: Mapping[str, np.ndarray],
                  cka_texts: Sequence[str], config: Mapping[str, Any], timing: Mapping[str, Any],
                  figures: Sequence[str], drawings: Sequence[tuple[ModelResult, str]], suite_note: str) -> str:
    head = headline(results, comparison)
    lines = ["# Semantic-role circuits (COMPASS-style pipeline)", "",
             "Aljaafari, Carvalho, Freitas, *Emergence and Localisation of Semantic Role Circuits in LLMs* "
             "(arXiv 2511.20910; Findings of ACL 2026). Method: experiments.md section A; paper numbers from A.1.", ""]
    mode = "QUICK" if config["quick"] else "FULL"
    lines += [f"**{mode} run**: {config['pairs_per_role']} pairs per role for the pretrained model and "
              f"{config['suite_pairs_per_role']} per role for each suite model (the full run uses "
              f"{FULL['pairs_per_role']} and {FULL['suite_pairs_per_role']}; the paper used 6,028-7,988 pairs per "
              "model). Every number below comes from this sample.", ""]
    if suite_note:
        lines += [f"> {suite_note}", ""]
    lines += ["Models: " + ", ".join(f"`{r.label}` ({r.config.family}, {r.config.n_layers} layers x "
                                     f"{r.config.d_model}, {r.config.n_heads} heads"
                                     + (f", {len(r.steps)} checkpoints {r.steps[0]}..{r.steps[-1]}" if r.steps else "")
                                     + ")" for r in results) + ".", "",
              f"Settings: EAP-IG with {config['eap_ig_steps']} steps on log p(target) (A.4/A.5), top-"
              f"{config['top_edges']} edges by |mean score| (A.6), faithfulness by exact edge patching with corrupted "
              f"activations (A.7), consolidation at node Jaccard >= 0.6 for 2 consecutive checkpoints (A.8), depth "
              f"matching with {DEPTH_BINS} bins and spectral similarity 1/(1+d) over the top {SPECTRAL_K} "
              "normalized-Laplacian eigenvalues (A.9). Nothing was tuned to match the paper.", ""]

    # Headline table.
    lines += ["## Headline: the paper's claims next to what was measured here", "",
              "| claim | paper v1 (Nov 2025) | paper v2 / ACL Findings | measured here |", "|---|---|---|---|"]
    conc = "; ".join(f"{m}: {_pct_range(v['share_top20'])} in the top 20 nodes, "
                     f"{int(v['nodes_spanned']['min'])}-{int(v['nodes_spanned']['max'])} nodes spanned"
                     for m, v in head["concentration"].items())
    lines.append(f"| attribution concentration (top-200-edge circuit) | {PAPER['concentration'][0]} | "
                 f"{PAPER['concentration'][1]} | {conc} |")
    cross = head["overlap_groups"]
    if cross:
        node_idx = "; ".join(f"{k}: {_pct_range(v['node_index'])}" for k, v in cross.items())
        node_dep = "; ".join(f"{k}: {_pct_range(v['node_depth'])}" for k, v in cross.items())
        edge_idx = "; ".join(f"{k}: {_pct_range(v['edge_index'])}" for k, v in cross.items())
        edge_dep = "; ".join(f"{k}: {_pct_range(v['edge_depth'])}" for k, v in cross.items())
        lines.append(f"| cross-model node overlap (range over roles and model pairs) | {PAPER['node_overlap'][0]} | "
                     f"{PAPER['node_overlap'][1]} | index matching: {node_idx}. Depth matching: {node_dep} |")
        lines.append(f"| edge overlap | {PAPER['edge_overlap'][0]} | {PAPER['edge_overlap'][1]} | index: {edge_idx}. "
                     f"Depth: {edge_dep} |")
    spec = head.get("spectral") or {}
    if spec:
        same = spec.get("same role, different models")
        diff = spec.get("different roles, same model")
        lines.append(f"| spectral similarity | {PAPER['spectral'][0]} | {PAPER['spectral'][1]} | same role across "
                     f"models {_num(same and same['min'])}-{_num(same and same['max'])} (mean "
                     f"{_num(same and same['mean'])}); different roles within a model "
                     f"{_num(diff and diff['min'])}-{_num(diff and diff['max'])} (1/(1+d); 1 = identical spectra) |")
    if head["emergence"]:
        em = "; ".join(f"{m}: structure {_fmt_counts(v['structural'])}, behaviour {_fmt_counts(v['functional'])}"
                       + (" (some circuits span every node at every checkpoint: node Jaccard trivially 1)"
                          if v["spans_all_nodes"] else "")
                       for m, v in head["emergence"].items())
        lines.append(f"| emergence over training | {PAPER['emergence'][0]} | {PAPER['emergence'][1]} | {em} |")
        cons = "; ".join(f"{m}: " + ", ".join(f"{role} {_step(t)}" for role, t in v["t_cons_final"].items())
                         for m, v in head["emergence"].items())
        lines.append(f"| consolidation step (Jaccard vs final >= 0.6 twice) | {PAPER['consolidation'][0]} | "
                     f"{PAPER['consolidation'][1]} | {cons} |")
        first = "; ".join(f"{m}: node sets {v['structure_first']['nodes']} of {v['structure_first']['nodes_compared']}"
                          f" roles, edge sets {v['structure_first']['edges']} of {v['structure_first']['edges_compared']}"
                          for m, v in head["emergence"].items())
        lines.append(f"| structure consolidates before behaviour changes (t_cons <= behavioural breakpoint) | - | "
                     f"yes (but INSTRUMENT: 128 vs 32, A.8) | {first} |")
    faith = "; ".join(f"{m}: {_pct_range(v['logit_diff'])} (logit diff), {_pct_range(v['accuracy'])} (accuracy)"
                      for m, v in head["faithfulness"].items())
    lines.append(f"| faithfulness of the circuit | not reported per role [NF] | not reported per role [NF] | {faith} |")
    lines += ["", "The paper's models (Pythia-14M/410M/1B, Llama-3.2-1B, 143k-step Pythia checkpoints) are not "
              "available offline here; the counterparts are SmolLM2-135M (Llama architecture) and, for emergence and "
              "cross-scale comparisons, jaxcirc's own Pythia-style suite trained on its synthetic role corpus "
              "(600 steps). Shares are of attribution *mass* (A.6), not of explained behaviour; faithfulness is "
              "the causal check.", ""]

    # Pairs.
    lines += ["## Role-cross minimal pairs", "",
              "Target = the clean role's top-ranked lexicon word after the clean prompt, foil = the corrupt role's "
              "top-ranked word after the corrupt prompt; kept iff the model is right in both contexts (A.3). "
              "Dropped: wrong after the clean prompt only / the corrupt prompt only / both.", "",
              "| model | role set | role | candidates | kept | dropped (clean / corrupt / both) | used | lexicon words |",
              "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for role, e in r.pairs.report.items():
            lines.append(f"| {r.label} | {r.pairs.settings['role_set']} | {role} | {e['candidates']} | {e['kept']} | "
                         f"{e['dropped_clean']} / {e['dropped_corrupt']} / {e['dropped_both']} | {e['used']} | "
                         f"{e['lexicon_words']} |")
    lines.append("")
    for r in results:
        for role, recs in list(r.pairs.records.items())[:3]:
            rec = recs[0]
            lines.append(f"- {r.label}, {role}: \"{rec['clean']}\" -> \"{rec['target']}\" vs \"{rec['corrupt']}\" -> "
                         f"\"{rec['foil']}\" ({rec['corrupt_role']})")
    lines.append("")

    # Circuits.
    lines += ["## Circuits per role and model", "",
              "Share of the top-200 circuit's |score| mass held by its top 20 / 28 nodes, nodes spanned, nodes "
              "holding 90 %, and faithfulness (F = (circuit - null) / (full - null); necessity = 1 - F of the "
              "circuit-ablated model), on logit difference and on accuracy.", "",
              f"| model | role | pairs | top-20 share | top-28 share | nodes | nodes for 90 % | F (logit diff) | "
              f"necessity | F (accuracy) | F at {' / '.join(map(str, LARGER_CIRCUITS))} edges | top nodes |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for role, rr in r.roles.items():
            c, f = rr.concentration, rr.faithfulness
            top = ", ".join(c.nodes[:4])
            lines.append(f"| {r.label} | {role} | {rr.n_pairs} | {_pct(c.share(20))} | {_pct(c.share(28))} | "
                         f"{c.n_nodes} | {c.nodes_for(0.9)} | {_num(f['faithfulness'])} | {_num(f['necessity'])} | "
                         f"{_num(f['faithfulness_acc'])} | {_by_size(f)} | {top} |")
    lines.append("")

    # Emergence.
    series = [r for r in results if r.emergence]
    if series:
        lines += ["## Emergence over training", "",
                  f"Circuit per checkpoint on the final checkpoint's filtered pairs; accuracy = logit(target) > "
                  f"logit(foil) after the clean prompt. Change points over log(1 + step), 95 % bootstrap CI over pairs "
                  f"({config['n_boot']} resamples). Rule: {RULE}.", "",
                  "| model | role | acc first -> last | t_cons vs previous | t_cons vs final | structural breakpoint "
                  "[CI] | structure | functional breakpoint [CI] | behaviour | t_cons of edges vs final |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in series:
            for role, em in r.emergence.items():
                lines.append(f"| {r.label} | {role} | {em.accuracy[0]:.2f} -> {em.accuracy[-1]:.2f} | "
                             f"{_step(em.t_cons_prev)} | {_step(em.t_cons_final)} | {_bp(em.structural)} | "
                             f"{em.structural.classification} | {_bp(em.functional)} | "
                             f"{em.functional.classification} | {_step(em.t_cons_edges)} |")
        lines.append("")
        lines += [f"Chance level of the Jaccard columns (two circuits of {config['top_edges']} edges drawn at random "
                  "from the valid edges): " + "; ".join(f"{r.label}: nodes {r.chance_jaccard[0]:.2f}, edges "
                                                     f"{r.chance_jaccard[1]:.2f}" for r in series if r.chance_jaccard)
                  + ".", ""]
        immediate = [r.label for r in series if all(em.t_cons_final == r.steps[0] for em in r.emergence.values())]
        if immediate:
            lines += [f"In {', '.join(immediate)} the node Jaccard vs final is >= 0.6 from the first checkpoint on, for "
                      "every role: in graphs this small a top-200 circuit covers most nodes, so node-level "
                      "consolidation is immediate and says little; the edge-level consolidation column (and the edge "
                      "Jaccard panel of the emergence figure) shows when the circuit's wiring settles.", ""]
        trivial = sorted({r.label for r in series for em in r.emergence.values() if em.spans_all_nodes})
        if trivial:
            lines += [f"In {', '.join(trivial)} the top-{config['top_edges']} edges touch every node of the graph at "
                      "every checkpoint (2 layers x 4 heads has only 102 valid edges), so node Jaccard is 1 "
                      "throughout and those structural rows say nothing; edge-level structure still changes.", ""]

    # Cross-model.
    if comparison["overlaps"]:
        lines += ["## Across models", "",
                  f"Node / edge Jaccard per role, index matching (same layer/head names) and depth matching "
                  f"({DEPTH_BINS} normalised-depth bins, head index dropped; few bins make depth matching lenient).",
                  "", "| models | role | node (index) | edge (index) | node (depth) | edge (depth) |",
                  "|---|---|---|---|---|---|"]
        for key, per_role in comparison["overlaps"].items():
            for role, v in per_role.items():
                lines.append(f"| {key} | {role} | {_pct(v['node_index'])} | {_pct(v['edge_index'])} | "
                             f"{_pct(v['node_depth'])} | {_pct(v['edge_depth'])} |")
        lines.append("")
        if spec:
            lines += ["Spectral similarity ranges (1/(1+d)):", ""]
            lines += [f"- {k}: {_num(v['min'])}-{_num(v['max'])} (mean {_num(v['mean'])}, {v['n']} pairs)"
                      for k, v in spec.items()]
            lines.append("")
    if cka:
        lines += [f"Unbiased linear CKA between last-token residual streams on {len(cka_texts)} shared prompts (the "
                  "suite models' pair prompts; each model uses its own tokenizer): best match per layer of the first "
                  "model, averaged, and the maximum.", ""]
        lines += [f"- {k}: mean best match {_num(float(np.nanmean(np.nanmax(v, axis=1))))}, max "
                  f"{_num(float(np.nanmax(v)))}" for k, v in cka.items()]
        lines.append("")

    # Timing and figures.
    total = timing["total"]
    lines += ["## Time", "", f"Total: {total['wall_s']:.0f} s wall, {total['cpu_s']:.0f} s CPU (this process).", "",
              "| stage | wall (s) | CPU (s) |", "|---|---|---|"]
    lines += [f"| {k} | {v['wall_s']:.0f} | {v['cpu_s']:.0f} |" for k, v in timing["stages"].items()]
    lines += ["", "## Figures", ""] + [f"![{f}](figures/{f}.png)" for f in figures]
    lines += ["", "Circuit drawings (top 80 edges drawn) and circuit JSON files (`circuits/`):", ""]
    lines += [f"- [{r.label} / {role}](figures/circuit__{_slug(r.label)}__{role}.png)" for r, role in drawings]
    lines.append("")
    return "\n".join(lines)


def _by_size(f: Mapping[str, Any]) -> str:
    sizes = f.get("by_size", {})
    return " / ".join(_num(sizes[k]["faithfulness"]) if k in sizes else "-" for k in LARGER_CIRCUITS)


def _fmt_counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{v} {k}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


def _bp(fit: Any) -> str:
    if fit.fit is None:
        return "n/a"
    ci = "" if fit.ci_steps is None else f" [{fit.ci_steps[0]:.0f}, {fit.ci_steps[1]:.0f}]"
    return f"{fit.breakpoint_step:.0f}{ci}"
