"""A stall's where, written by itself: when the engine holds requests and none of its work ends
for ``after_s`` seconds, every thread's stack goes into the log, once per stall. A server that
hangs under a load test then explains itself in the server log the run keeps (``kill -USR1``
does the same on demand: cli.py). A thread of its own, so a blocked event loop is seen too."""

from __future__ import annotations

import faulthandler
import logging
import sys
import threading
import time
from typing import Callable

log = logging.getLogger("ssm_server")


class StallWatch:
    def __init__(self, busy: Callable[[], bool], after_s: float = 120.0, every_s: float = 5.0, out=None):
        self.busy = busy
        """Whether the engine holds requests (read from this thread: a snapshot is enough)."""
        self.after_s, self.every_s = after_s, every_s
        self.out = out
        """Where the stacks go: a file with a descriptor (None: stderr, the server log)."""
        self.last = time.monotonic()
        self.reported = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def progress(self) -> None:
        """Some work ended (a step, a prefill), or the engine woke from idle."""
        self.last = time.monotonic()
        self.reported = False

    def start(self) -> None:
        self._thread = threading.Thread(target=self._watch, name="stall-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(self.every_s):
            idle = time.monotonic() - self.last
            if self.reported or idle < self.after_s or not self.busy():
                continue
            self.reported = True
            log.warning("no engine work ended in %.0f s while requests wait or run: a stall; "
                        "every thread's stack follows", idle)
            out = self.out or sys.stderr
            out.flush()
            faulthandler.dump_traceback(file=out, all_threads=True)
