"""Distributed runs: Locust master in the runner's process, users in worker processes.

Stages stay counted in one place: a worker's user asks the master's controller for a job
(``ctxload_take``), gets it back (``ctxload_job``), streams it, and sends the finished record
back (``ctxload_finish``), which the master appends to the run's one ``requests.jsonl``.  So
workers on other machines need no shared filesystem, only the master's address:

    python -m loadgen.worker --master-host HOST --master-port PORT

A job that reaches a worker after the user that asked for it was stopped (the user count went
down between stages) is handed back (``ctxload_return``), so no request of a stage is lost.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import sys
import time

import gevent
import gevent.event

from servers.process import free_port


# ---- master side --------------------------------------------------------------------------------

def start_master(env, controller, processes: int, stack: contextlib.ExitStack, say, *,
                 bind_host: str = "127.0.0.1", port: int | None = None, spawn_local: bool = True,
                 wait_s: float = 120.0):
    """The master runner; with ``spawn_local`` it starts ``processes`` local workers.  Waits up
    to ``wait_s`` for them to connect (0: the caller waits, with ``wait_for_workers``)."""
    import locust.runners

    # A worker building a long prompt or loading a tokenizer may not beat for seconds.
    locust.runners.HEARTBEAT_LIVENESS = max(locust.runners.HEARTBEAT_LIVENESS, 60)
    port = port or free_port()
    runner = env.create_master_runner(master_bind_host=bind_host, master_bind_port=port)

    def on_take(environment, msg, **_):
        rid = msg.data["rid"]
        job = controller.take_for_remote(wait_s=0.5)
        runner.send_message("ctxload_job", {"rid": rid, "job": job}, client_id=msg.node_id)

    def on_finish(environment, msg, **_):
        controller.finish(msg.data["job"], msg.data["record"])

    def on_return(environment, msg, **_):
        controller.give_back(msg.data["job"])

    prepared: set = set()

    def on_prepared(environment, msg, **_):
        prepared.add((msg.node_id, msg.data["token"]))

    def prepare(jobs: list[dict]) -> None:
        """Have every worker build these prompts now, outside any measured window."""
        token = time.monotonic_ns()
        runner.send_message("ctxload_prepare", {"token": token, "jobs": jobs})
        ids = set(runner.clients.keys())
        deadline = time.monotonic() + 300
        while not all((i, token) in prepared for i in ids) and time.monotonic() < deadline:
            gevent.sleep(0.05)

    runner.ctxload_prepare = prepare
    runner.register_message("ctxload_prepared", on_prepared)
    runner.register_message("ctxload_take", on_take, concurrent=True)
    runner.register_message("ctxload_finish", on_finish)
    runner.register_message("ctxload_return", on_return)
    if spawn_local:
        procs = []
        for _ in range(processes):
            procs.append(subprocess.Popen([sys.executable, "-m", "loadgen.worker", "--master-host", bind_host,
                                           "--master-port", str(port), "--parent-pid", str(os.getpid())],
                                          stdin=subprocess.DEVNULL))
        stack.callback(_stop_all, procs)
    say(f"Locust master on {bind_host}:{port}, waiting for {processes} workers")
    if wait_s:
        wait_for_workers(runner, processes, wait_s)
    return runner


def wait_for_workers(runner, n: int, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while len(runner.clients.ready) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(runner.clients.ready)} of {n} Locust workers connected "
                               f"within {wait_s:g} s")
        gevent.sleep(0.1)


def _stop_all(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()


# ---- worker side --------------------------------------------------------------------------------

class WorkerSource:
    """What a worker's users call instead of a local Controller."""

    def __init__(self, runner):
        self.runner = runner
        self.pending: dict[str, gevent.event.AsyncResult] = {}
        self._ids = itertools.count()
        runner.register_message("ctxload_job", self._on_job)
        runner.register_message("ctxload_prepare", self._on_prepare)

    def _on_prepare(self, environment, msg, **_):
        from loadgen.controller import build_prompt

        for job in msg.data["jobs"]:
            build_prompt(job)
        self.runner.send_message("ctxload_prepared", {"token": msg.data["token"]})

    def _on_job(self, environment, msg, **_):
        waiter = self.pending.pop(msg.data["rid"], None)
        job = msg.data["job"]
        if waiter is not None:
            waiter.set(job)
        elif job is not None:  # its user is gone: hand the job back
            self.runner.send_message("ctxload_return", {"job": job})

    def take(self) -> dict | None:
        while True:
            rid = f"{self.runner.client_id}-{next(self._ids)}"
            waiter = gevent.event.AsyncResult()
            self.pending[rid] = waiter
            try:
                self.runner.send_message("ctxload_take", {"rid": rid})
                job = waiter.get()
            finally:
                self.pending.pop(rid, None)
            if job is not None:
                return job

    def prompt(self, job: dict) -> str:
        from loadgen.controller import build_prompt

        return build_prompt(job)

    def finish(self, job: dict, rec: dict) -> None:
        self.runner.send_message("ctxload_finish", {"job": job, "record": rec})
