"""A child process for tests: streams requests through ``loadgen.user.stream_once`` with Locust's
FastHttpSession (gevent-patched, as in a load run) while another greenlet holds the gevent loop
with a plain, non-cooperative ``time.sleep`` at a set moment of each stream, so the events that
arrive meanwhile wait in the socket and are read together.  Prints the records as JSON lines.

    python tests/integration/stream_client.py URL --requests 3 --block-at-ms 100 --block-ms 60
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gevent import monkey

monkey.patch_all()

import gevent  # noqa: E402
from locust.contrib.fasthttp import FastHttpSession  # noqa: E402
from locust.env import Environment  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from loadgen import user  # noqa: E402

real_sleep = monkey.get_original("time", "sleep")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--requests", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--block-at-ms", type=float, default=None, help="after sending, hold the loop at this moment")
    ap.add_argument("--block-ms", type=float, default=60.0)
    a = ap.parse_args()
    env = Environment()
    session = FastHttpSession(a.url, env.events.request, None, insecure=True, max_retries=0,
                              network_timeout=60.0, connection_timeout=10.0, concurrency=2)
    for i in range(a.requests):
        job = {"request_id": f"r{i}", "target": "syn", "model": "synthetic", "family": "ssm",
               "engine": "synthetic", "stage": "s", "stage_index": 0, "api": "completions",
               "prompt_tokens": 4, "max_tokens": a.max_tokens, "url": a.url, "timeout_s": 60}
        blocker = None
        if a.block_at_ms is not None:
            def hold():
                gevent.sleep(a.block_at_ms / 1000)
                real_sleep(a.block_ms / 1000)  # holds the whole gevent loop
            blocker = gevent.spawn(hold)
        rec = user.stream_once(session, job, "a b c d", 60)
        if blocker is not None:
            blocker.join()
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
