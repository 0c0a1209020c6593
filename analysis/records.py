"""Reading a run directory: requests, metric scrapes, the scenario and the environment.

Reading is tolerant. A line that is not JSON, or not an object, or lacks the fields a
figure needs, is named (``file:line``) in :attr:`RunData.problems` and skipped; a missing
file is named in :attr:`RunData.missing`. What remains is reported.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from rundir.jsonl import read_jsonl  # the one lenient reader of the run directory
from rundir.operators import OperatorRecord  # the run directory's contract: written by loadgen
from rundir.requests import RequestRecord

FAMILIES = ("transformer", "ssm", "hybrid")
WARMUP = "warmup"
"""The stage label loadgen gives warm-up requests (sent before a target's first stage)."""

#: Fields without which a request record cannot be placed in any figure.
REQUIRED_REQUEST_FIELDS = ("target", "stage", "status")


Request = RequestRecord
"""One finished request, as loadgen wrote it (durations in seconds): the contract's record."""


@dataclass
class Scrape:
    """One scrape of one ``/metrics`` endpoint."""

    time: float
    target: str
    source: str
    stage: str | None
    ok: bool
    samples: list[tuple[str, dict[str, str], float]]
    stage_target: str | None = None
    """The target whose stage was running (scrapes since 2026-12: the runner says so)."""
    stage_index: int | None = None
    """That stage's index: the requests of the stage carry the same one."""
    resident: list[str] | None = None
    """Targets whose servers were up at the time; None in older runs (not known)."""
    pids: dict[str, list[int]] | None = None
    """GPU exporter scrapes: each resident server's processes, to match per-process memory."""
    stages: dict[str, tuple[int | None, str | None]] | None = None
    """Targets running stages at once (``placement: by_gpu``): each one's (stage index, label)
    at this scrape; None when at most one stage ran (the three fields above say it)."""

    def stage_of(self, target: str) -> tuple[int | None, str | None] | None:
        """The stage ``target`` ran at this scrape, (index, label), or None: it ran none (as
        far as the scrape says)."""
        if self.stages is not None:
            return self.stages.get(target)
        return (self.stage_index, self.stage) if self.stage_target == target else None


@dataclass
class RunData:
    run_dir: Path
    requests: list[Request] = field(default_factory=list)
    scrapes: list[Scrape] = field(default_factory=list)
    scenario: dict[str, Any] = field(default_factory=dict)
    env: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    """Malformed records, each named ``file:line: why``."""
    missing: list[str] = field(default_factory=list)
    """What the run lacks (files, metrics), said plainly."""
    metrics_source: str = "metrics.jsonl"
    warmup: list[Request] = field(default_factory=list)
    """Requests of the ``warmup`` stage: kept out of every figure."""
    operators: list[OperatorRecord] = field(default_factory=list)
    """The profile pass's lines (operators.jsonl), when the scenario had one."""
    _sweep: dict[str, int] | None = field(default=None, repr=False)
    _targets: list[str] | None = field(default=None, repr=False)
    _families: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def run_id(self) -> str:
        return str(self.env.get("run_id") or self.run_dir.name)

    @property
    def finished(self) -> bool:
        return bool(self.env.get("finished_at"))

    def targets(self) -> list[str]:
        """Target names in the order they first appear (env first, then requests).
        Computed once: the records are read before any figure is derived."""
        if self._targets is None:
            names: list[str] = [t.get("name") for t in self.env.get("targets", []) if t.get("name")]
            seen = set(names)
            for r in self.requests:
                if r.target not in seen:
                    names.append(r.target)
                    seen.add(r.target)
            self._targets = names
        return list(self._targets)

    def family_of(self, target: str) -> str:
        if target not in self._families:
            fam = next((str(t["family"]) for t in self.env.get("targets", [])
                        if t.get("name") == target and t.get("family")), None)
            fam = fam or next((r.family for r in self.requests if r.target == target and r.family), None)
            self._families[target] = fam or "unknown"
        return self._families[target]

    def sweep_concurrency(self, target: str) -> int | None:
        """The lowest concurrency the target ran at: curves against prompt length use only
        requests at it, so a concurrency sweep does not blur a context sweep."""
        if self._sweep is None:
            self._sweep = {}
            for r in self.requests:
                if r.concurrency is not None:
                    old = self._sweep.get(r.target)
                    self._sweep[r.target] = r.concurrency if old is None else min(old, r.concurrency)
        return self._sweep.get(target)

    def in_sweep(self, r: "Request") -> bool:
        """Whether ``r`` is a point of its target's one-shot length curves: at the sweep's
        concurrency, and a prompt that shares nothing (a conversation's turn is its history
        plus a message; a shared prefix may come from a cache: the reuse tables show those)."""
        if r.turn is not None or (r.shared_tokens or 0) > 0:
            return False
        c = self.sweep_concurrency(r.target)
        return c is None or r.concurrency is None or r.concurrency == c

    def latest_labels(self, target: str, metric: str, where=None) -> dict[str, str] | None:
        """The labels of the latest sample of ``metric`` (an info metric, e.g. vLLM's
        ``vllm:cache_config_info``) a target's server gave — the latest whose labels pass
        ``where``, when given — or None."""
        for s in reversed(self.scrapes):
            if s.target == target:
                lab = next((lab for n, lab, _ in s.samples if n == metric), None)
                if lab and (where is None or where(lab)):
                    return lab
        return None

    def target_info(self, target: str) -> dict[str, Any]:
        for t in self.env.get("targets", []):
            if t.get("name") == target:
                return t
        return {}

    def gpus_of(self, target: str) -> frozenset[str] | None:
        """The GPUs a served target ran on (its ``gpus``, as the GPU exporter's ``gpu`` label
        names them), or None: not placed, so any GPU may be its."""
        g = self.target_info(target).get("gpus")
        return frozenset(str(x) for x in g) if g else None

    def waves(self) -> list[list[str]]:
        """Targets that ran at the same time (``placement: by_gpu``: env.json's ``wave``), in
        groups of two or more, in run order."""
        by: dict[int, list[str]] = {}
        for t in self.env.get("targets") or []:
            if isinstance(t, dict) and isinstance(t.get("wave"), int) and t.get("name"):
                by.setdefault(t["wave"], []).append(str(t["name"]))
        return [names for _, names in sorted(by.items()) if len(names) > 1]

    def apart(self, a: str, b: str) -> bool:
        """Whether targets ``a`` and ``b`` ran on GPUs of their own (both placed, none shared):
        then one's device readings say nothing of the other."""
        ga, gb = self.gpus_of(a), self.gpus_of(b)
        return ga is not None and gb is not None and not ga & gb


def _num(v: Any) -> float | None:
    if v is None or isinstance(v, bool):
        return None
    if isinstance(v, (int, float)) and math.isfinite(v):
        return float(v)
    raise ValueError(f"not a finite number: {v!r}")


def _int(v: Any) -> int | None:
    f = _num(v)
    return None if f is None else int(f)


def parse_request(obj: dict[str, Any]) -> Request:
    """A :class:`Request` from one JSON object; ``ValueError`` names what is wrong."""
    absent = [k for k in REQUIRED_REQUEST_FIELDS if obj.get(k) in (None, "")]
    if absent:
        raise ValueError(f"missing field(s) {', '.join(absent)}")
    itl = obj.get("itl_s") or []
    if not isinstance(itl, list):
        raise ValueError("itl_s is not a list")
    ttft, e2e = _num(obj.get("ttft_s")), _num(obj.get("e2e_s"))
    completion = _int(obj.get("completion_tokens"))
    tpot = _num(obj.get("tpot_s"))
    if tpot is None and ttft is not None and e2e is not None and completion and completion > 1:
        tpot = (e2e - ttft) / (completion - 1)
    return Request(
        request_id=str(obj.get("request_id") or ""),
        api=str(obj.get("api") or "completions"),
        max_tokens=_int(obj.get("max_tokens")),
        token_count_source=obj.get("token_count_source"),
        http_status=_int(obj.get("http_status")),
        worker=obj.get("worker"),
        response_id=obj.get("response_id"),
        stamp_clock=obj.get("stamp_clock"),
        target=str(obj["target"]),
        family=str(obj.get("family") or ""),
        stage=str(obj["stage"]),
        stage_index=_int(obj.get("stage_index")) or 0,
        status=str(obj["status"]),
        prompt_tokens_requested=_int(obj.get("prompt_tokens_requested")),
        prompt_tokens=_int(obj.get("prompt_tokens")),
        completion_tokens=completion,
        concurrency=_int(obj.get("concurrency")),
        start_time=_num(obj.get("start_time")),
        ttft_s=ttft,
        itl_s=[float(x) for x in itl if _num(x) is not None],
        tpot_s=tpot,
        e2e_s=e2e,
        error_kind=obj.get("error_kind"),
        error_message=obj.get("error_message"),
        engine=str(obj.get("engine") or ""),
        model=str(obj.get("model") or ""),
        shared_tokens=_int(obj.get("shared_tokens")),
        cached_tokens=_int(obj.get("cached_tokens")),
        conversation=_int(obj.get("conversation")),
        turn=_int(obj.get("turn")),
    )


def parse_scrape(obj: dict[str, Any]) -> Scrape:
    if "time" not in obj or "target" not in obj:
        raise ValueError("missing field(s) time/target")
    samples = []
    for s in obj.get("samples") or []:
        if not isinstance(s, dict) or "name" not in s:
            raise ValueError("a sample without a name")
        v = s.get("value")
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"sample {s['name']} has value {v!r}") from None
        samples.append((str(s["name"]), dict(s.get("labels") or {}), v))
    resident = obj.get("resident")
    pids = obj.get("pids")
    stages = obj.get("stages")
    return Scrape(time=float(obj["time"]), target=str(obj["target"]),
                  source=str(obj.get("source") or "server"), stage=obj.get("stage"),
                  ok=bool(obj.get("ok", True)), samples=samples,
                  stage_target=obj.get("stage_target"), stage_index=_int(obj.get("stage_index")),
                  resident=[str(x) for x in resident] if isinstance(resident, list) else None,
                  pids={str(k): [int(p) for p in v] for k, v in pids.items() if isinstance(v, list)}
                  if isinstance(pids, dict) else None,
                  stages={str(k): (_int(v.get("stage_index")), v.get("stage")) for k, v in stages.items()
                          if isinstance(v, dict)} if isinstance(stages, dict) else None)

def load_run(run_dir: str | Path, scrapes: Iterable[Scrape] | None = None) -> RunData:
    """Everything in ``run_dir`` that can be read; ``scrapes`` replaces metrics.jsonl."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run directory at {run_dir}")
    data = RunData(run_dir=run_dir)
    for name, attr in (("scenario.yaml", "scenario"), ("env.json", "env")):
        p = run_dir / name
        if not p.exists():
            data.missing.append(f"{name} is missing")
            continue
        try:
            text = p.read_text(encoding="utf-8", errors="replace")
            obj = yaml.safe_load(text) if name.endswith(".yaml") else json.loads(text)
            if not isinstance(obj, dict):
                raise ValueError("not a mapping")
            setattr(data, attr, obj)
        except (ValueError, yaml.YAMLError) as e:
            data.problems.append(f"{name}: unreadable ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
    req = run_dir / "requests.jsonl"
    if req.exists():
        for r in read_jsonl(req, parse_request, data.problems):
            (data.warmup if r.stage == WARMUP else data.requests).append(r)
    else:
        data.missing.append("requests.jsonl is missing: no request figures")
    if scrapes is not None:
        data.scrapes = list(scrapes)
        data.metrics_source = "prometheus"
    else:
        met = run_dir / "metrics.jsonl"
        if met.exists():
            data.scrapes = read_jsonl(met, parse_scrape, data.problems)
        else:
            data.missing.append("metrics.jsonl is missing: no server or GPU metrics")
    ops = run_dir / "operators.jsonl"
    if ops.exists():
        data.operators = read_jsonl(ops, OperatorRecord.from_json, data.problems)
    if data.env and not data.env.get("finished_at"):
        data.missing.append("env.json has no finished_at: the run stopped before its end")
    if not data.requests:
        data.missing.append("no request records")
    return data


class TimeIndex:
    """Requests by send time, to find those in flight during a time window quickly."""

    def __init__(self, requests: Iterable[Request]):
        import bisect

        self._bisect = bisect
        rs = sorted((r for r in requests if r.start_time is not None and r.end_time is not None),
                    key=lambda r: r.start_time)
        self.requests = rs
        self.starts = [r.start_time for r in rs]
        self.longest = max((r.end_time - r.start_time for r in rs), default=0.0)

    def overlapping(self, lo: float, hi: float) -> list[Request]:
        """Requests whose [start, end] meets [lo, hi]."""
        i = self._bisect.bisect_left(self.starts, lo - self.longest)
        j = self._bisect.bisect_right(self.starts, hi)
        return [r for r in self.requests[i:j] if r.end_time >= lo]
