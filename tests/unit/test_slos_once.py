"""One SLO rule: the stage summary printed during a run (loadgen) and the report (analysis)
count the same requests as good, on the same records."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis import stats
from analysis.records import parse_request
from loadgen.controller import meets
from rundir.slos import Slos, percentile


def record(ttft: float, gaps: list[float], ok: bool = True) -> dict:
    n = len(gaps) + 1
    e2e = ttft + sum(gaps)
    return {"schema_version": 1, "request_id": "r", "target": "t", "family": "ssm", "stage": "prompt=8",
            "stage_index": 0, "status": "ok" if ok else "error", "error_kind": None if ok else "timeout",
            "prompt_tokens_requested": 8, "prompt_tokens": 8, "completion_tokens": n, "concurrency": 1,
            "start_time": 100.0, "ttft_s": ttft, "itl_s": gaps, "e2e_s": e2e,
            "tpot_s": (e2e - ttft) / (n - 1) if n > 1 else None}


def both(records: list[dict], slos: Slos) -> tuple[int, int]:
    live = sum(meets(r, slos) for r in records if r["status"] == "ok")
    s = stats.stage_stats("t", "ssm", "prompt=8", [parse_request(r) for r in records], slos)
    return live, round(s.good_fraction * len(records))


def test_the_issues_example_is_judged_alike():
    # 100 gaps, one of them 0.2 s, against 0.05 s: nearest rank said missed, linear said met
    rec = record(0.1, [0.01] * 99 + [0.2])
    assert percentile(rec["itl_s"], 99) == pytest.approx(0.01 + 0.01 * 0.19)
    assert both([rec], Slos(itl_s=0.05)) == (1, 1)
    assert both([record(0.1, [0.01] * 98 + [0.2] * 2)], Slos(itl_s=0.05)) == (0, 0)


@given(st.lists(st.tuples(st.floats(0.001, 2.0), st.lists(st.floats(0.0005, 0.3), min_size=0, max_size=150),
                          st.booleans()), min_size=1, max_size=12),
       st.sampled_from([Slos(ttft_s=0.5), Slos(itl_s=0.05), Slos(tpot_s=0.02), Slos(e2e_s=3.0),
                        Slos(ttft_s=1.0, itl_s=0.1, tpot_s=0.05, e2e_s=5.0)]))
@settings(max_examples=200, deadline=None)
def test_goodput_of_the_stage_summary_equals_the_reports(items, slos):
    records = [record(t, gaps, ok) for t, gaps, ok in items]
    live, report = both(records, slos)
    assert live == report
