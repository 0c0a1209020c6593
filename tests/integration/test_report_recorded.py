"""The report on a recorded real GPU run (tests/fixtures/runs/h100-context-sweep, see its
README): the memory, energy and claims figures that a CPU run cannot exercise."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from analysis import claims
from analysis.analyze import analyze
from analysis.records import load_run
from analysis.report import write_report

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "runs" / "h100-context-sweep"


@pytest.fixture(scope="module")
def analysis():
    return analyze(load_run(FIXTURE))


def test_every_record_is_read(analysis):
    lines = (FIXTURE / "requests.jsonl").read_text().splitlines()
    assert not analysis.run.problems and not analysis.run.missing
    assert len(analysis.run.requests) + len(analysis.run.warmup) == len(lines)
    assert len(analysis.stages) == 3 * 6  # three targets × 1K…32K


def test_gpu_figures_are_measured(analysis):
    assert analysis.verdict[0].startswith("Hardware: 1× NVIDIA H100 80GB HBM3")
    mem = {m.target: m for m in analysis.memory}
    assert set(mem) == {"qwen2.5-0.5b", "mamba2-780m", "falcon-h1-0.5b"}
    for m in mem.values():
        assert m.source == "server" and m.lengths == [1024 * 2**i for i in range(6)]
        assert m.baseline_bytes <= min(m.peak_bytes)
    sizes = {s.target: s for s in analysis.sizes}
    assert sizes["qwen2.5-0.5b"].kv_bytes_per_token == 12288
    assert sizes["mamba2-780m"].state_bytes_per_sequence > 0
    energy = {(e.target, e.prompt_tokens): e for e in analysis.energy}
    assert len(energy) == 18 and all(e.per_request_j > 0 for e in energy.values())
    # energy per request grows with the prompt for each target (longer prefill, same output)
    for t in mem:
        assert energy[(t, 32768)].per_request_j > energy[(t, 1024)].per_request_j
    from analysis.scaling import curve, fit_poly

    for t in mem:  # least squares: the quadratic fits at least as well as a line (nested models)
        fit = analysis.fits[(t, "ttft")]
        line = fit_poly(*curve(analysis.run, t, "ttft"), 1)
        assert 0 <= line.r2 <= fit.r2 + 1e-12 <= 1 + 1e-12


def test_claims_wait_for_the_engine_of_mamba2(analysis):
    # the run predates ssm:engine_info and ran --backend auto: whether mamba2-780m was served by
    # the native backend or by transformers is unknown, so nothing is decided against it
    assert all(c.verdict == claims.UNMEASURED for c in analysis.claims)
    assert any("engine backend of mamba2-780m is unknown" in c.why for c in analysis.claims)
    # every claim still shows the figures it would have used; the operator claim has none:
    # the run had no profile pass
    assert all(c.figures for c in analysis.claims if c.claim != claims.OPERATOR_CLAIM)
    (op,) = [c for c in analysis.claims if c.claim == claims.OPERATOR_CLAIM]
    assert "no profile pass" in op.why


def test_report_files(tmp_path):
    run = tmp_path / "h100"
    shutil.copytree(FIXTURE, run)
    html = write_report(run).read_text()
    assert html.count('<figure data-plot="') == 5
    assert "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION" in html
    env = json.loads((run / "env.json").read_text())
    assert env["gpus"][0]["name"] in html
