"""Progress bars (with ETA) for the long sub-commands, and what Ctrl-C does.

A :class:`Tracker` is a context manager around one ``rich`` progress display with one bar
per loop (training steps, scored steps, seeds × arms). It remembers how far each bar got, so
that Ctrl-C ends the command with one line — ``interrupted at step N of M; rerun the same
command to resume`` when the command checkpoints — instead of a traceback
(:class:`Interrupted`, caught by :func:`dicejax.cli.main`).

Ctrl-C is deferred to the next progress update, which the experiments send at safe points
(after a chunk and its checkpoint, after a scored step, after a seed): the step the message
names is saved, and no checkpoint write is cut off. A second Ctrl-C stops at once.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
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
        self._stop = False
        self._handler = None
        if threading.current_thread() is threading.main_thread():
            self._handler = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, kind, value, tb) -> bool:
        if self._handler is not None:
            signal.signal(signal.SIGINT, self._handler)
        self._progress.__exit__(kind, value, tb)
        if kind is KeyboardInterrupt:
            raise Interrupted(self.interruption()) from None
        return False

    def _on_sigint(self, signum, frame) -> None:
        if self._stop:  # the second Ctrl-C: stop now (checkpoints are written atomically)
            self._progress.stop()
            sys.stderr.write(f"error: {self.interruption()} (stopped at once)\n")
            sys.stderr.flush()
            os._exit(130)
        self._stop = True
        sys.stderr.write("\nCtrl-C: stopping at the next progress update (press Ctrl-C again "
                         "to stop at once)\n")
        sys.stderr.flush()

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
        if getattr(self, "_stop", False):
            raise KeyboardInterrupt

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
