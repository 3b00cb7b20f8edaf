"""Progress display for long steps (engine build, model assembly): a bar on a terminal, a few
plain lines otherwise, so logs stay readable."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import (
    BarColumn,
    Progress,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)

Reporter = Callable[[str, float], None]


@contextmanager
def progress_reporter(title: str) -> Iterator[Reporter]:
    """Yields a `report(step, fraction)` callback that draws the progress of `title`."""
    if not sys.stderr.isatty():
        yield _plain_reporter(title)
        return
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        transient=False,
    ) as bar:
        tasks: dict[str, TaskID] = {}

        def report(step: str, fraction: float) -> None:
            if step not in tasks:
                tasks[step] = bar.add_task(f"{title}: {step}", total=100)
            bar.update(tasks[step], completed=round(fraction * 100))

        yield report


def _plain_reporter(title: str) -> Reporter:
    shown: set[tuple[str, int]] = set()

    def report(step: str, fraction: float) -> None:
        decile = int(fraction * 10)
        if (step, decile) not in shown:
            shown.add((step, decile))
            print(f"{title}: {step} {decile * 10}%", file=sys.stderr, flush=True)

    return report
