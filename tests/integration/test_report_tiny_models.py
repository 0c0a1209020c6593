"""The report on a real run of the tiny models of every family (ssm-server on CPU).

scenarios/demo.yaml, shortened: loadgen starts one ssm-server per family, sweeps three prompt
lengths, and the report must show each family's figures, in its colour, from those records.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from analysis.analyze import analyze
from analysis.plots import FAMILY_COLOURS
from analysis.records import load_run
from analysis.report import write_report
from conftest import run_scenario

DEMO = Path(__file__).resolve().parents[2] / "scenarios" / "demo.yaml"


@pytest.mark.slow
def test_report_on_tiny_models_of_every_family(tmp_path, tiny_models):
    scenario = yaml.safe_load(DEMO.read_text())
    scenario["load"].update(prompt_tokens=[32, 64, 128], requests=2, warmup_requests=1)
    scenario["output"]["max_tokens"] = 4
    scenario["metrics"] = {"scrape_interval_s": 0.5}
    run_dir = run_scenario(scenario, tmp_path, "tiny")
    html = write_report(run_dir).read_text()
    a = analyze(load_run(run_dir))
    records = [json.loads(x) for x in (run_dir / "requests.jsonl").read_text().splitlines()]
    assert sum(s.requests for s in a.stages) + len(a.run.warmup) == len(records)
    families = {a.run.family_of(t) for t in a.run.targets()}
    assert families == {"transformer", "ssm", "hybrid"}
    for t in a.run.targets():
        ok = [s for s in a.stages if s.target == t and s.ok]
        assert {s.prompt_tokens for s in ok} == {32, 64, 128}, f"{t}: {a.limits}"
        for s in ok:
            ttft = s.latency["ttft"]
            assert 0 < ttft.p50 <= s.latency["e2e"].p50
            assert s.latency["tpot"].count == s.ok  # 4 output tokens: TPOT defined for each
    assert all((t, "ttft") in a.fits for t in a.run.targets())
    for fam in families:
        assert FAMILY_COLOURS[fam] in html
    assert 'data-plot="ttft_vs_prompt"' in html and 'data-plot="tpot_vs_prompt"' in html
    assert a.verdict[0].startswith("Hardware: ")
