"""A Locust worker process for distributed runs: ``python -m loadgen.worker --master-port P``."""

from __future__ import annotations

from locust.env import Environment  # first: Locust's gevent monkey-patching

import argparse
import gc
import os
import sys

import gevent

from loadgen.distributed import WorkerSource
from loadgen.user import SPARE, StreamingUser


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--master-host", default="127.0.0.1")
    ap.add_argument("--master-port", type=int, required=True)
    ap.add_argument("--parent-pid", type=int, default=None,
                    help="exit when this process (a master that started us) is gone, even killed")
    a = ap.parse_args(argv)
    if a.parent_pid:
        gevent.spawn(_exit_with_parent, a.parent_pid)
    import transformers  # noqa: F401 - imported now, not while the first stage streams
    env = Environment(user_classes=[StreamingUser])
    runner = env.create_worker_runner(a.master_host, a.master_port)
    env.ctxload = WorkerSource(runner)
    # a stop from the master: the records still queued go out before the worker reports stopped
    env.events.test_stop.add_listener(lambda **_: SPARE.drain())
    gc.collect()
    gc.freeze()
    runner.greenlet.join()
    return 0


def _exit_with_parent(pid: int) -> None:
    """A master killed outright cannot stop its workers: they notice it gone within half a
    second and exit (its records cannot be written anywhere now)."""
    while os.getppid() == pid:
        gevent.sleep(0.5)
    os._exit(1)


if __name__ == "__main__":
    sys.exit(main())
