"""`ctxload demo` as a user runs it: the whole pipeline on tiny CPU models."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from servers.presets import TINY_BY_FAMILY

SMALL = ["--prompt-tokens", "32,64", "--requests", "2", "--max-tokens", "4"]


def _ports(run_dir: Path) -> list[int]:
    """Ports of the servers started so far (targets run one at a time: later ones have none yet)."""
    env = json.loads((run_dir / "env.json").read_text())
    return [int(t["url"].rsplit(":", 1)[1]) for t in env["targets"] if t["url"]]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _demo(tmp_path: Path, *extra: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ctxload", "demo", "--runs-dir", str(tmp_path),
                             "--run-id", "demo", *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


@pytest.mark.slow
def test_demo_small_sweep_end_to_end(tmp_path):
    t0 = time.monotonic()
    proc = _demo(tmp_path, *SMALL)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    run = tmp_path / "demo"
    for name in ("scenario.yaml", "env.json", "requests.jsonl", "metrics.jsonl", "report/report.html"):
        assert (run / name).exists(), name
    assert str(run / "report" / "report.html") in out  # it says where the report is
    assert "stage" in out  # progress was shown

    records = [json.loads(line) for line in (run / "requests.jsonl").read_text().splitlines()]
    measured = [r for r in records if r["stage"] != "warmup"]
    by_family = {f: [r for r in measured if r["family"] == f] for f in TINY_BY_FAMILY}
    for family, recs in by_family.items():
        assert len(recs) == 2 * 2, (family, len(recs))  # 2 lengths × 2 requests
        assert all(r["status"] == "ok" for r in recs), [r["error_message"] for r in recs]
        assert all(r["ttft_s"] > 0 and r["completion_tokens"] == 4 for r in recs)
        assert sorted({r["prompt_tokens_requested"] for r in recs}) == [32, 64]
        # the server's own count of prompt tokens agrees with what was asked
        assert all(r["prompt_tokens"] == r["prompt_tokens_requested"] for r in recs)
    scrapes = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {s["target"] for s in scrapes if s["ok"]} >= {r["target"] for r in measured}

    html = (run / "report" / "report.html").read_text()
    for family_target in {r["target"] for r in measured}:
        assert family_target in html
    assert "data:image/png;base64," in html  # plots embedded

    for port in _ports(run):  # every server it started is gone
        assert not _listening(port), port
    print(f"demo (small sweep) took {time.monotonic() - t0:.0f} s")


@pytest.mark.slow
def test_demo_ctrl_c_stops_servers_and_keeps_records(tmp_path):
    proc = _demo(tmp_path, "--prompt-tokens", "32,64,128,256,512", "--requests", "50",
                 "--max-tokens", "4")
    lines = []
    deadline = time.monotonic() + 300
    # wait until requests are flowing, then press Ctrl-C
    records = tmp_path / "demo" / "requests.jsonl"
    while time.monotonic() < deadline:
        if records.exists() and len(records.read_text().splitlines()) >= 5:
            break
        if proc.poll() is not None:
            pytest.fail("demo ended before it was interrupted:\n" + proc.stdout.read())
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("no requests recorded in time")
    ports = _ports(tmp_path / "demo")
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    lines = out.splitlines()
    assert proc.returncode != 0
    assert "Traceback" not in out, out
    kept = [json.loads(line) for line in records.read_text().splitlines()]
    assert len(kept) >= 5 and all(r["schema_version"] == 1 for r in kept)
    time.sleep(1)
    for port in ports:
        assert not _listening(port), (port, lines[-10:])
    assert os.path.exists(tmp_path / "demo" / "env.json")
