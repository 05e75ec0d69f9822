"""Progress bars (with ETA) for the long sub-commands, and what Ctrl-C says.

A :class:`Tracker` is a context manager around one ``rich`` progress display with one bar
per loop (training steps, scored steps, seeds × arms). It remembers how far each bar got, so
that Ctrl-C ends the command with one line — ``interrupted at step N of M; rerun the same
command to resume`` when the command checkpoints — instead of a traceback
(:class:`Interrupted`, caught by :func:`dicejax.cli.main`).
"""

from __future__ import annotations

from typing import Any


class Interrupted(Exception):
    """Ctrl-C during a command; ``str()`` is the line to print."""


class Tracker:
    """Progress bars of one command.

    Args:
      console: the ``rich`` console to draw on.
      resumable: whether the command checkpoints (``--checkpoint-dir``): decides what an
        interruption message says.

    Example::

        with Tracker(console, resumable=True) as t:
            bar = t.bar("training", total=T, unit="steps")
            ...
            t.update(bar, done)
    """

    def __init__(self, console: Any, *, resumable: bool = False):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.resumable = resumable
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"), TimeElapsedColumn(), TextColumn("ETA"),
            TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
            console=console, transient=False)
        self._info: dict[Any, list] = {}  # task -> [noun, done, total, ordinal]

    def __enter__(self) -> Tracker:
        self._progress.__enter__()
        return self

    def __exit__(self, kind, value, tb) -> bool:
        self._progress.__exit__(kind, value, tb)
        if kind is KeyboardInterrupt:
            raise Interrupted(self.interruption()) from None
        return False

    def bar(self, description: str, total: int, unit: str = "steps", completed: int = 0,
            noun: str = "step", ordinal: bool = False) -> Any:
        """Adds a bar.

        Args:
          description: text in front of the bar.
          total: units to do.
          unit: what the counter counts (shown after it).
          completed: units already done (a resumed run).
          noun: one unit, in the interruption message.
          ordinal: the message names the unit in progress (``seed 2 of 5`` while one seed is
            done) rather than the units done (``step 120 of 300``).
        """
        task = self._progress.add_task(description, total=total, completed=completed,
                                       unit=unit, info="")
        self._info[task] = [noun, completed, total, ordinal]
        return task

    def update(self, task: Any, completed: int, info: str | None = None) -> None:
        """Moves a bar to ``completed`` (with an optional note after it)."""
        fields = {} if info is None else {"info": info}
        self._progress.update(task, completed=completed, **fields)
        self._info[task][1] = completed

    def reset(self, task: Any, total: int | None = None, completed: int = 0) -> None:
        """Starts a bar again (e.g. the step bar of the next seed)."""
        self._progress.reset(task, total=total, completed=completed)
        self._info[task][1] = completed
        if total is not None:
            self._info[task][2] = total

    def print(self, *objects: Any) -> None:
        """Prints above the bars."""
        self._progress.console.print(*objects)

    def interruption(self) -> str:
        """``interrupted at <noun> N of M[, ...]; ...``: how far each bar got, what to do."""
        places = []
        for noun, done, total, ordinal in self._info.values():
            shown = min(done + 1, total) if ordinal else done
            places.append(f"{noun} {shown} of {total}")
        where = f" at {', '.join(places)}" if places else ""
        if self.resumable:
            return f"interrupted{where}; rerun the same command to resume"
        return (f"interrupted{where}; nothing was kept (pass --checkpoint-dir DIR to make "
                "the command resumable)")
