"""Progress with an ETA for the long commands (verify, bench, bench --exhaustive, autotune,
calibrate): a rich bar on stderr, only when stderr is a terminal, so logs, pipes and CI output stay
as they were. Lines the command prints meanwhile scroll above the bar."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

Advance = Callable[..., None]  # advance(n=1, label=None)


@contextmanager
def progress(total: int, what: str, console=None) -> Iterator[Advance]:
    """Yields advance(n=1, label=None): n more of `total` steps done, `label` naming the next one."""
    from rich.console import Console

    console = console or Console(stderr=True)
    if not console.is_terminal or total <= 1:
        yield lambda n=1, label=None: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(what, total=total)

        def advance(n: int = 1, label: str | None = None) -> None:
            bar.update(task, advance=n, description=f"{what}: {label}" if label else what)
        yield advance
