"""Request-level figures: latency distributions, throughput, goodput, errors.

Definitions are vLLM's benchmark's (DESIGN.md): TTFT = request sent → first token event;
ITL = each gap between token events; TPOT = (e2e − TTFT) / (output tokens − 1). Each metric
is one small class naming its tag and unit; values stay in seconds and become milliseconds
only when displayed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from analysis.records import Request, RunData
from rundir.slos import Slos, percentiles

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class Distribution:
    count: int
    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None

    @classmethod
    def of(cls, values: Iterable[float]) -> "Distribution":
        v = np.asarray([x for x in values if x is not None], dtype=float)
        p = percentiles(v, PERCENTILES)  # the run directory's one rule (linear, as vLLM's benchmark)
        if p is None:
            return cls(0, None, None, None, None)
        return cls(int(v.size), float(v.mean()), p[0], p[1], p[2])


class Metric:
    """One latency metric: its tag, display unit, and the values a request contributes."""

    tag = ""
    title = ""
    unit = "ms"
    scale = 1e3  # seconds → display unit

    def values(self, r: Request) -> list[float]:
        raise NotImplementedError

    def distribution(self, requests: Iterable[Request]) -> Distribution:
        return Distribution.of(v for r in requests if r.ok for v in self.values(r))


class TTFT(Metric):
    tag, title = "ttft", "time to first token"

    def values(self, r):
        return [] if r.ttft_s is None else [r.ttft_s]


class ITL(Metric):
    tag, title = "itl", "inter-token latency"

    def values(self, r):
        return list(r.itl_s)


class TPOT(Metric):
    tag, title = "tpot", "time per output token"

    def values(self, r):
        return [] if tpot(r) is None else [tpot(r)]


class E2E(Metric):
    tag, title, unit, scale = "e2e", "end-to-end latency", "s", 1.0

    def values(self, r):
        return [] if r.e2e_s is None else [r.e2e_s]


METRICS: tuple[Metric, ...] = (TTFT(), ITL(), TPOT(), E2E())


def tpot(r: Request) -> float | None:
    """(e2e − TTFT) / (output tokens − 1); None with fewer than two output tokens."""
    if r.tpot_s is not None:
        return r.tpot_s
    if r.e2e_s is None or r.ttft_s is None or not r.completion_tokens or r.completion_tokens < 2:
        return None
    return (r.e2e_s - r.ttft_s) / (r.completion_tokens - 1)


# ---- SLOs and goodput --------------------------------------------------------------------


def read_slos(scenario: dict[str, Any]) -> Slos:
    """The SLOs of a run's scenario (its ``slos`` block, the scenario schema's fields)."""
    return Slos.of_scenario(scenario)


def meets_slos(r: Request, slos: Slos) -> bool:
    """A good request: ok, and every SLO met — the rule the live stage summary applies
    (``rundir.slos``; ITL: the p99 of its own gaps)."""
    return r.ok and slos.meets(ttft_s=r.ttft_s, tpot_s=tpot(r), itl_s=r.itl_s or [], e2e_s=r.e2e_s)


# ---- per target × stage ------------------------------------------------------------------


@dataclass
class StageStats:
    target: str
    family: str
    stage: str
    stage_index: int
    prompt_tokens: int | None
    concurrency: int | None
    requests: int
    ok: int
    errors: dict[str, int]
    latency: dict[str, Distribution]
    duration_s: float | None
    request_throughput: float | None
    output_token_throughput: float | None
    total_token_throughput: float | None
    goodput: float | None
    good_fraction: float | None
    output_tokens: int = 0
    error_examples: dict[str, str] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        """One flat row (seconds, base units) for summary.csv/parquet."""
        out: dict[str, Any] = dict(
            target=self.target, family=self.family, stage=self.stage,
            stage_index=self.stage_index, prompt_tokens=self.prompt_tokens,
            concurrency=self.concurrency, requests=self.requests, ok=self.ok,
            errors=sum(self.errors.values()),
            error_kinds=";".join(f"{k}={v}" for k, v in sorted(self.errors.items())),
            duration_s=self.duration_s, request_throughput_rps=self.request_throughput,
            output_token_throughput_tps=self.output_token_throughput,
            total_token_throughput_tps=self.total_token_throughput,
            goodput_rps=self.goodput, good_fraction=self.good_fraction)
        for tag, d in self.latency.items():
            for stat in ("p50", "p90", "p99", "mean"):
                out[f"{tag}_{stat}_s"] = getattr(d, stat)
            out[f"{tag}_count"] = d.count
        return out


def _median_int(values: Sequence[int | None]) -> int | None:
    v = [x for x in values if x is not None]
    return int(np.median(v)) if v else None


def stage_stats(target: str, family: str, stage: str, reqs: list[Request],
                slos: Slos) -> StageStats:
    ok = [r for r in reqs if r.ok]
    errors = Counter(r.error_kind or "unknown" for r in reqs if not r.ok)
    examples: dict[str, str] = {}
    for r in reqs:
        if not r.ok and (r.error_kind or "unknown") not in examples:
            examples[r.error_kind or "unknown"] = (r.error_message or "")[:200]
    starts = [r.start_time for r in reqs if r.start_time is not None]
    ends = [r.end_time for r in reqs if r.end_time is not None]
    duration = (max(ends) - min(starts)) if starts and ends else None
    if duration is not None and duration <= 0:
        duration = None
    out_tokens = sum(r.completion_tokens or 0 for r in ok)
    in_tokens = sum(r.prompt_tokens or r.prompt_tokens_requested or 0 for r in ok)
    good = sum(meets_slos(r, slos) for r in reqs)

    def rate(x):
        return None if duration is None else x / duration

    return StageStats(
        target=target, family=family, stage=stage,
        stage_index=min(r.stage_index for r in reqs),
        prompt_tokens=_median_int([r.prompt_length for r in reqs]),
        concurrency=max((r.concurrency for r in reqs if r.concurrency is not None), default=None),
        requests=len(reqs), ok=len(ok), errors=dict(errors),
        latency={m.tag: m.distribution(reqs) for m in METRICS},
        duration_s=duration, request_throughput=rate(len(ok)),
        output_token_throughput=rate(out_tokens), total_token_throughput=rate(out_tokens + in_tokens),
        goodput=rate(good) if slos.given() else None,
        good_fraction=(good / len(reqs)) if slos.given() and reqs else None,
        output_tokens=out_tokens, error_examples=examples)


def all_stage_stats(run: RunData, slos: Slos | None = None) -> list[StageStats]:
    """Figures per target × stage, targets in run order, stages in stage order."""
    slos = read_slos(run.scenario) if slos is None else slos
    groups: dict[tuple[str, str], list[Request]] = {}
    for r in run.requests:
        groups.setdefault((r.target, r.stage), []).append(r)
    order = {t: i for i, t in enumerate(run.targets())}
    out = [stage_stats(t, run.family_of(t), s, rs, slos) for (t, s), rs in groups.items()]
    out.sort(key=lambda s: (order.get(s.target, 1 << 30), s.stage_index, s.prompt_tokens or 0))
    return out
