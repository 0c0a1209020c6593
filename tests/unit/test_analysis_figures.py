"""Derived figures against hand-computed values: percentiles, TPOT, goodput, throughput, errors."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis import stats
from analysis.records import parse_request
from rundir.slos import Slos


def req(**kw):
    base = dict(target="t", family="transformer", stage="prompt=8", stage_index=0, status="ok",
                prompt_tokens_requested=8, completion_tokens=5, concurrency=1, start_time=100.0,
                ttft_s=0.1, itl_s=[0.02, 0.02, 0.03, 0.03], e2e_s=0.2)
    base.update(kw)
    return parse_request(base)


def test_distribution_hand_computed():
    d = stats.Distribution.of([1.0, 2.0, 3.0, 4.0])
    # linear interpolation: rank = p/100 · (n − 1)
    assert d.count == 4 and d.mean == 2.5
    assert d.p50 == pytest.approx(2.5)
    assert d.p90 == pytest.approx(3.7)
    assert d.p99 == pytest.approx(3.97)
    empty = stats.Distribution.of([])
    assert empty.count == 0 and empty.p50 is None


@given(st.lists(st.floats(0, 1e4, allow_nan=False), min_size=1, max_size=60))
@settings(max_examples=80, deadline=None)
def test_percentiles_ordered_and_bounded(values):
    d = stats.Distribution.of(values)
    assert min(values) - 1e-9 <= d.p50 <= d.p90 + 1e-9 <= d.p99 + 2e-9 <= max(values) + 3e-9
    assert d.count == len(values)


def test_tpot_definition():
    # (e2e − ttft) / (tokens − 1) = (0.2 − 0.1) / 4
    r = req(tpot_s=None)
    assert stats.tpot(r) == pytest.approx(0.025)
    assert stats.tpot(req(tpot_s=None, completion_tokens=1)) is None
    assert stats.tpot(req(tpot_s=None, ttft_s=None)) is None


def test_stage_figures_throughput_goodput_errors():
    reqs = [req(start_time=100.0, e2e_s=0.5, ttft_s=0.1, completion_tokens=5),
            req(start_time=100.5, e2e_s=0.5, ttft_s=0.4, completion_tokens=5),
            req(start_time=101.0, e2e_s=1.0, ttft_s=0.2, completion_tokens=3),
            req(start_time=101.5, status="error", error_kind="oom", error_message="CUDA OOM",
                ttft_s=None, itl_s=[], e2e_s=0.5, completion_tokens=0)]
    s = stats.stage_stats("t", "transformer", "prompt=8", reqs, Slos(ttft_s=0.3))
    assert s.duration_s == pytest.approx(2.0)  # 100.0 → 102.0
    assert s.ok == 3 and s.errors == {"oom": 1}
    assert s.request_throughput == pytest.approx(3 / 2.0)
    assert s.output_token_throughput == pytest.approx(13 / 2.0)
    # ttft ≤ 0.3: the first and third; the failed one never counts
    assert s.goodput == pytest.approx(2 / 2.0)
    assert s.good_fraction == pytest.approx(2 / 4)
    assert s.latency["ttft"].p50 == pytest.approx(0.2)
    assert s.latency["ttft"].count == 3
    assert s.error_examples["oom"] == "CUDA OOM"


def test_no_slos_no_goodput():
    s = stats.stage_stats("t", "transformer", "x", [req()], Slos())
    assert s.goodput is None and s.good_fraction is None


@pytest.mark.parametrize("scenario, expected", [
    ({"slos": {"ttft_s": 2.0, "itl_s": 0.05, "tpot_s": None}}, {"ttft_s": 2.0, "itl_s": 0.05}),
    ({"slos": {"e2e_s": 10}}, {"e2e_s": 10.0}),
    ({"slos": {"ttft_s": 1.0, "colour": "red"}}, {"ttft_s": 1.0}),  # a reader keeps what fits the schema
    ({"slos": {"ttft_s": -1}}, {}),
    ({"slo": {"ttft_ms": 500}}, {}),  # not the schema's spelling: no SLOs, not a guess
    ({}, {}),
])
def test_read_slos_reads_the_schemas_fields(scenario, expected):
    assert stats.read_slos(scenario).given() == expected


def test_itl_slo_uses_the_requests_p99_gap():
    # 10 gaps: rank 0.99·9 = 8.91 → 0.01 + 0.91·0.99 = 0.9109 > 0.5
    assert not stats.meets_slos(req(itl_s=[0.01] * 9 + [1.0]), Slos(itl_s=0.5))
    # 201 gaps: rank 198 → 0.01, the single long gap is beyond the p99
    assert stats.meets_slos(req(itl_s=[0.01] * 200 + [1.0]), Slos(itl_s=0.5))


@given(st.lists(st.tuples(st.floats(0.001, 5), st.integers(2, 64), st.booleans()), min_size=1, max_size=30),
       st.floats(0.001, 5))
@settings(max_examples=60, deadline=None)
def test_goodput_never_exceeds_throughput(items, limit):
    reqs = [req(start_time=100.0 + i, ttft_s=t, e2e_s=t + 0.5, completion_tokens=n,
                status="ok" if ok else "error", error_kind=None if ok else "timeout")
            for i, (t, n, ok) in enumerate(items)]
    s = stats.stage_stats("t", "ssm", "x", reqs, Slos(ttft_s=limit))
    if s.request_throughput is not None:
        assert s.goodput <= s.request_throughput + 1e-12
        assert s.goodput == pytest.approx(sum(ok and t <= limit for t, _n, ok in items) / s.duration_s)
    assert 0 <= s.good_fraction <= 1
    assert not math.isnan(s.good_fraction)
