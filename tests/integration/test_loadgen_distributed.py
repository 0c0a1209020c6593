"""What the compose stack needs from `ctxload run`, proven with real processes on loopback:
a master that waits for a worker started elsewhere (`python -m loadgen.worker`) on the address
and port it is told, the Locust web UI listing the TTFT request type live, and the client
exporter bound where ``CTXLOAD_EXPORTER_HOST`` says, answering in the classic text format.

127.0.0.2 (loopback, but not 127.0.0.1) stands in for a container's 0.0.0.0: a server that
ignored the bind address would not answer there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from servers.process import ManagedServer, free_port

REPO = Path(__file__).resolve().parents[2]
HOST = "127.0.0.2"


def get(url: str, accept: str | None = None):
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.headers.get("Content-Type", ""), r.read().decode()


def until(fn, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            v = fn()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - not up yet
            last = e
        time.sleep(0.2)
    raise AssertionError(f"{what} within {timeout_s} s (last error: {last})")


@pytest.fixture()
def synthetic(tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "loadgen.synthetic_server", "--ttft-ms", "20", "--itl-ms", "10", "--port", str(port)]
    with ManagedServer("synthetic", cmd, port, log_path=tmp_path / "server.log", startup_timeout_s=60) as srv:
        yield srv


def _write_scenario(path, name: str, synthetic, tiny_models, max_tokens: int, load: dict, **extra):
    """A scenario of one target, the synthetic server, written to ``path``."""
    scen = {"name": name, "targets": [{"name": "syn", "url": synthetic.url, "model": "synthetic",
                                       "engine": "synthetic", "family": "ssm",
                                       "tokenizer": str(tiny_models["transformer"])}],
            "output": {"max_tokens": max_tokens}, "load": load, **extra}
    path.write_text(yaml.safe_dump(scen))
    return path


def test_external_worker_web_ui_and_exporter_host(synthetic, tiny_models, tmp_path):
    _write_scenario(tmp_path / "s.yaml", "ext", synthetic, tiny_models, 10,
                    {"kind": "concurrency_sweep", "prompt_tokens": 32, "users": [2, 3], "duration_s": 4},
                    metrics={"scrape_interval_s": 1})
    master_port, web_port, exp_port = free_port(), free_port(), free_port()
    env = {**os.environ, "CTXLOAD_EXPORTER_HOST": HOST, "CTXLOAD_EXPORTER_PORT": str(exp_port)}
    master = subprocess.Popen([sys.executable, "-m", "ctxload", "run", str(tmp_path / "s.yaml"), "--runs-dir",
                               str(tmp_path / "runs"), "--run-id", "r", "--master-bind-host", HOST,
                               "--master-port", str(master_port), "--external-workers", "1",
                               "--web-ui", "--web-port", str(web_port)],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    worker = None
    try:
        # the master waits: no worker of its own, nothing sent yet
        until(lambda: get(f"http://{HOST}:{web_port}/stats/requests"), 60, "the web UI answers")
        assert not (tmp_path / "runs" / "r" / "requests.jsonl").read_text()
        worker = subprocess.Popen([sys.executable, "-m", "loadgen.worker", "--master-host", HOST,
                                   "--master-port", str(master_port)], cwd=REPO,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def ttft_row():
            stats = json.loads(get(f"http://{HOST}:{web_port}/stats/requests")[1])["stats"]
            return [s for s in stats if s["method"] == "TTFT" and s["num_requests"] > 0]

        rows = until(ttft_row, 60, "the web UI lists the TTFT request type")
        assert rows[0]["name"].startswith("syn users=")
        ctype, text = get(f"http://{HOST}:{exp_port}/metrics",
                          accept="application/openmetrics-text; version=1.0.0,text/plain;version=0.0.4;q=0.5")
        assert "version=0.0.4" in ctype
        assert 'ctxload:client_time_to_first_token_seconds_bucket{' in text
        assert "ctxload_client" not in text
        with pytest.raises(OSError):  # bound where it was told, not on every address
            get(f"http://127.0.0.1:{exp_port}/metrics")
        out, _ = master.communicate(timeout=120)
        assert master.returncode == 0, out[-3000:]
    finally:
        for p in (master, worker):
            if p is not None and p.poll() is None:
                p.terminate()
                p.wait(10)
    recs = [json.loads(l) for l in (tmp_path / "runs" / "r" / "requests.jsonl").read_text().splitlines()]
    assert recs and all(r["status"] == "ok" for r in recs)
    assert {r["stage"] for r in recs} == {"users=2", "users=3"}
    assert len({r["worker"] for r in recs}) == 1 and recs[0]["worker"].endswith(f":{worker.pid}")


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read().rsplit(")", 1)[-1].split()
            except OSError:
                continue
            if int(stat[1]) == pid and stat[0] != "Z":
                out.append(int(d))
    return out


def test_killing_the_master_stops_its_local_workers(synthetic, tiny_models, tmp_path):
    """kill -9 of `ctxload run --processes 2`: its two Locust workers exit within seconds."""
    import signal

    path = _write_scenario(tmp_path / "s.yaml", "orphans", synthetic, tiny_models, 50,
                           {"kind": "context_sweep", "prompt_tokens": [64], "users": 4, "duration_s": 60})
    master = subprocess.Popen([sys.executable, "-m", "ctxload", "run", str(path), "--runs-dir", str(tmp_path),
                               "--run-id", "r", "--processes", "2"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, cwd=REPO)
    try:
        records = tmp_path / "r" / "requests.jsonl"
        until(lambda: records.exists() and records.stat().st_size > 0, 120, "records from the workers")
        workers = [p for p in _children(master.pid)
                   if b"loadgen.worker" in open(f"/proc/{p}/cmdline", "rb").read()]
        assert len(workers) == 2
    finally:
        master.send_signal(signal.SIGKILL)
        master.wait(10)
    until(lambda: not any(os.path.exists(f"/proc/{p}") and "Z" not in open(f"/proc/{p}/stat").read().rsplit(")", 1)[-1].split()[0]
                          for p in workers), 10, "the workers exited")
