"""Series of checkpoints of one model over training: list them, load them one by one.

    for step, path in jaxcirc.checkpoints("runs/role/2x64"):      # [(0, .../step_0), (1, ...), ...]
        ...
    series = checkpoint_series("pythia-14m-revisions/")          # step0/ step1/ ... (HF dirs)
    for step, model in series.models():                          # one compiled forward for all
        ...

Three layouts are recognised, all giving the same (step, path) series:
- a jaxcirc training run: `step_N/` folders, each a jaxcirc checkpoint (`jaxcirc.json`);
- a folder of HF revisions: `stepN/` (or `step_N/`) folders, each an HF model directory
  (config.json + weights), e.g. Pythia's `revision="step1000"` downloads saved side by side;
- an HF hub cache folder of one repository (`refs/stepN` files naming `snapshots/<commit>/`).
Only complete checkpoints are listed: a folder without its marker file (`jaxcirc.json` or
`config.json`), e.g. one still being written, is skipped.

Also the Pythia-like checkpoint schedule that training uses (`checkpoint_steps`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from jaxcirc import checkpoint

if TYPE_CHECKING:
    from jaxcirc.model import Model

__all__ = ["checkpoints", "checkpoint_series", "checkpoint_steps", "CheckpointSeries"]

_STEP_NAME = re.compile(r"^step_?(\d+)$")


def checkpoint_steps(total_steps: int, every: int) -> list[int]:
    """Pythia's schedule generalised: step 0, the powers of two below `every`, then every
    `every` steps, and always the final step. total_steps=143000, every=1000 gives Pythia's 154
    checkpoints (0, 1, 2, 4, ..., 512, 1000, 2000, ..., 143000)."""
    if total_steps < 0 or every < 1:
        raise ValueError(f"Need total_steps >= 0 and every >= 1, got total_steps={total_steps}, every={every}.")
    steps = {0, total_steps}
    power = 1
    while power < every and power <= total_steps:
        steps.add(power)
        power *= 2
    steps.update(range(every, total_steps + 1, every))
    return sorted(steps)


def _is_complete(path: Path) -> bool:
    return checkpoint.is_checkpoint(path) or (path / "config.json").is_file()


def _hub_cache_entries(directory: Path) -> list[tuple[int, Path]]:
    entries = []
    for ref in (directory / "refs").iterdir():
        match = _STEP_NAME.match(ref.name)
        if match and ref.is_file():
            snapshot = directory / "snapshots" / ref.read_text().strip()
            if _is_complete(snapshot):
                entries.append((int(match.group(1)), snapshot))
    return entries


def checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint under `directory`, sorted by step."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory; give a training run folder (step_N/ inside), "
                                "a folder of HF revisions (step0/, step1/, ...) or an HF hub cache repo folder.")
    if (directory / "refs").is_dir() and (directory / "snapshots").is_dir():
        entries = _hub_cache_entries(directory)
    else:
        entries = []
        for child in directory.iterdir():
            match = _STEP_NAME.match(child.name)
            if match and child.is_dir() and _is_complete(child):
                entries.append((int(match.group(1)), child))
    steps = [s for s, _ in entries]
    duplicates = sorted({s for s in steps if steps.count(s) > 1})
    if duplicates:
        raise ValueError(f"{directory} holds several checkpoints for step(s) {duplicates} "
                         "(e.g. step1 and step_1); keep one folder per step.")
    return sorted(entries)


@dataclasses.dataclass(frozen=True)
class CheckpointSeries:
    """The checkpoints of one model, by training step."""

    directory: Path
    entries: tuple[tuple[int, Path], ...]

    @property
    def steps(self) -> tuple[int, ...]:
        return tuple(s for s, _ in self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[tuple[int, Path]]:
        return iter(self.entries)

    def path(self, step: int) -> Path:
        for s, p in self.entries:
            if s == step:
                return p
        raise KeyError(f"No checkpoint for step {step} in {self.directory}; available steps: {list(self.steps)}.")

    def load(self, step: int, dtype: str = "float32", like: "Model | None" = None) -> "Model":
        """The model at `step`. With `like` (a model of the same config), reuse its compiled forward."""
        from jaxcirc.loading import load

        model = load(self.path(step), dtype=dtype)
        if like is not None and like.config == model.config:
            model = dataclasses.replace(model, forward=like.forward)
        return model

    def models(self, steps: Iterable[int] | None = None, dtype: str = "float32") -> Iterator[tuple[int, "Model"]]:
        """(step, model) for `steps` (default all), loaded lazily one at a time; models with the
        same config share one compiled forward, so a sweep over checkpoints compiles once."""
        first = None
        for step in self.steps if steps is None else steps:
            model = self.load(step, dtype=dtype, like=first)
            first = first or model
            yield step, model


def checkpoint_series(directory: str | Path) -> CheckpointSeries:
    """The checkpoint series under `directory` (see the module docstring for the layouts)."""
    entries = checkpoints(directory)
    if not entries:
        raise FileNotFoundError(
            f"No complete checkpoints in {directory}: expected step_N/ folders with jaxcirc.json (a jaxcirc "
            "training run), stepN/ folders with config.json (HF revisions), or refs/ + snapshots/ (HF cache).")
    return CheckpointSeries(Path(directory).expanduser(), tuple(entries))
