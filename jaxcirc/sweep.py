"""`jaxcirc sweep SWEEP.toml --out DIR`: a grid of analyses run as units, resumable after any kill.

The grid is the cartesian product of models (each source, or each checkpoint of a series), tasks
(minimal-pair sets), methods (`jaxcirc.sweep_units.METHODS`) and each method's option values,
minus `[[exclude]]` entries. A unit's id is a hash of its canonical configuration (every option
filled in, the pairs file's sha256 included), so the same grid always gives the same ids.

SWEEP.toml:

    [sweep]
    name = "capitals"                       # optional
    [[models]]
    source = "smollm2-135m"                 # anything jaxcirc.load accepts
    [[models]]
    name = "suite-2x64"                     # optional label (default: the path's last part)
    checkpoints = "runs/role_suite/2x64"    # a checkpoint series (jaxcirc.checkpoints)
    steps = [0, 600]                        # optional; default every complete checkpoint
    [[tasks]]
    pairs = "capitals"                      # built-in name or a JSONL file of minimal pairs
    max_pairs = 8                           # optional
    [methods.atp]
    star = [false, true]                    # a list is a grid axis, a scalar a fixed value
    [methods.patch_heads]
    [options]
    metric = ["logit_diff"]                 # axes for every method that has the option
    [[exclude]]
    method = "atp"                          # drop units matching all keys (model, step, task,
    star = true                             # method, any option; a list matches any value)

Relative paths are read relative to the SWEEP.toml's folder. Everything is checked before a unit
runs (unknown keys, methods or options, bad values, missing models, checkpoints or pairs files).

DIR holds:
    sweep.json     the grid: unit ids and configurations (written before the first unit runs)
    sweep.toml     a copy of the SWEEP.toml that made the grid
    units/<id>/    one finished unit: results.json (its config, model provenance, scalars, array
                   dims), arrays.npz and report.md; readable with `jaxcirc.rundir.read_run`
    results.csv    one row per unit per scalar (+ results.parquet when pyarrow is installed)
    report.md      the table per method and what each method's scalars mean
    failures.json  units that raised in the last run (retried by the next one), if any

Crash safety: a unit is written into `units/.partial-<id>-*`, its files fsynced, then renamed to
`units/<id>` in one step, so `units/<id>` exists only complete. Tables are written to a temporary
file and renamed the same way. A restart (same command) deletes leftover partial files, skips the
units that exist and runs the rest: nothing is lost or duplicated whenever the process is killed,
SIGKILL included. A lock file keeps two runs out of one DIR. A DIR holding a different grid is
refused; `--extend` accepts a grid that contains every unit already recorded (units are added,
never removed or overwritten). Ids hash the configuration, not the jaxcirc version: a sweep resumed
after an upgrade keeps its earlier units (each unit's results.json records its versions).

Debug option (for crash tests): JAXCIRC_SWEEP_DEBUG_PAUSE=SECONDS sleeps that long in the middle of
writing each unit (after arrays.npz, before results.json and the rename), to make a kill land there.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxcirc.sweep_units import METHODS, get_method

FORMAT = 1
PARTIAL = ".partial-"
DEBUG_PAUSE_ENV = "JAXCIRC_SWEEP_DEBUG_PAUSE"
BUILTIN_TASKS = {"capitals": Path(__file__).parent / "data" / "capital_pairs.jsonl"}
BUILTIN_SWEEPS = {"sweep_example": Path(__file__).parent / "suites" / "sweep_example.toml"}
DTYPES = ("float32", "bfloat16", "float16")
CSV_COLUMNS = ("unit_id", "model", "step", "task", "method", "options", "metric", "value")


@dataclasses.dataclass(frozen=True)
class Unit:
    """One cell of the grid. `config` is hashed into `id`; the resolved paths are not (they depend
    on where the sweep file lies, the configuration does not)."""

    id: str
    config: dict[str, Any]
    model_path: str  # what jaxcirc.load is given
    pairs_path: str

    @property
    def model_key(self) -> tuple[str, Any]:
        return self.config["model"], self.config["step"]


@dataclasses.dataclass(frozen=True)
class Sweep:
    name: str
    path: Path
    text: str
    units: tuple[Unit, ...]


# ----------------------------------------------------------------------------- the grid

def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def unit_id(config: Mapping[str, Any]) -> str:
    """16 hex digits of the sha256 of the canonical JSON of a unit's configuration."""
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()[:16]


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_toml(path: Path) -> dict[str, Any]:
    import tomllib

    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{path} is not valid TOML: {error}") from None


def _check_keys(where: str, table: Any, allowed: Sequence[str], required: Sequence[str] = ()) -> None:
    if not isinstance(table, Mapping):
        raise ValueError(f"{where} must be a table, got {table!r}.")
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed keys are {list(allowed)}.")
    missing = [k for k in required if k not in table]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}.")


def _local_path(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _model_entries(base: Path, models: Any) -> list[tuple[dict[str, Any], str]]:
    """(model part of the unit config, path to load) for every model and checkpoint."""
    from jaxcirc import registry
    from jaxcirc.checkpoints import checkpoint_series

    if not isinstance(models, list) or not models:
        raise ValueError("SWEEP.toml needs at least one [[models]] entry (source = ... or checkpoints = ...).")
    entries, names = [], set()
    for i, entry in enumerate(models):
        where = f"models[{i}]"
        _check_keys(where, entry, ("name", "source", "checkpoints", "steps", "dtype"))
        if ("source" in entry) == ("checkpoints" in entry):
            raise ValueError(f"{where}: give exactly one of source = MODEL or checkpoints = DIR.")
        dtype = entry.get("dtype", "float32")
        if dtype not in DTYPES:
            raise ValueError(f"{where}: dtype {dtype!r} is not one of {list(DTYPES)}.")
        spec = entry.get("source", entry.get("checkpoints"))
        if not isinstance(spec, str) or not spec:
            raise ValueError(f"{where}: the model must be given as a string, got {spec!r}.")
        name = entry.get("name", Path(spec).name or spec)
        if not isinstance(name, str) or not name or name in names:
            raise ValueError(f"{where}: model name {name!r} is empty or used twice; give each entry a distinct name.")
        names.add(name)
        common = {"model": name, "dtype": dtype}
        if "source" in entry:
            if "steps" in entry:
                raise ValueError(f"{where}: steps = [...] only applies to checkpoints = DIR.")
            path = _local_path(base, spec)
            if not path.exists():
                try:
                    path = registry.resolve(spec)
                except Exception as error:
                    raise ValueError(f"{where}: model {spec!r} not found (not a path relative to {base}, "
                                     f"nor an installed registry model): {error}") from None
            entries.append(({**common, "source": spec, "checkpoints": None, "step": None}, str(path)))
            continue
        try:
            series = checkpoint_series(_local_path(base, spec))
        except (OSError, ValueError) as error:
            raise ValueError(f"{where}: {error}") from None
        steps = entry.get("steps", list(series.steps))
        if not isinstance(steps, list) or not steps or not all(isinstance(s, int) and not isinstance(s, bool) for s in steps):
            raise ValueError(f"{where}: steps must be a non-empty list of integers, got {steps!r}.")
        missing = [s for s in steps if s not in series.steps]
        if missing:
            raise ValueError(f"{where}: no checkpoint for step(s) {missing} in {series.directory}; "
                             f"available: {list(series.steps)}.")
        for step in sorted(set(steps)):
            entries.append(({**common, "source": None, "checkpoints": spec, "step": step}, str(series.path(step))))
    return entries


def _task_entries(base: Path, tasks: Any) -> list[tuple[dict[str, Any], str]]:
    if not isinstance(tasks, list) or not tasks:
        raise ValueError(f"SWEEP.toml needs at least one [[tasks]] entry (pairs = JSONL file or one of "
                         f"{list(BUILTIN_TASKS)}).")
    entries, names = [], set()
    for i, entry in enumerate(tasks):
        where = f"tasks[{i}]"
        _check_keys(where, entry, ("name", "pairs", "max_pairs"), required=("pairs",))
        spec = entry["pairs"]
        if not isinstance(spec, str):
            raise ValueError(f"{where}: pairs must be a string, got {spec!r}.")
        path = BUILTIN_TASKS.get(spec) or _local_path(base, spec)
        if not path.is_file():
            raise ValueError(f"{where}: pairs file {spec!r} not found at {path}; give a JSONL file of "
                             f'{{"clean", "corrupt", "answer", "foil"}} records or one of {list(BUILTIN_TASKS)}.')
        max_pairs = entry.get("max_pairs")
        if max_pairs is not None and (not isinstance(max_pairs, int) or isinstance(max_pairs, bool) or max_pairs < 1):
            raise ValueError(f"{where}: max_pairs must be a positive integer, got {max_pairs!r}.")
        name = entry.get("name", spec if spec in BUILTIN_TASKS else Path(spec).stem)
        if not isinstance(name, str) or not name or name in names:
            raise ValueError(f"{where}: task name {name!r} is empty or used twice; give each entry a distinct name.")
        names.add(name)
        entries.append(({"name": name, "pairs": spec, "sha256": _file_sha256(path), "max_pairs": max_pairs},
                        str(path)))
    return entries


def _axis(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list) else [value]


def _method_grids(methods: Any, shared: Any) -> list[tuple[str, dict[str, Any]]]:
    """(method, resolved options) for every method and every combination of its option values."""
    if not isinstance(methods, Mapping) or not methods:
        raise ValueError(f"SWEEP.toml needs at least one [methods.NAME] table; methods: {', '.join(METHODS)}.")
    shared = shared or {}
    if not isinstance(shared, Mapping):
        raise ValueError("[options] must be a table of option = value or [values].")
    used = {name: False for name in shared}
    grids = []
    for name, table in methods.items():
        method = get_method(name, where=f"[methods.{name}]: ")
        table = table or {}
        if not isinstance(table, Mapping):
            raise ValueError(f"[methods.{name}] must be a table of option = value or [values].")
        axes = {k: v for k, v in shared.items() if k in method.options}
        for k in axes:
            used[k] = True
        axes.update(table)
        for option, values in axes.items():
            if isinstance(values, list) and not values:
                raise ValueError(f"[methods.{name}]: option {option!r} has an empty list of values.")
        keys = sorted(axes)
        seen = set()
        for combo in itertools.product(*(_axis(axes[k]) for k in keys)):
            options = method.resolve(dict(zip(keys, combo)), where=f"[methods.{name}]")
            key = canonical_json(options)
            if key not in seen:
                seen.add(key)
                grids.append((name, options))
    unused = [k for k, u in used.items() if not u]
    if unused:
        raise ValueError(f"[options]: {unused} is an option of none of the methods {list(methods)}.")
    return grids


def _matches(config: Mapping[str, Any], rule: Mapping[str, Any]) -> bool:
    for key, wanted in rule.items():
        if key == "task":
            value = config["task"]["name"]
        elif key in ("model", "step", "method"):
            value = config[key]
        elif key in config["options"]:
            value = config["options"][key]
        else:
            return False
        if value not in _axis(wanted):
            return False
    return True


def load_sweep(path: str | Path) -> Sweep:
    """Parse and check a SWEEP.toml (or a built-in sweep name, e.g. `sweep_example`); every unit
    of its grid, in run order (grouped by model)."""
    name, path = str(path), Path(path).expanduser()
    if not path.is_file() and name in BUILTIN_SWEEPS:
        path = BUILTIN_SWEEPS[name]
    if not path.is_file():
        raise FileNotFoundError(f"Sweep file {path} does not exist (built-in sweeps: {', '.join(BUILTIN_SWEEPS)}).")
    text = path.read_text(encoding="utf-8")
    data = _read_toml(path)
    _check_keys(str(path), data, ("sweep", "models", "tasks", "methods", "options", "exclude"))
    info = data.get("sweep", {})
    _check_keys("[sweep]", info, ("name", "description"))
    base = path.parent.absolute()
    models = _model_entries(base, data.get("models"))
    tasks = _task_entries(base, data.get("tasks"))
    grids = _method_grids(data.get("methods"), data.get("options"))
    options = {k for _, o in grids for k in o}
    excludes = data.get("exclude", [])
    if not isinstance(excludes, list):
        raise ValueError("exclude must be a list of tables: [[exclude]] method = ..., model = ...")
    for i, rule in enumerate(excludes):
        _check_keys(f"exclude[{i}]", rule, ("model", "step", "task", "method", *sorted(options)))
    units, hits, seen = [], [0] * len(excludes), set()
    for (model, model_path), (task, pairs_path), (method, opts) in itertools.product(models, tasks, grids):
        config = {**model, "task": task, "method": method, "options": opts}
        matched = [i for i, rule in enumerate(excludes) if _matches(config, rule)]
        for i in matched:
            hits[i] += 1
        uid = unit_id(config)
        if matched or uid in seen:
            continue
        seen.add(uid)
        units.append(Unit(uid, config, model_path, pairs_path))
    unused = [i for i, n in enumerate(hits) if n == 0]
    if unused:
        raise ValueError(f"exclude[{unused[0]}] = {excludes[unused[0]]} matches no unit; check its names and values.")
    if not units:
        raise ValueError(f"{path}: every unit of the grid is excluded; nothing to run.")
    return Sweep(str(info.get("name", path.stem)), path, text, tuple(units))


# ----------------------------------------------------------------------------- crash-safe files

def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to a temporary sibling, fsync it, rename it over `path`, fsync the folder."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _write_file(tmp, data)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_unit(units_dir: Path, unit: Unit, record: dict[str, Any], arrays: Mapping[str, tuple[Any, tuple[str, ...]]]) -> Path:
    """Write a finished unit as `units_dir/<id>/` (results.json + arrays.npz), all or nothing."""
    from jaxcirc.rundir import _jsonable

    final = units_dir / unit.id
    if final.exists():
        raise FileExistsError(f"Unit {unit.id} is already written at {final}; it is never overwritten.")
    staging = Path(tempfile.mkdtemp(prefix=f"{PARTIAL}{unit.id}-", dir=units_dir))
    try:
        buffer = io.BytesIO()
        np.savez(buffer, **{name: np.asarray(a) for name, (a, _) in arrays.items()})
        _write_file(staging / "arrays.npz", buffer.getvalue())
        pause = os.environ.get(DEBUG_PAUSE_ENV)
        if pause:
            time.sleep(float(pause))
        record = {**record, "arrays": {name: {"dims": list(dims), "shape": list(np.shape(a)),
                                              "dtype": str(np.asarray(a).dtype)} for name, (a, dims) in arrays.items()}}
        _write_file(staging / "results.json", json.dumps(_jsonable(record), indent=2, allow_nan=False).encode())
        _write_file(staging / "report.md", unit_report(unit, record).encode())
        _fsync_dir(staging)
        os.rename(staging, final)  # atomic: units/<id> appears complete or not at all
        _fsync_dir(units_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def unit_report(unit: Unit, record: Mapping[str, Any]) -> str:
    """A unit's report.md: its configuration and scalars (the run-directory layout of rundir.py)."""
    c = unit.config
    where = f"`{c['model']}`" + ("" if c["step"] is None else f" step {c['step']}")
    lines = [f"# Sweep unit {unit.id}: {c['method']} on {where}, task `{c['task']['name']}`", "",
             f"Options: {_option_text(c['options']) or 'none'}. Pairs: {record.get('pairs_report', '')}", "",
             METHODS[c["method"]].summary, "", "| scalar | value |", "|---|---|",
             *[f"| {k} | {_cell(v)} |" for k, v in record["scalars"].items()], "",
             f"Arrays (arrays.npz): {', '.join(record.get('arrays', {})) or 'none'}.", ""]
    return "\n".join(lines)


def clean_partials(out_dir: Path) -> list[Path]:
    """Delete what a killed run left half-written (partial units, temporary table files)."""
    leftovers = [p for p in (out_dir / "units").glob(f"{PARTIAL}*")] if (out_dir / "units").is_dir() else []
    leftovers += [p for p in out_dir.glob(".*.tmp-*")]
    for p in leftovers:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return leftovers


@contextlib.contextmanager
def locked(out_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on `out_dir` (released by the OS even on SIGKILL)."""
    import fcntl

    fd = os.open(out_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"Another jaxcirc sweep is running in {out_dir}; wait for it or use another --out.") from None
        yield
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- the grid on disk

def read_manifest(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / "sweep.json"
    return json.loads(path.read_text()) if path.exists() else None


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file, not a folder.")
    if out_dir.is_dir() and not (out_dir / "sweep.json").exists():
        # A first run killed before sweep.json was in place leaves only the lock, temporary
        # files (dot files) and perhaps the sweep.toml copy.
        others = [p.name for p in out_dir.iterdir() if not p.name.startswith(".") and p.name != "sweep.toml"]
        if others:
            raise ValueError(f"{out_dir} is not empty and holds no sweep (no sweep.json); choose a new --out.")


def record_grid(out_dir: Path, sweep: Sweep, extend: bool) -> None:
    """Write sweep.json for a new DIR; check (or with `extend`, grow) the grid of an existing one."""
    manifest = read_manifest(out_dir)
    ids = [u.id for u in sweep.units]
    if manifest is not None:
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{out_dir}/sweep.json has format {manifest.get('format')}, not {FORMAT}.")
        old = list(manifest["units"])
        if old == ids:
            if not (out_dir / "sweep.toml").exists():
                write_atomic(out_dir / "sweep.toml", sweep.text.encode())
            return
        dropped = [u for u in old if u not in set(ids)]
        added = len(set(ids) - set(old))
        if dropped:
            raise ValueError(f"{out_dir} holds a sweep with {len(dropped)} unit(s) that are not in this grid "
                             f"(e.g. {manifest['units'][dropped[0]]}); results are never removed, so use a "
                             "new --out for a different grid.")
        if added and not extend:
            raise ValueError(f"{out_dir} holds a sweep of {len(old)} units; this grid adds {added}. Pass --extend "
                             "to add them (existing units are kept), or use a new --out.")
        ids = old + [u for u in ids if u not in set(old)]  # recorded units keep their order
    by_id = {u.id: u.config for u in sweep.units}
    data = {"format": FORMAT, "name": sweep.name, "units": {uid: by_id[uid] for uid in ids}}
    write_atomic(out_dir / "sweep.toml", sweep.text.encode())
    write_atomic(out_dir / "sweep.json", json.dumps(data, indent=1).encode())


def done_units(out_dir: Path, ids: Sequence[str]) -> list[str]:
    units = out_dir / "units"
    return [uid for uid in ids if (units / uid / "results.json").is_file()]


# ----------------------------------------------------------------------------- gathering

def _option_text(options: Mapping[str, Any]) -> str:
    return ";".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in sorted(options.items()))


def unit_rows(uid: str, record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The table rows of one unit: one per scalar."""
    config = record["config"]
    step = config["step"]
    head = {"unit_id": uid, "model": config["model"], "step": "" if step is None else step,
            "task": config["task"]["name"], "method": config["method"], "options": _option_text(config["options"])}
    return [{**head, "metric": name, "value": value} for name, value in record["scalars"].items()]


def read_unit(out_dir: Path, uid: str) -> dict[str, Any]:
    return json.loads((out_dir / "units" / uid / "results.json").read_text())


def write_tables(out_dir: Path, rows: Sequence[Mapping[str, Any]], parquet: bool = False) -> list[Path]:
    """results.csv (and results.parquet when asked and pyarrow is importable), atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        value = row["value"]
        writer.writerow({**row, "value": "" if value is None else repr(float(value))})
    write_atomic(out_dir / "results.csv", buffer.getvalue().encode())
    written = [out_dir / "results.csv"]
    if parquet:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            return written
        columns = {c: [r[c] for r in rows] for c in CSV_COLUMNS}
        columns["step"] = [None if s == "" else int(s) for s in columns["step"]]
        columns["value"] = [None if v is None else float(v) for v in columns["value"]]
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table(columns), sink)
        write_atomic(out_dir / "results.parquet", sink.getvalue().to_pybytes())
        written.append(out_dir / "results.parquet")
    return written


def _cell(value: Any) -> str:
    if value is None:
        return "nan"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e9:
        return str(int(value))  # counts and indices
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def report_text(name: str, manifest: Mapping[str, Any], records: Mapping[str, Mapping[str, Any]],
                failures: Mapping[str, str]) -> str:
    """report.md: counts, then per method its notes and one table row per finished unit."""
    units = manifest["units"]
    lines = [f"# Sweep `{name}`", "",
             f"{len(records)} of {len(units)} units done; {len(units) - len(records)} left"
             + (f"; {len(failures)} failed in the last run (see failures.json; rerun to retry)." if failures else "."),
             "", "Full table: `results.csv` (one row per unit and scalar). Unit files: `units/<unit_id>/`.", ""]
    for method in dict.fromkeys(c["method"] for c in units.values()):
        done = [(uid, records[uid]) for uid, c in units.items() if c["method"] == method and uid in records]
        lines += [f"## {method}", "", METHODS[method].summary if method in METHODS else "", ""]
        if not done:
            lines += ["No unit of this method is done yet.", ""]
            continue
        scalars = list(dict.fromkeys(k for _, r in done for k in r["scalars"]))
        lines += ["| unit | model | step | task | options | " + " | ".join(scalars) + " |",
                  "|" + "---|" * (5 + len(scalars))]
        for uid, r in done:
            c = r["config"]
            step = "" if c["step"] is None else str(c["step"])
            lines.append(f"| {uid} | {c['model']} | {step} | {c['task']['name']} | {_option_text(c['options'])} | "
                         + " | ".join(_cell(r["scalars"].get(k)) for k in scalars) + " |")
        lines.append("")
    if failures:
        lines += ["## Failed units", "", *[f"- `{uid}`: {msg}" for uid, msg in failures.items()], ""]
    return "\n".join(lines)


def gather(out_dir: str | Path, failures: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Rebuild results.csv (+ parquet) and report.md from the units on disk."""
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    if manifest is None:
        raise ValueError(f"{out_dir} holds no sweep (no sweep.json); run `jaxcirc sweep SWEEP.toml --out {out_dir}` first.")
    if failures is None:
        path = out_dir / "failures.json"
        failures = json.loads(path.read_text()) if path.exists() else {}
    records = {uid: read_unit(out_dir, uid) for uid in done_units(out_dir, list(manifest["units"]))}
    rows = [row for uid, r in records.items() for row in unit_rows(uid, r)]
    tables = write_tables(out_dir, rows, parquet=True)
    write_atomic(out_dir / "report.md", report_text(manifest.get("name", ""), manifest, records, failures).encode())
    return {"units": len(manifest["units"]), "done": len(records), "rows": len(rows),
            "tables": [str(t) for t in tables], "report": str(out_dir / "report.md")}


def gather_only(out_dir: str | Path) -> dict[str, Any]:
    """`--gather-only`: rebuild the tables and report of DIR (not while a sweep runs there)."""
    out_dir = Path(out_dir).expanduser().absolute()
    if not out_dir.is_dir() or read_manifest(out_dir) is None:
        raise ValueError(f"{out_dir} holds no sweep (no sweep.json); run `jaxcirc sweep SWEEP.toml --out {out_dir}` first.")
    with locked(out_dir):
        return gather(out_dir)


# ----------------------------------------------------------------------------- running

def _load_model(unit: Unit, previous: Any) -> Any:
    """The unit's model; with the same config as `previous`, it reuses that compiled forward."""
    from jaxcirc.loading import load

    model = load(unit.model_path, dtype=unit.config["dtype"])
    if previous is not None and previous.config == model.config:
        model = dataclasses.replace(model, forward=previous.forward)
    return model


def _run_unit(unit: Unit, model: Any, pairs_cache: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    from jaxcirc.attribution_report import load_pairs
    from jaxcirc.rundir import model_record, versions

    task = unit.config["task"]
    if task["name"] not in pairs_cache:
        pairs_cache[task["name"]] = load_pairs(model, unit.pairs_path, task["max_pairs"])
    pairs, pairs_report = pairs_cache[task["name"]]
    start = time.perf_counter()
    result = METHODS[unit.config["method"]].run(model, pairs, unit.config["options"])
    record = {"command": "sweep", "unit": unit.id, "config": unit.config,
              "model": model_record(model),
              "pairs_report": pairs_report.summary(), "scalars": result.scalars, "labels": result.labels,
              "seconds": round(time.perf_counter() - start, 3), "versions": versions()}
    return record, result.arrays


def run_sweep(sweep_file: str | Path, out_dir: str | Path, *, extend: bool = False, dry_run: bool = False,
              stream: Any = None) -> dict[str, Any]:
    """Run every unit of the grid that `out_dir` does not hold yet (see the module docstring).

    Returns counts: units, done_before, run (finished now), failed ({unit id: message}).
    """
    from jaxcirc.rundir import _jsonable

    stream = stream or sys.stderr
    sweep = load_sweep(sweep_file)  # all checks happen before DIR is touched
    out_dir = Path(out_dir).expanduser().absolute()
    _check_out_dir(out_dir)
    if dry_run:
        manifest = read_manifest(out_dir) if out_dir.is_dir() else None
        recorded = set(manifest["units"]) if manifest else set()
        done = done_units(out_dir, [u.id for u in sweep.units]) if recorded else []
        return {"units": len(sweep.units), "done_before": len(done), "run": 0, "failed": {},
                "new": sum(u.id not in recorded for u in sweep.units) if manifest else len(sweep.units)}
    out_dir.mkdir(parents=True, exist_ok=True)
    with locked(out_dir):
        record_grid(out_dir, sweep, extend)
        clean_partials(out_dir)
        (out_dir / "units").mkdir(exist_ok=True)
        manifest = read_manifest(out_dir)
        done = set(done_units(out_dir, list(manifest["units"])))
        records = {uid: read_unit(out_dir, uid) for uid in manifest["units"] if uid in done}
        write_tables(out_dir, [row for uid, r in records.items() for row in unit_rows(uid, r)])
        pending = [u for u in sweep.units if u.id not in done]  # grid order: each model loads once
        failures: dict[str, str] = {}
        model, model_key, model_error, pairs_cache = None, None, None, {}
        from jaxcirc.progress import progress

        for unit in progress(pending, f"sweep {sweep.name}", done_before=len(done), stream=stream):
            try:
                if unit.model_key != model_key:
                    model_key, pairs_cache, model_error = unit.model_key, {}, None
                    try:
                        model = _load_model(unit, model)
                    except Exception as error:
                        model, model_error = None, error
                if model_error is not None:
                    raise model_error
                record, arrays = _run_unit(unit, model, pairs_cache)
                write_unit(out_dir / "units", unit, record, arrays)
            except Exception as error:
                if os.environ.get("JAXCIRC_TRACEBACK"):
                    raise
                message = f"{type(error).__name__}: {' '.join(str(error).split())}"
                failures[unit.id] = message
                print(f"unit {unit.id} ({unit.config['model']}, {unit.config['task']['name']}, "
                      f"{unit.config['method']}) failed: {message}", file=stream, flush=True)
                continue
            records[unit.id] = json.loads(json.dumps(_jsonable(record)))  # as read back from disk
            write_tables(out_dir, [row for uid in manifest["units"] if uid in records
                                   for row in unit_rows(uid, records[uid])])
        if failures:
            write_atomic(out_dir / "failures.json", json.dumps(failures, indent=1).encode())
        elif (out_dir / "failures.json").exists():
            (out_dir / "failures.json").unlink()
        gather(out_dir, failures)
    return {"units": len(manifest["units"]), "done_before": len(done),
            "run": len(pending) - len(failures), "failed": failures}
