"""Start a server as a child process, wait for it to be healthy, and always stop it.

Used by ``ctxload demo``, by ``ctxload run`` for scenario targets that ask to be served, and
by the tests.  A server runs in its own process group so that stopping it stops whatever it
started (vLLM forks an engine core); its output goes to a log file whose tail is shown when
it fails to start.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Sequence


def free_port(host: str = "127.0.0.1") -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def arg_value(args: Sequence[str], flag: str) -> str | None:
    """The value of ``flag`` in a command line (``--flag V`` or ``--flag=V``); the last one
    wins, as it does for the servers' argparse."""
    value = None
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


class ServerFailed(RuntimeError):
    """The server exited or did not become healthy in time; the message holds its log's tail."""


class ManagedServer:
    """A server process on ``host:port``; use as a context manager.

    ``health_path`` is polled until it answers 200; ``stop()`` sends SIGTERM to the process
    group, then SIGKILL after ``grace_s``.
    """

    def __init__(self, name: str, cmd: Sequence[str], port: int, *, host: str = "127.0.0.1",
                 log_path: str | Path | None = None, env: dict | None = None,
                 health_path: str = "/health", startup_timeout_s: float = 300.0,
                 grace_s: float = 10.0):
        self.name = name
        self.cmd = [str(c) for c in cmd]
        self.host = host
        self.port = port
        self.health_path = health_path
        self.startup_timeout_s = startup_timeout_s
        self.grace_s = grace_s
        self.log_path = Path(log_path) if log_path else Path(f"/tmp/ctxload-{name}-{port}.log")
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "ManagedServer":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=self.env,
                                     start_new_session=True)
        return self

    def log_tail(self, n: int = 30) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def wait_healthy(self, on_wait=None) -> "ManagedServer":
        """Poll until healthy. ``on_wait(elapsed_s)`` is called about once a second."""
        assert self.proc is not None, "start() first"
        deadline = time.monotonic() + self.startup_timeout_s
        t0 = time.monotonic()
        while True:
            code = self.proc.poll()
            if code is not None:
                raise ServerFailed(f"{self.name} exited with status {code} while starting; "
                                   f"last lines of {self.log_path}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + self.health_path, timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ServerFailed(f"{self.name} was not healthy after {self.startup_timeout_s:.0f} s; "
                                   f"last lines of {self.log_path}:\n{self.log_tail()}")
            if on_wait:
                on_wait(time.monotonic() - t0)
            time.sleep(0.5)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(self.grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        if proc is not None:  # reap stragglers of the group (an engine core child, say)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        if self._log:
            self._log.close()
            self._log = None

    def __enter__(self) -> "ManagedServer":
        self.start()
        try:
            return self.wait_healthy()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
