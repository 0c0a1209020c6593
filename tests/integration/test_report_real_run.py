"""The report on run directories made by real runs: loadgen's runner against real servers.

Two OpenAI-compatible streaming servers on loopback (loadgen's synthetic server: real HTTP and
SSE, set TTFT/ITL) stand for two families; one has a small ``max_model_len`` so the sweep meets
its context limit. The figures in the report must agree with the records the runner wrote,
and with the servers' settings.
"""

from __future__ import annotations

import json
import sys

import pytest

from analysis.analyze import analyze
from analysis.records import load_run
from analysis.report import write_report
from conftest import run_scenario
from servers.process import ManagedServer, free_port

TTFT_MS = {"fast-attn": 30.0, "slow-ssm": 90.0}
ITL_MS = 15.0
LIMIT = 300  # fast-attn rejects prompts + max_tokens beyond this


def _server(name: str, tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "loadgen.synthetic_server", "--port", str(port),
           "--ttft-ms", str(TTFT_MS[name]), "--itl-ms", str(ITL_MS), "--served-model-name", name]
    if name == "fast-attn":
        cmd += ["--max-model-len", str(LIMIT)]
    return ManagedServer(name, cmd, port, log_path=tmp_path / f"{name}.log", startup_timeout_s=60)


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("real")
    with _server("fast-attn", tmp) as a, _server("slow-ssm", tmp) as b:
        scenario = {
            "name": "report-integration",
            "targets": [
                {"name": "fast-attn", "url": a.url, "family": "transformer", "engine": "synthetic"},
                {"name": "slow-ssm", "url": b.url, "family": "ssm", "engine": "synthetic"},
            ],
            "output": {"max_tokens": 6, "ignore_eos": True},
            "load": {"kind": "context_sweep", "prompt_tokens": [64, 128, 256, 512], "requests": 2},
            "slos": {"ttft_s": 0.06},
            "metrics": {"scrape_interval_s": 0.5},
            "request_timeout_s": 30,
        }
        run_dir = run_scenario(scenario, tmp / "runs", "real")
    return run_dir


def test_report_on_a_real_run(real_run):
    html = write_report(real_run).read_text()
    records = [json.loads(x) for x in (real_run / "requests.jsonl").read_text().splitlines()]
    assert records, "the runner wrote no request"
    a = analyze(load_run(real_run))
    assert not a.run.problems
    # every recorded request lands in exactly one target × stage
    counted = sum(s.requests for s in a.stages) + len(a.run.warmup)
    assert counted == len(records)
    by = {(s.target, s.stage): s for s in a.stages}
    # TTFT medians near the servers' settings (client overhead on a shared CPU: generous bound)
    for name, ttft_ms in TTFT_MS.items():
        s = by[(name, "prompt=64")]
        assert s.ok == s.requests == 2
        assert ttft_ms / 1e3 <= s.latency["ttft"].p50 < ttft_ms / 1e3 + 0.25
        assert ITL_MS / 1e3 * 0.8 <= s.latency["itl"].p50 < ITL_MS / 1e3 + 0.1
    # the context limit of fast-attn, and its cause
    lim = {c.target: c for c in a.limits}
    assert lim["fast-attn"].reached and lim["fast-attn"].max_ok == 256
    assert lim["fast-attn"].first_failed == 512 and lim["fast-attn"].cause == "rejected"
    assert not lim["slow-ssm"].reached and lim["slow-ssm"].max_ok == 512
    # goodput against the scenario's SLO: fast-attn meets 60 ms, slow-ssm never does
    assert by[("slow-ssm", "prompt=64")].goodput == 0
    assert by[("fast-attn", "prompt=64")].good_fraction > 0
    assert "fast-attn context limit: served 256, failed from 512 (rejected" in html
    assert a.run.scrapes, "the runner scraped no metrics"
