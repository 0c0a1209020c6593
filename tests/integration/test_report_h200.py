"""The paper's run on an H200 (tests/fixtures/runs/h200-paper, scenarios/paper-h200.yaml):
its report must hold up — the Transformer and hybrid rows from vLLM, each target's memory from
that target, each verdict recomputable from requests.jsonl."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from analysis import claims, memory
from analysis.analyze import analyze
from analysis.records import load_run
from analysis.report import write_report
from tests.unit.test_analysis_claims import SPEED, raw_medians, seconds

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "runs" / "h200-paper"
PAIR = {"transformer": "qwen2.5-0.5b-vllm", "ssm": "mamba2-780m-ssm", "hybrid": "falcon-h1-0.5b-vllm"}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    run = shutil.copytree(FIXTURE, tmp_path_factory.mktemp("h200") / "h200-paper")
    write_report(run)
    return run, analyze(load_run(run)), (run / "report" / "report.md").read_text()


def test_every_family_on_its_serving_engine(report):
    _, a, md = report
    for t in a.run.targets():
        e = a.engines[t]
        if a.run.family_of(t) in ("transformer", "hybrid"):
            assert e.label == "vLLM", (t, e)
    assert a.engines["mamba2-780m-ssm"].label == "ssm-server (native)"
    top = md[:md.index("## Verdict")]
    notes = [line for line in top.splitlines() if "Eager research path" in line]
    assert all("vllm" not in n for n in notes)
    (note,) = notes  # Mamba v1 on ssm-server: the transformers path only
    assert "mamba-790m-ssm" in note
    assert "e+0" not in md and "e-0" not in md


def test_speed_claims_recomputed_from_requests_jsonl(report):
    run, a, md = report
    med = raw_medians(run)
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    for title, (metric, fast, slow, which) in SPEED.items():
        x, y = PAIR[fast], PAIR[slow]
        common = sorted({n for (t, m, n) in med if t == x and m == metric}
                        & {n for (t, m, n) in med if t == y and m == metric})
        n = [v for v in common if v <= 8192][0] if which.startswith("shortest") else \
            [v for v in common if v >= 16384][-1]
        verdict = claims.HOLDS if med[(x, metric, n)][0] < med[(y, metric, n)][0] else claims.DIFFERS
        (row,) = [r for r in rows if r.startswith(f"| {title} |") and f"{x} ·" in r and f"{y} ·" in r]
        assert f"| {verdict} |" in row, (title, row)
        for t in (x, y):
            k = f"{n // 1024}K"
            m = re.search(re.escape(t) + r" · [^:]+: (TTFT|TPOT) p50 at " + k + r" = ([\d,.]+ m?s) "
                          r"\(median of (\d+) ok requests?\)", row)
            assert m and int(m.group(3)) == med[(t, metric, n)][1], (title, t, row)
            assert seconds(m.group(2)) == pytest.approx(med[(t, metric, n)][0], rel=5e-3)


def test_each_targets_memory_is_its_own(report):
    run, a, _ = report
    curves = {c.target: c for c in a.memory}
    for t in ("qwen2.5-0.5b-vllm", "falcon-h1-0.5b-vllm", "llama-3.2-1b-vllm"):
        assert curves[t].source == "vllm" and curves[t].budget_bytes == 24 * 2**30
    assert curves["mamba2-780m-ssm"].source == "server"
    # vLLM's own gauge, caught during the 1M-token probe, agrees with weights + tokens × KV
    # bytes per token: 1,048,544 + 32 tokens × 12,288 B + 0.99 GB of weights
    caught = [memory._vllm_bytes(a.run, "qwen2.5-0.5b-vllm", s) for s in a.run.scrapes
              if s.target == "qwen2.5-0.5b-vllm" and s.stage == "probe=1048544"]
    peak = dict(zip(curves["qwen2.5-0.5b-vllm"].lengths, curves["qwen2.5-0.5b-vllm"].peak_bytes))[1048544]
    assert max(v for v in caught if v) == pytest.approx(peak, rel=0.002)
    # the SSM's state does not grow: flat from 64K to 2M
    m = dict(zip(curves["mamba2-780m-ssm"].lengths, curves["mamba2-780m-ssm"].peak_bytes))
    assert m[65536] == m[2097152]
    # and nothing a device-wide or per-process reading said of another target is in there:
    # qwen's vLLM held its whole 24 GiB share (per-process), which is not what it needed
    held = [r.bytes for r in memory.readings(a.run) if r.target == "qwen2.5-0.5b-vllm" and r.source == "gpu process"]
    assert min(held) > 20e9 > max(curves["qwen2.5-0.5b-vllm"].peak_bytes)


def test_context_limits_and_their_causes(report):
    _, a, md = report
    lim = {c.target: c for c in a.limits}
    assert (lim["qwen2.5-0.5b-vllm"].max_ok, lim["qwen2.5-0.5b-vllm"].first_failed) == (1048544, 1048545)
    assert "position limit (its KV cache would hold 1,946,848 tokens)" in lim["qwen2.5-0.5b-vllm"].why
    assert not lim["mamba2-780m-ssm"].reached and lim["mamba2-780m-ssm"].max_ok == 2097152
    mc = [json.loads(x) for x in (FIXTURE / "max_context.jsonl").read_text().splitlines()]
    assert {r["target"]: r["max_ok_tokens"] for r in mc}["falcon-h1-0.5b-vllm"] == lim["falcon-h1-0.5b-vllm"].max_ok


def test_a_stall_at_the_kv_edge_and_an_ssms_launch_limit_are_named(report):
    _, a, md = report
    lim = {c.target: c for c in a.limits}
    llama = lim["llama-3.2-1b-vllm"]  # 678,096 accepted, prefilled, preempted, never finished
    assert (llama.max_ok, llama.first_failed, llama.cause) == (672_806, 678_096, "timeout")
    assert "edge of the server's max_model_len 678,128" in llama.why
    ssm = lim["mamba2-780m-vllm"]
    assert (ssm.max_ok, ssm.first_failed) == (1_049_568, 1_049_569)
    assert "set at launch" in ssm.why and "KV cache" not in ssm.why
    # Zamba2 stalled the same way one probe in (a sweep stage at 256K was rejected beyond it,
    # twice: the probe's timeout, not the commoner rejection, is what ended it)
    zamba = lim["zamba2-1.2b-vllm"]
    assert (zamba.max_ok, zamba.first_failed, zamba.cause) == (219_818, 222_016, "timeout")
    assert "edge of the server's max_model_len 222,048" in zamba.why
    line = next(x for x in md.splitlines() if x.startswith("- zamba2-1.2b-vllm context limit"))
    assert "(timeout: accepted and not finished" in line, line


def test_the_docs_tables_are_this_runs():
    """docs/deploy.md's TTFT, TPOT and memory tables are what benchmarks/gpu/paper_tables.py
    prints for this fixture, all 8 targets of scenarios/paper-h200.yaml in them."""
    from benchmarks.gpu.paper_tables import tables

    printed = tables(FIXTURE)
    docs = (Path(__file__).resolve().parents[2] / "docs" / "deploy.md").read_text()
    blocks = [b for b in printed.split("\n\n") if b.startswith("| prompt tokens")]
    assert len(blocks) == 3
    for block in blocks:
        assert block in docs, block.splitlines()[0]
    header = blocks[0].splitlines()[0]
    assert header.count("|") - 2 == 8 and "zamba2-1.2b-vllm" in header and "mamba-790m-ssm" in header
