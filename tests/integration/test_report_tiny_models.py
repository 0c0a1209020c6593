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


@pytest.mark.slow
def test_the_demo_shows_the_crossover_and_the_memory_gap(tmp_path, tiny_models):
    """`ctxload demo` as shipped (256 to 32K tokens, ~90 s on 2 cores): the tiny Transformer's
    quadratic prefill crosses the tiny SSM's linear one, its KV cache grows by exactly its
    bytes per token while the SSM's state stays put, and the claims table decides them."""
    import subprocess
    import sys

    from analysis import claims
    from servers.presets import get

    p = subprocess.run([sys.executable, "-m", "ctxload", "demo", "--runs-dir", str(tmp_path), "--run-id", "demo"],
                       capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    a = analyze(load_run(tmp_path / "demo"))
    ttft = {(s.target, s.prompt_tokens): s.latency["ttft"].p50 for s in a.stages if s.ok}
    assert ttft[("tiny-mamba2", 32768)] * 3 < ttft[("tiny-llama", 32768)]  # 10x on 2 cores
    crossing = [v for v in a.verdict if v.startswith("TTFT crossover tiny-llama (transformer) / tiny-mamba2")]
    if ttft[("tiny-llama", 256)] < ttft[("tiny-mamba2", 256)]:  # 10.5 vs 17 ms on 2 cores
        (line,) = crossing
        assert 256 < int(line.split("~")[1].split(" ")[0].replace(",", "")) < 32768
    mem = {m.target: m for m in a.memory}
    for t in ("tiny-llama", "tiny-mamba2", "tiny-falcon-h1"):
        assert mem[t].source == "cache" and mem[t].lengths == [256 << i for i in range(8)]
    kv = get("tiny-llama").kv_bytes_per_token()
    grew = mem["tiny-llama"].peak_bytes[-1] - mem["tiny-llama"].peak_bytes[0]
    assert kv * (32768 - 256) <= grew <= kv * (32768 - 256 + 16)  # prompt + 16 output tokens
    assert len(set(mem["tiny-mamba2"].peak_bytes)) == 1  # a constant state
    verdicts = {c.claim: c.verdict for c in a.claims}
    assert verdicts["SSMs need less memory at long context"] == claims.HOLDS
    assert verdicts["SSMs are faster at long prompts (TTFT)"] == claims.HOLDS
    md = (tmp_path / "demo" / "report" / "report.md").read_text()
    assert "Tiny random-weight models" in md and "memory_vs_prompt.png" in md
