"""The report, claims and compare on synthetic run directories (laws known in advance)."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from analysis import claims, synthetic
from analysis.analyze import analyze
from analysis.compare import relative, write_compare
from analysis.plots import FAMILY_COLOURS, PLOTS
from analysis.records import load_run
from analysis.report import write_report


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return synthetic.write(tmp_path_factory.mktemp("runs") / "syn")


def test_report_outputs(run_dir):
    html = write_report(run_dir).read_text()
    out = run_dir / "report"
    for stem, _c, _b in PLOTS:
        png = (out / f"{stem}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64,', html)) == len(PLOTS)
    assert not re.search(r'(src|href)="(https?:)?//', html)  # nothing fetched over the network
    run = load_run(run_dir)
    stages = {(r.target, r.stage) for r in run.requests}
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert len(rows) == len(stages)
    table = pq.read_table(out / "summary.parquet")
    assert table.num_rows == len(stages) and "ttft_p99_s" in table.column_names
    md = (out / "report.md").read_text()
    assert md.index("## Verdict") < md.index("## Figures")
    for fam, colour in FAMILY_COLOURS.items():
        if fam != "unknown":
            assert colour in html


def test_synthetic_laws_come_back(run_dir):
    a = analyze(load_run(run_dir))
    laws = {law.preset: law for law in synthetic.DEFAULT_LAWS}
    for (target, metric), fit in a.fits.items():
        if metric == "ttft":
            assert fit.r2 > 0.99
            assert fit.coef[1] == pytest.approx(laws[target].ttft[1], rel=0.3)
    mem = {m.target: m for m in a.memory}
    assert mem["tiny-mamba2"].fit.coef[1] == pytest.approx(0, abs=1e-3)
    # the transformer's KV law, 12288 B/token, within noise of the concurrency-free sweep
    assert mem["tiny-llama"].fit.coef[1] == pytest.approx(12288, rel=0.05)
    limits = {c.target: c for c in a.limits}
    assert limits["tiny-llama"].cause == "oom" and limits["tiny-llama"].max_ok == 32768
    pair = next(p for p in a.ttft_pairs if {p.a, p.b} == {"tiny-llama", "tiny-mamba2"})
    # where a + b·n + c·n² laws meet: 0.004 + 2e-6 n + 4e-10 n² = 0.010 + 4e-6 n → n ≈ 7,550
    assert 5000 < pair.crossover_fit < 9000 and 5000 < pair.crossover_data < 9000
    verdicts = {c.claim: c.verdict for c in a.claims}
    assert verdicts["Transformers are faster at short prompts"] == claims.HOLDS
    assert verdicts["SSMs are faster at long prompts (TTFT)"] == claims.HOLDS
    assert verdicts["SSMs reach longer contexts than Transformers on a 24 GB budget"] == claims.HOLDS


def test_claims_could_not_be_measured_on_short_cpu_runs(tmp_path):
    spec = synthetic.SyntheticRun(lengths=(64, 128, 256), gpu=False, concurrency_levels=(1,))
    a = analyze(load_run(synthetic.write(tmp_path / "cpu", spec)))
    v = {c.claim: c for c in a.claims}
    long_ = v["SSMs are faster at long prompts (TTFT)"]
    assert long_.verdict == claims.UNMEASURED and "64–256" in long_.why
    assert v["SSMs spend less energy per long prefill"].verdict == claims.UNMEASURED
    assert v["Transformers are faster at short prompts"].verdict in (claims.HOLDS, claims.DIFFERS)


def test_claims_without_an_ssm(tmp_path):
    spec = synthetic.SyntheticRun(laws=synthetic.DEFAULT_LAWS[:1], lengths=(64, 128, 256))
    a = analyze(load_run(synthetic.write(tmp_path / "one", spec)))
    assert len(a.claims) == len(claims.TITLES)
    pairs = [c for c in a.claims if c.claim != claims.OPERATOR_CLAIM]
    assert all(c.verdict == claims.UNMEASURED and "this run has transformer" in c.why for c in pairs)
    (op,) = [c for c in a.claims if c.claim == claims.OPERATOR_CLAIM]
    assert op.verdict == claims.UNMEASURED and op.why == "no SSM target was profiled"


def test_relative_difference():
    assert relative(2.0, 3.0) == pytest.approx(0.5)
    assert relative(0.0, 3.0) is None and relative(None, 1.0) is None


def test_compare(tmp_path, run_dir):
    other = synthetic.write(tmp_path / "slower", synthetic.SyntheticRun(seed=3))
    html = write_compare([run_dir, other], tmp_path / "cmp").read_text()
    assert "Relative differences against syn" in html
    rows = list(csv.reader(open(tmp_path / "cmp" / "compare.csv")))
    assert len(rows) > 10 and rows[0][:3] == ["run", "target", "stage"]
    assert len(re.findall(r"<img ", html)) == 2 * len(PLOTS)


def test_memory_reach_measured_then_fitted_then_flat():
    from analysis.memory import MemoryCurve
    from analysis.scaling import fit_poly

    def mc(ns, bs):
        return MemoryCurve("t", "transformer", "server", ns, bs, min(bs), fit_poly(ns, bs, 1))

    assert claims.memory_reach(mc([1024, 2048], [10e9, 30e9]))[0] == 2048  # measured above 24 GB
    n, text = claims.memory_reach(mc([1024, 2048], [2e9, 4e9]))  # 2e9/1024 B per token
    assert n == pytest.approx((24e9 - 0.0) / (2e9 / 1024)) and "(fit)" in text
    assert claims.memory_reach(mc([1024, 2048], [3e9, 3e9]))[0] == float("inf")
