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


def gap_errors_ms(recs: list[dict], log: Path, tokens: int = TOKENS) -> list[list[float]]:
    """Per request: how far each client gap lies outside the server's gap between the same two
    writes, in ms. Each write left between the server's stamp before it and its stamp after
    it (17 µs apart at the median), so the true gap lies in [before₂ − after₁, after₂ −
    before₁]; a server preempted between a stamp and its write (a busy 2-core box: once 9.7 ms)
    moves the bytes, and is not the client's error."""
    log_lines = {s["id"]: s for s in map(json.loads, log.read_text().splitlines())}
    out = []
    for r in recs:
        assert r["status"] == "ok", r["error_message"]
        s = log_lines[r["response_id"]]
        before, after = s["send_ns"], s["sent_ns"]
        assert len(before) == len(after) == len(r["itl_s"]) + 1 == tokens
        errs = []
        for i, g in enumerate(r["itl_s"]):
            lo, hi = (before[i + 1] - after[i]) / 1e6, (after[i + 1] - before[i]) / 1e6
            g_ms = g * 1e3
            errs.append(g_ms - hi if g_ms > hi else g_ms - lo if g_ms < lo else 0.0)
        out.append(errs)
    return out


def test_a_held_loop_does_not_move_kernel_stamps(server):
    srv, log = server
    recs = stream(srv.url, kernel=True)
    errs = gap_errors_ms(recs, log)
    print("kernel stamps, gap errors (ms):", [[round(e, 3) for e in r] for r in errs])
    assert all(r["stamp_clock"] == "kernel" for r in recs), [r["stamp_clock"] for r in recs]
    assert max(abs(e) for r in errs for e in r) <= 1.0, errs


def test_events_read_together_keep_monotonic_stamps(server):
    """A hold longer than two gaps: several events wait in the socket, their segments merged
    under one arrival time. Each event is still read on its own, so the reads share that stamp:
    gaps of exactly 0, never negative (one realtime→perf offset per stream, marks monotonic)."""
    srv, _ = server
    p = subprocess.run([sys.executable, str(CLIENT), srv.url, "--requests", "4", "--max-tokens", str(TOKENS),
                        "--block-at-ms", str(HOLD_AT_MS), "--block-ms", str(3 * ITL_MS)],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    recs = [json.loads(l) for l in p.stdout.splitlines()]
    gaps = [g for r in recs for g in r["itl_s"]]
    assert all(r["status"] == "ok" and len(r["itl_s"]) == TOKENS - 1 for r in recs), recs
    assert min(gaps) >= 0, [r["itl_s"] for r in recs]
    assert all(r["tpot_s"] >= 0 for r in recs)


def test_user_space_stamps_when_kernel_stamps_are_off(server):
    """The escape hatch, and the proof that the test above can fail: with
    ``CTXLOAD_KERNEL_STAMPS=0`` the same held loop stamps the waiting event late."""
    srv, log = server
    recs = stream(srv.url, kernel=False)
    errs = gap_errors_ms(recs, log)
    print("user-space stamps, gap errors (ms):", [[round(e, 3) for e in r] for r in errs])
    assert all(r["stamp_clock"] == "user" for r in recs)
    assert max(abs(e) for r in errs for e in r) > 5.0, errs


def test_a_closed_loop_stage_measures_every_gap_within_1ms(tiny_models, tmp_path):
    """``ctxload run``, one process, 60 streams closed loop: every stream starts and ends with
    the others, the moments when a client's own work (starting requests, building records, a
    full garbage collection) holds the reads.  The client's gap must equal the server's logged
    gap within 1 ms for at least 99% of gaps (the issue's p99 target, at a lower load than the
    benchmark's 200 streams so a shared CI box holds it)."""
    import yaml

    port, log = free_port(), tmp_path / "sends.jsonl"
    cmd = [sys.executable, "-m", "loadgen.synthetic_server", "--ttft-ms", "50", "--itl-ms", "20",
           "--port", str(port), "--send-log", str(log)]
    with ManagedServer("syn-60", cmd, port, log_path=tmp_path / "s.log", startup_timeout_s=60) as srv:
        scen = {"name": "ks", "targets": [{"name": "syn", "url": srv.url, "model": "synthetic",
                                           "engine": "synthetic", "family": "ssm",
                                           "tokenizer": str(tiny_models["transformer"])}],
                "output": {"max_tokens": 24}, "metrics": {"scrape_interval_s": 1},
                "load": {"kind": "concurrency_sweep", "prompt_tokens": 64, "users": [60], "requests": 180}}
        (tmp_path / "s.yaml").write_text(yaml.safe_dump(scen))
        p = subprocess.run([sys.executable, "-m", "ctxload", "run", str(tmp_path / "s.yaml"), "--runs-dir",
                            str(tmp_path / "runs"), "--run-id", "r"], capture_output=True, text=True, cwd=REPO,
                           timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
    recs = [json.loads(l) for l in (tmp_path / "runs" / "r" / "requests.jsonl").read_text().splitlines()]
    assert len(recs) == 180
    errs = [abs(e) for r in gap_errors_ms(recs, log, tokens=24) for e in r]
    assert len(errs) == 180 * 23
    errs.sort()
    p99 = errs[int(0.99 * len(errs))]
    clocks = {c: sum(r["stamp_clock"] == c for r in recs) for c in ("kernel", "mixed", "user")}
    print(f"60 streams: gap error p50 {errs[len(errs) // 2]:.3f} ms, p99 {p99:.3f} ms, max {errs[-1]:.1f} ms; "
          f"stamp_clock {clocks}")
    assert p99 <= 1.0, (p99, errs[-20:])
    assert clocks["user"] == 0
