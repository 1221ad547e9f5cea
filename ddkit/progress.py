"""One progress bar for every stage (rich), on stderr, drawn only on a terminal.

Every long loop in ddkit (sharding, training, D^3HR inversion, generation, evaluation) shows the same bar:
description, bar, ``done/total``, elapsed, time remaining, plus the stage's own fields. Bars go to stderr so
stdout stays parseable, and are disabled when stderr is not a terminal (SLURM logs, pipes, tests), so logs
hold the stage's own one-line records instead of redraw noise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

_CONSOLE = None


def console():
    """The shared stderr ``rich.console.Console`` (created on first use)."""
    global _CONSOLE
    if _CONSOLE is None:

        _CONSOLE = Console(stderr=True)
    return _CONSOLE


@contextlib.contextmanager
def bar(
    description: str,
    total: float | None,
    *,
    enabled: bool = True,
    fields: str = "",
    completed: float = 0,
    transient: bool = True,
    **field_values: Any,
) -> Iterator[Any]:
    """A progress bar over ``total`` units; yields ``update(advance=1, **fields)``.

    Args:
        description: the label (rich markup allowed), e.g. ``"train minimax"``.
        total: units of work (steps, images, classes, epochs); None for an unknown total.
        enabled: False gives a no-op ``update`` (the caller's ``progress`` flag).
        fields: extra rich text after the counts, formatted with ``{task.fields[name]}``, e.g.
            ``"{task.fields[speed]}"``; the initial values come from ``field_values``.
        completed: units already done (a resumed stage).
        transient: erase the bar when done.

    Yields:
        ``update(advance: float = 1, **fields) -> None``: advance the bar and set fields.
    """
    if not enabled:
        yield lambda advance=1, **kw: None
        return

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn()] + ([TextColumn(fields)] if fields else [])  # fmt: skip
    out = console()
    with Progress(*columns, console=out, transient=transient, disable=not out.is_terminal) as prog:
        task = prog.add_task(description, total=total, completed=completed, **field_values)

        def update(advance: float = 1, **kw: Any) -> None:
            prog.update(task, advance=advance, **kw)

        yield update
