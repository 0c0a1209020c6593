"""What a run shows while it runs.

In a terminal: one live line for the stage running — target and stage, a bar, requests done of
the stage's budget, its errors, time elapsed and left — drawn by rich, with every message
printed above it. Elsewhere (a file, a pipe): the messages only (the runner says when a stage
starts and sums it up when it ends), plus one line a minute while a stage runs longer than
that, so a log shows a long prefill is alive.

The live line is redrawn from the load generator's own loop, once a second (``tick``), never
from a thread of rich's: a redraw takes a fraction of a millisecond of that loop.
"""

from __future__ import annotations

import time

HEARTBEAT_S = 60.0


class Progress:
    def __init__(self, controller, say, live: bool, console=None):
        self.c, self.say_plain = controller, say
        self.label = ""
        self.budget: int | None = None
        self.duration_s: float | None = None
        self.base = self.base_errors = 0
        self.t0 = self.last_beat = time.monotonic()
        self.running = False
        self._bar = self._task = None
        if live:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self._bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[errors]} errors"), TimeElapsedColumn(),
                            TimeRemainingColumn(), console=console or Console(), auto_refresh=False,
                            transient=True)
            self._bar.start()

    # ---- what the runner calls ---------------------------------------------------------------
    def message(self, text: str) -> None:
        """A line of the run's log (above the live line in a terminal)."""
        if self._bar is not None:
            self._bar.console.print(text, markup=False, highlight=False)
        else:
            self.say_plain(text)

    def stage(self, label: str, budget: int | None, duration_s: float | None = None) -> None:
        """A stage starts: ``budget`` requests, or ``duration_s`` seconds."""
        self.end_stage()
        self.label, self.budget, self.duration_s = label, budget, duration_s
        self.base, self.base_errors = self.c.total, self.c.errors
        self.t0 = self.last_beat = time.monotonic()
        self.running = True
        if self._bar is not None:
            total = budget if budget else duration_s
            self._task = self._bar.add_task(label, total=total, errors=0)
            self._bar.refresh()

    def end_stage(self) -> None:
        self.running = False
        if self._bar is not None and self._task is not None:
            self._bar.remove_task(self._task)
            self._task = None
            self._bar.refresh()

    def tick(self) -> None:
        """Once a second: redraw the live line, or a heartbeat line on a long stage."""
        if not self.running:
            return
        done, errors = self.c.total - self.base, self.c.errors - self.base_errors
        now = time.monotonic()
        if self._bar is not None and self._task is not None:
            completed = done if self.budget else min(now - self.t0, self.duration_s or 0.0)
            self._bar.update(self._task, completed=completed, errors=errors)
            self._bar.refresh()
        elif now - self.last_beat >= HEARTBEAT_S:
            self.last_beat = now
            self.say_plain(self.line(done, errors, now - self.t0))

    def line(self, done: int, errors: int, elapsed: float) -> str:
        of = f"/{self.budget}" if self.budget else ""
        return f"  {self.label}: {done}{of} requests, {errors} errors, {elapsed:.0f} s"

    def close(self) -> None:
        self.end_stage()
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
