"""Progress reporting for long work: a rich progress bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], description: str, total: int | None = None,
             stream=None, done_before: int = 0) -> Iterator[T]:
    """Yield `items`, showing done / left / rate / ETA. Plain lines (about every 10%) when not a TTY.

    done_before: items already done in an earlier (resumed) run; counted in done and in `total`
    (when `total` is inferred from `len(items)`), but not in the rate.
    """
    stream = stream or sys.stderr
    if total is None and hasattr(items, "__len__"):
        total = len(items) + done_before  # type: ignore[arg-type]
    if stream.isatty():
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*columns, transient=False) as bar:
            task = bar.add_task(description, total=total, completed=done_before)
            for item in items:
                yield item
                bar.advance(task)
        return
    start, done, step = time.perf_counter(), done_before, max(1, (total or 10) // 10)
    for item in items:
        yield item
        done += 1
        if done % step == 0 or done == total:
            elapsed = time.perf_counter() - start
            rate = (done - done_before) / max(elapsed, 1e-9)
            left = f", {total - done} left" if total else ""
            eta = f", ETA {(total - done) / rate:.0f}s" if total and rate > 0 else ""
            print(f"{description}: {done}{'/' + str(total) if total else ''} done{left} "
                  f"({rate:.2f}/s{eta})", file=stream, flush=True)
