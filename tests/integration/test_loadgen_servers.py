"""Real Locust against real model servers on loopback: a context sweep and a max-context search
on the shared vLLM CPU server (prompts sized through its /tokenize), and a sweep over a tiny
SSM that `ctxload run` serves itself with ssm-server."""

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

REPO = Path(__file__).resolve().parents[2]
MODEL_CACHE = Path(os.environ.get("CTXLOAD_TEST_MODELS", REPO / ".cache" / "test-models"))


def run_ctxload(tmp_path: Path, scen: dict, timeout=300) -> Path:
    path = tmp_path / "scenario.yaml"
    path.write_text(yaml.safe_dump(scen))
    p = subprocess.run([sys.executable, "-m", "ctxload", "run", str(path), "--runs-dir", str(tmp_path / "runs"),
                        "--run-id", "r"], capture_output=True, text=True, cwd=REPO, timeout=timeout,
                       env={**os.environ, "CTXLOAD_MODELS": str(MODEL_CACHE)})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return tmp_path / "runs" / "r"


def read(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines()]


def successes(url: str, prefix: str) -> int:
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    return int(sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines()
                   if l.startswith(prefix + ":request_success_total")))


def vllm_target(url: str) -> dict:
    # no tokenizer given: prompts are sized through the server's own /tokenize
    return {"name": "tiny-llama", "url": url, "model": "tiny-llama", "family": "transformer", "engine": "vllm"}


@pytest.mark.vllm
def test_context_sweep_on_vllm(vllm_tiny_llama, tmp_path):
    url = vllm_tiny_llama.url
    before = successes(url, "vllm")
    scen = {"name": "vllm-sweep", "targets": [vllm_target(url)], "output": {"max_tokens": 8},
            "load": {"kind": "context_sweep", "prompt_tokens": [64, 256, 1024], "users": 2, "requests": 4},
            "metrics": {"scrape_interval_s": 0.5}}
    run = run_ctxload(tmp_path, scen)
    recs = read(run / "requests.jsonl")
    assert len(recs) == 12 == successes(url, "vllm") - before
    assert all(r["status"] == "ok" for r in recs), [r["error_message"] for r in recs][:3]
    # exact prompt lengths, by the server's own count; output length by its usage
    assert all(r["prompt_tokens"] == r["prompt_tokens_requested"] for r in recs)
    assert all(r["completion_tokens"] == 8 and r["token_count_source"] == "usage" for r in recs)
    # vLLM may put several tokens in one event on a busy CPU: gaps are between events, so
    # 0..7 of them for 8 tokens, and they fit between the first token and the end
    assert all(r["ttft_s"] > 0 and r["tpot_s"] >= 0 and 0 <= len(r["itl_s"]) <= 7 for r in recs), \
        [(r["ttft_s"], r["tpot_s"], r["itl_s"], r["stamp_clock"]) for r in recs]
    assert all(sum(r["itl_s"]) <= r["e2e_s"] - r["ttft_s"] + 1e-6 for r in recs)
    assert any(len(r["itl_s"]) >= 2 for r in recs), [r["itl_s"] for r in recs]
    scrapes = read(run / "metrics.jsonl")
    names = {s["name"] for x in scrapes for s in x["samples"]}
    assert "vllm:time_to_first_token_seconds_bucket" in names
    assert {"prompt=64", "prompt=256", "prompt=1024"} & {x["stage"] for x in scrapes}
    env = json.loads((run / "env.json").read_text())
    assert env["targets"][0]["max_model_len"] == 2048


@pytest.mark.vllm
def test_max_context_discovery_on_vllm_finds_its_limit_within_1_percent(vllm_tiny_llama, tmp_path):
    max_tokens = 8
    scen = {"name": "vllm-max", "targets": [vllm_target(vllm_tiny_llama.url)],
            "output": {"max_tokens": max_tokens},
            "load": {"kind": "max_context", "min_tokens": 256, "max_tokens": 16384, "tolerance": 0.01}}
    run = run_ctxload(tmp_path, scen)
    (res,) = read(run / "max_context.jsonl")
    limit = 2048 - max_tokens  # the server's --max-model-len holds prompt and output
    assert res["converged"] and not res["crashed"]
    # the server declares its max_model_len: that less the output, then one token more
    assert (res["max_ok_tokens"], res["min_fail_tokens"]) == (limit, limit + 1)
    assert [p["prompt_tokens"] for p in res["probes"]] == [limit, limit + 1]
    assert res["failure_kind"] in ("rejected", "truncated") and res["server_max_model_len"] == 2048
    recs = read(run / "requests.jsonl")
    # past the limit: a 400, or (vLLM 0.32, a prompt that leaves less room than asked) an output
    # cut short, which is no success either
    assert {(r["http_status"], r["error_kind"]) for r in recs if r["status"] == "error"} <= {
        (400, "rejected"), (200, "truncated")}
    assert all(r["completion_tokens"] == max_tokens for r in recs if r["status"] == "ok")
    assert len(recs) == len(res["probes"]) == 2


def test_tiny_ssm_served_by_ctxload_run(tmp_path):
    if not (REPO / "servers" / "ssm_server" / "__main__.py").exists():
        pytest.skip("ssm-server is not in this checkout yet")
    scen = {"name": "ssm", "targets": [{"name": "tiny-mamba2", "serve": {"engine": "ssm-server", "preset": "tiny-mamba2"}}],
            "output": {"max_tokens": 4},
            "load": {"kind": "context_sweep", "prompt_tokens": [32, 128], "requests": 2},
            "metrics": {"scrape_interval_s": 0.5}}
    run = run_ctxload(tmp_path, scen)
    recs = read(run / "requests.jsonl")
    assert len(recs) == 4
    assert all(r["status"] == "ok" for r in recs), [r["error_message"] for r in recs][:2]
    assert all(r["family"] == "ssm" and r["engine"] == "ssm-server" for r in recs)
    assert all(r["prompt_tokens"] == r["prompt_tokens_requested"] for r in recs)
    env = json.loads((run / "env.json").read_text())
    t = env["targets"][0]
    assert t["preset"] == "tiny-mamba2" and "servers.ssm_server" in t["launch_args"]
    names = {s["name"] for x in read(run / "metrics.jsonl") for s in x["samples"]}
    assert "ssm:time_to_first_token_seconds_bucket" in names
    assert (run / "servers" / "tiny-mamba2.log").exists()


def test_a_dead_server_is_not_hammered(tmp_path, tiny_models):
    """A target whose server refuses connections: its stage stops after 5 refusals in a row
    (with a growing wait between), and the target gets no more stages — not thousands of
    requests a second."""
    from servers.process import free_port

    port = free_port()  # nothing listens there
    scen = {"name": "dead", "targets": [{"name": "gone", "url": f"http://127.0.0.1:{port}", "family": "ssm",
                                         "tokenizer": str(tiny_models["ssm"])}],
            "output": {"max_tokens": 4},
            "load": {"kind": "context_sweep", "prompt_tokens": [32, 64], "users": 4, "duration_s": 20}}
    t0 = time.monotonic()
    run = run_ctxload(tmp_path, scen)
    recs = read(run / "requests.jsonl")
    assert recs and all(r["error_kind"] == "connection" for r in recs)
    assert len(recs) <= 5 + 4  # the fifth refusal stops the stage; at most the other users' in flight
    assert {r["stage"] for r in recs} == {"prompt=32"}  # no further stage
    assert time.monotonic() - t0 < 20  # not the stage's 20 s of hammering
