"""Rich progress bars with ETA, shared by all commands (plain lines when not a terminal)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Callable


@contextlib.contextmanager
def progress_bar(description: str) -> Iterator[Callable[[str, int, int], None]]:
    """Yields ``update(label, done, total)``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    prog = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[label]}"),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), transient=False,
                    disable=not sys.stderr.isatty(), console=None)
    task = prog.add_task(description, total=None, label="")
    with prog:
        def update(label: str, done: int, total: int) -> None:
            prog.update(task, completed=done, total=total or None, label=label)

        yield update
