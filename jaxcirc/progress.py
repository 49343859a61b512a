"""Progress reporting for long work: a rich progress bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], description: str, total: int | None = None,
             stream=None) -> Iterator[T]:
    """Yield `items`, showing done / left / rate. Plain lines (about every 10%) when not a TTY."""
    stream = stream or sys.stderr
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if stream.isatty():
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*columns, transient=False) as bar:
            task = bar.add_task(description, total=total)
            for item in items:
                yield item
                bar.advance(task)
        return
    start, done, step = time.perf_counter(), 0, max(1, (total or 10) // 10)
    for item in items:
        yield item
        done += 1
        if done % step == 0 or done == total:
            elapsed = time.perf_counter() - start
            left = f", {total - done} left" if total else ""
            print(f"{description}: {done}{'/' + str(total) if total else ''} done{left} "
                  f"({done / max(elapsed, 1e-9):.2f}/s)", file=stream, flush=True)
