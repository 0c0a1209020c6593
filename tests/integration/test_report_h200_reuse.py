"""Prefix reuse served on an H200 (tests/fixtures/runs/h200-reuse, scenarios/paper-h200-reuse.yaml,
2026-12-02): 64K documents shared by 16 questions, then 8 conversations of 4 turns, on
Qwen2.5-0.5B and Falcon-H1-0.5B (vLLM 0.26, prefix caching), Mamba2-780m on vLLM (`align` Mamba
cache mode) and on ssm-server (no prefix cache). Its report must read each server's cache hits
from its usage and from vLLM's own counters, keep the reuse stages out of the one-shot figures
and claims, and give a conversation's whole prompt as its length."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from analysis import claims
from analysis.analyze import analyze
from analysis.records import load_run
from analysis.report import write_report

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "runs" / "h200-reuse"
QWEN, FALCON, M2V, M2S = "qwen2.5-0.5b-vllm", "falcon-h1-0.5b-vllm", "mamba2-780m-vllm", "mamba2-780m-ssm"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    run = shutil.copytree(FIXTURE, tmp_path_factory.mktemp("reuse") / "h200-reuse")
    write_report(run)
    return analyze(load_run(run)), (run / "report" / "report.md").read_text()


def test_the_shared_documents_hits_from_usage_and_from_vllms_counters(report):
    a, md = report
    doc = {r.target: r for r in a.reuse if r.stage == "prompt=65536"}
    assert set(doc) == {QWEN, FALCON, M2V, M2S}
    for t in (QWEN, FALCON):
        r = doc[t]
        # 16 questions a document, the first of each group uncached: 15/16 of the shared part
        # at most, less the part past the last full block
        assert r.requests == 32 and 0.92 < r.shared_hit_rate <= 15 / 16
        assert r.metrics_hit_rate == pytest.approx(r.hit_rate, abs=0.01)  # vLLM's own count agrees
        assert r.speedup > 2
    # Mamba2 on vLLM: `align` caches its state at 8K-token boundaries: 57,344 of the 65,280 shared
    m2 = doc[M2V]
    assert m2.uncached_p50 == 8192 and m2.shared_hit_rate == pytest.approx(15 / 16 * 57344 / 65280, abs=1e-3)
    assert m2.speedup > 2.5
    # ssm-server keeps no prefix cache: it recomputes every prompt, and says so
    assert doc[M2S].cached_tokens == 0 and doc[M2S].metrics_hit_rate is None and doc[M2S].speedup is None
    assert "(vLLM prefix caching on, Mamba cache mode align)" in md and "(ssm-server keeps no prefix cache)" in md


def test_conversations_turn_by_turn(report):
    a, _ = report
    by = {(r.target, r.turn): r for r in a.turns}
    for t in (QWEN, FALCON, M2V, M2S):
        prompts = [by[t, k].prompt_p50 for k in range(4)]
        assert by[t, 0].requests == 8 and prompts == sorted(prompts) and prompts[0] > 16384
        assert by[t, 0].cached_p50 == 0
    for t in (QWEN, M2V):  # the last turn's prompt comes from the cache, to its last 16-token block
        assert all(0 <= by[t, k - 1].prompt_p50 - by[t, k].cached_p50 < 16 for k in (1, 2, 3))
    assert all(by[FALCON, k].cached_p50 >= 16000 for k in (1, 2, 3))  # 800-token blocks
    assert all(by[M2S, k].cached_p50 == 0 for k in range(4))


def test_reuse_stages_stay_out_of_the_one_shot_figures(report):
    a, md = report
    # a conversation stage's length is its whole prompt (history + message), not the message
    conv = {s.target: s.prompt_tokens for s in a.stages if s.stage == "conversation"}
    assert all(16400 < n < 17300 for n in conv.values()), conv
    # every prompt shared something: no length curve, no one-shot claim, no energy verdict
    assert "TTFT vs prompt length: no data in this run" in md
    energy = [c for c in a.claims if c.claim == "SSMs spend less energy per long prefill"]
    assert energy and all(c.verdict == claims.UNMEASURED and "reuse stages left out" in c.why for c in energy)
    assert not [c for c in a.claims if c.verdict in (claims.HOLDS, claims.DIFFERS)]
