"""The claims table recomputed from the raw requests.jsonl lines, with a few lines of code of
our own: the verdicts and the numbers the report quotes must be those. And no verdict from
targets on different engine classes."""

from __future__ import annotations

import json
import re
import shutil
import statistics
from collections import defaultdict
from pathlib import Path

import pytest

from analysis import claims, synthetic
from analysis.analyze import analyze
from analysis.records import load_run
from analysis.report import write_report

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "runs" / "h100-context-sweep"
SPEED = {  # claim → (metric, faster family, slower family, which common length)
    "Transformers are faster at short prompts": ("ttft", "transformer", "ssm", "shortest ≤8K"),
    "SSMs are faster at long prompts (TTFT)": ("ttft", "ssm", "transformer", "longest ≥16K"),
    "SSMs decode faster at long prompts (TPOT)": ("tpot", "ssm", "transformer", "longest ≥16K"),
}
HYBRID = "Hybrids fall between Transformers and SSMs at long prompts"


def with_engine_info(run_dir: Path, backends: dict[str, str]) -> Path:
    """The run with one ``ssm:engine_info`` scrape per target appended to metrics.jsonl, as
    ssm-server exports it."""
    with open(run_dir / "metrics.jsonl", "a") as f:
        for target, backend in backends.items():
            labels = {"model_name": target, "backend": backend, "device": "cuda:0", "dtype": "bfloat16",
                      "cuda_graphs": "true"}
            f.write(json.dumps({"schema_version": 1, "time": 1795331900.0, "target": target,
                                "source": "server", "url": "", "stage": None, "ok": True, "error": None,
                                "samples": [{"name": "ssm:engine_info", "labels": labels, "value": 1}]}) + "\n")
    return run_dir


def raw_medians(run_dir: Path) -> dict:
    """(target, metric, prompt length) → (median, ok requests), straight from the JSON lines:
    ok requests, warm-up left out, each target's lowest concurrency."""
    recs = [json.loads(line) for line in open(run_dir / "requests.jsonl") if line.strip()]
    recs = [r for r in recs if r["stage"] != "warmup"]
    low = {t: min(r["concurrency"] for r in recs if r["target"] == t) for t in {r["target"] for r in recs}}
    by = defaultdict(list)
    for r in recs:
        if r["status"] == "ok" and r["concurrency"] == low[r["target"]]:
            tpot = r["tpot_s"]
            if tpot is None and r["completion_tokens"] and r["completion_tokens"] > 1:
                tpot = (r["e2e_s"] - r["ttft_s"]) / (r["completion_tokens"] - 1)
            for metric, v in (("ttft", r["ttft_s"]), ("tpot", tpot)):
                if v is not None:
                    by[(r["target"], metric, r["prompt_tokens_requested"])].append(v)
    return {k: (statistics.median(v), len(v)) for k, v in by.items()}


def families(run_dir: Path) -> dict[str, list[str]]:
    env = json.loads((run_dir / "env.json").read_text())
    out = defaultdict(list)
    for t in env["targets"]:
        out[t["family"]].append(t["name"])
    return out


def expected(run_dir: Path) -> dict[str, tuple[str, dict[str, tuple[int, float, int]]]]:
    """claim → (verdict, {target: (length, median, requests)}), first pair of each claim."""
    med, fam = raw_medians(run_dir), families(run_dir)
    lengths = lambda t, m: {n for (tt, mm, n) in med if tt == t and mm == m}  # noqa: E731
    out = {}
    for title, (metric, fast, slow, which) in SPEED.items():
        a, b = fam[fast][0], fam[slow][0]
        common = sorted(lengths(a, metric) & lengths(b, metric))
        n = [x for x in common if x <= 8192][0] if which.startswith("shortest") else \
            [x for x in common if x >= 16384][-1]
        va, vb = med[(a, metric, n)], med[(b, metric, n)]
        out[title] = (claims.HOLDS if va[0] < vb[0] else claims.DIFFERS,
                      {a: (n, *va), b: (n, *vb)})
    t, s, h = fam["transformer"][0], fam["ssm"][0], fam["hybrid"][0]
    n = sorted(lengths(t, "ttft") & lengths(s, "ttft") & lengths(h, "ttft"))[-1]
    vt, vs, vh = (med[(x, "ttft", n)] for x in (t, s, h))
    out[HYBRID] = (claims.HOLDS if min(vt[0], vs[0]) <= vh[0] <= max(vt[0], vs[0]) else claims.DIFFERS,
                   {t: (n, *vt), s: (n, *vs), h: (n, *vh)})
    return out


def seconds(text: str) -> float:
    value, unit = re.fullmatch(r"([\d,.]+) (ms|s)", text).groups()
    return float(value.replace(",", "")) * (1e-3 if unit == "ms" else 1.0)


def check_against_report(run_dir: Path) -> None:
    write_report(run_dir)
    md = (run_dir / "report" / "report.md").read_text()
    rows = {line.split(" | ")[0].lstrip("| "): line for line in md.splitlines() if line.startswith("| ")}
    for title, (verdict, figs) in expected(run_dir).items():
        row = rows[title]
        assert f"| {verdict} |" in row, (title, row)
        for target, (n, median, count) in figs.items():
            k = f"{n // 1024}K" if n % 1024 == 0 else f"{n:,}"
            m = re.search(re.escape(target) + r" · [^:]+: (TTFT|TPOT) p50 at " + re.escape(k)
                          + r" = ([\d,.]+ m?s) \(median of (\d+) ok requests?\)", row)
            assert m, (title, target, row)
            assert int(m.group(3)) == count
            shown = seconds(m.group(2))  # three significant digits
            assert shown == pytest.approx(median, rel=5e-3, abs=5e-7), (title, target, shown, median)


def test_fixture_claims_recomputed_from_requests_jsonl(tmp_path):
    run = with_engine_info(shutil.copytree(FIXTURE, tmp_path / "h100"),
                           {"qwen2.5-0.5b": "hf", "mamba2-780m": "hf", "falcon-h1-0.5b": "hf"})
    check_against_report(run)
    a = analyze(load_run(run))
    exp = expected(run)
    for c in a.claims:  # the figures a verdict used are the recomputed ones, to the last digit
        if c.claim in exp:
            assert c.verdict == exp[c.claim][0]
            got = {f.target: (f.prompt, f.value, f.requests) for f in c.figures}
            assert set(got) == set(exp[c.claim][1])
            for t, (n, v, k) in exp[c.claim][1].items():
                assert got[t][0] == n and got[t][2] == k and got[t][1] == pytest.approx(v, rel=1e-12)


def test_synthetic_run_claims_recomputed_from_requests_jsonl(tmp_path):
    run = synthetic.write(tmp_path / "syn")  # a concurrency sweep too: the lowest level counts
    check_against_report(run)


def test_no_verdict_from_an_eager_path_against_a_serving_engine(tmp_path):
    run = with_engine_info(shutil.copytree(FIXTURE, tmp_path / "h100"),
                           {"qwen2.5-0.5b": "hf", "mamba2-780m": "mamba_ssm", "falcon-h1-0.5b": "hf"})
    a = analyze(load_run(run))
    assert a.engines["mamba2-780m"].label == "ssm-server (native)"
    for c in a.claims:
        if c.claim == claims.OPERATOR_CLAIM:  # one target's own profile: no pair to compare
            assert c.verdict == claims.UNMEASURED and "no profile pass" in c.why
            continue
        if c.claim != "SSMs reach longer contexts than Transformers on a 24 GB budget" or c.figures:
            assert c.verdict == claims.UNMEASURED, c
            assert c.why.startswith("only an eager-path qwen2.5-0.5b (ssm-server (transformers, eager))")
            assert "against a serving-engine mamba2-780m (ssm-server (native))" in c.why
    write_report(run)
    md = (run / "report" / "report.md").read_text()
    assert "no — eager research path vs serving engine" in md  # crossover and × faster tables
    top = md[:md.index("## Verdict")]
    assert "Eager research path" in top and "qwen2.5-0.5b" in top and "falcon-h1-0.5b" in top


def test_fixture_without_engine_info_decides_nothing_about_mamba2(tmp_path):
    a = analyze(load_run(FIXTURE))
    assert a.engines["qwen2.5-0.5b"].label == "ssm-server (transformers, eager)"  # only Mamba2 is native
    assert a.engines["mamba2-780m"].label == "ssm-server (backend unknown)"
    assert all(c.verdict == claims.UNMEASURED for c in a.claims)
    assert any("engine backend of mamba2-780m is unknown" in c.why for c in a.claims)
