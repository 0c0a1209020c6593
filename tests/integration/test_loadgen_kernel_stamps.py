"""Kernel receive stamps: a late gevent loop must not move an event's stamp.

A real synthetic server on loopback logs when it wrote each event (``--send-log``); a child
process (tests/integration/stream_client.py) streams through ``loadgen.user.stream_once`` with
Locust's FastHttpSession while another greenlet holds the whole gevent loop with a plain
``time.sleep`` at a set moment, so one event waits in the socket until the loop is free.  With
kernel stamps every client gap equals the server's gap between the same writes within 1 ms;
with ``CTXLOAD_KERNEL_STAMPS=0`` (user-space stamps) the held event is stamped late by the hold.

The hold is shorter than the gap between events on purpose: when two or more events wait in
the socket together, Linux merges their segments in the receive queue (tcp_try_coalesce keeps
the newest segment's arrival time for the merged one), so such events share the newest
arrival's stamp — docs/loadgen.md, "How a request is timed".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from servers.process import ManagedServer, free_port

REPO = Path(__file__).resolve().parents[2]
CLIENT = Path(__file__).resolve().parent / "stream_client.py"
TTFT_MS, ITL_MS, TOKENS = 30.0, 50.0, 8
# Events are written at 30, 80, 130, 180 … ms after the request; the loop is held from 110 to
# 150 ms, so the event of 130 ms waits ~20 ms in the socket, alone.
HOLD_AT_MS, HOLD_MS = 110.0, 40.0

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_TIMESTAMPNS is Linux's")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("ks")
    port, log = free_port(), d / "sends.jsonl"
    cmd = [sys.executable, "-m", "loadgen.synthetic_server", "--ttft-ms", str(TTFT_MS), "--itl-ms", str(ITL_MS),
           "--port", str(port), "--send-log", str(log)]
    with ManagedServer("syn-ks", cmd, port, log_path=d / "s.log", startup_timeout_s=60) as srv:
        yield srv, log


def stream(url: str, kernel: bool, hold: bool = True, requests: int = 3) -> list[dict]:
    env = {**os.environ, "CTXLOAD_KERNEL_STAMPS": "1" if kernel else "0"}
    args = [sys.executable, str(CLIENT), url, "--requests", str(requests), "--max-tokens", str(TOKENS)]
    if hold:
        args += ["--block-at-ms", str(HOLD_AT_MS), "--block-ms", str(HOLD_MS)]
    p = subprocess.run(args, capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    return [json.loads(l) for l in p.stdout.splitlines()]


def gap_errors_ms(recs: list[dict], log: Path) -> list[list[float]]:
    """Per request: client gap − server gap between the same two writes, in ms."""
    sends = {s["id"]: s["send_ns"] for s in map(json.loads, log.read_text().splitlines())}
    out = []
    for r in recs:
        assert r["status"] == "ok", r["error_message"]
        s = sends[r["response_id"]]
        server_gaps = [(b - a) / 1e6 for a, b in zip(s, s[1:])]
        assert len(server_gaps) == len(r["itl_s"]) == TOKENS - 1
        out.append([g * 1e3 - sg for g, sg in zip(r["itl_s"], server_gaps)])
    return out


def test_a_held_loop_does_not_move_kernel_stamps(server):
    srv, log = server
    recs = stream(srv.url, kernel=True)
    errs = gap_errors_ms(recs, log)
    print("kernel stamps, gap errors (ms):", [[round(e, 3) for e in r] for r in errs])
    assert all(r["stamp_clock"] == "kernel" for r in recs), [r["stamp_clock"] for r in recs]
    assert max(abs(e) for r in errs for e in r) <= 1.0, errs


def test_user_space_stamps_when_kernel_stamps_are_off(server):
    """The escape hatch, and the proof that the test above can fail: with
    ``CTXLOAD_KERNEL_STAMPS=0`` the same held loop stamps the waiting event late."""
    srv, log = server
    recs = stream(srv.url, kernel=False)
    errs = gap_errors_ms(recs, log)
    print("user-space stamps, gap errors (ms):", [[round(e, 3) for e in r] for r in errs])
    assert all(r["stamp_clock"] == "user" for r in recs)
    assert max(abs(e) for r in errs for e in r) > 5.0, errs
