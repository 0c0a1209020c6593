"""Pull a run's metrics from a Prometheus server's HTTP API instead of metrics.jsonl.

One range query (``/api/v1/query_range``) for every series ctxload reads (``ssm:``, ``vllm:``,
``ctxload:`` and ``DCGM_FI_DEV_`` names); the answer is regrouped into scrapes (one per
timestamp and target), the shape metrics.jsonl gives, so the same figures follow.
A series is placed at a target by its ``target`` label, else ``model_name``, else ``job``;
``DCGM_FI_DEV_*`` series are the GPU's.
"""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from datetime import datetime

from analysis.records import Scrape

SELECTOR = '{__name__=~"(ssm|vllm|ctxload):.+|DCGM_FI_DEV_.+"}'


class PrometheusError(RuntimeError):
    pass


def parse_time(text: str | float) -> float:
    """Unix seconds from a number or an ISO 8601 time (``Z`` allowed)."""
    if isinstance(text, (int, float)):
        return float(text)
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise ValueError(f"not a Unix time or ISO 8601 time: {text!r}") from None


def query_range(url: str, query: str, start: float, end: float, step: float, timeout: float = 30.0) -> list:
    params = urllib.parse.urlencode(dict(query=query, start=f"{start:.3f}", end=f"{end:.3f}", step=f"{step:g}"))
    full = url.rstrip("/") + "/api/v1/query_range?" + params
    try:
        with urllib.request.urlopen(full, timeout=timeout) as resp:
            body = json.loads(resp.read())
    except (OSError, ValueError) as e:
        raise PrometheusError(f"query to {url} failed: {e}") from None
    if body.get("status") != "success":
        raise PrometheusError(f"Prometheus answered {body.get('errorType')}: {body.get('error')}")
    return body["data"]["result"]


def to_scrapes(result: list, targets: list[str]) -> list[Scrape]:
    """Regroup range-query series into one scrape per (time, target)."""
    grouped: dict[tuple[float, str, str], list] = {}
    for series in result:
        labels = dict(series.get("metric") or {})
        name = labels.pop("__name__", "")
        if name.startswith("DCGM_FI_DEV_"):
            target, source = "gpu", "gpu"
        else:
            target = next((labels[k] for k in ("target", "model_name", "job")
                           if labels.get(k) in targets), labels.get("job", "?"))
            source = "client" if name.startswith("ctxload:") else "server"
        for t, v in series.get("values") or []:
            grouped.setdefault((float(t), target, source), []).append((name, labels, float(v)))
    return [Scrape(time=t, target=tg, source=src, stage=None, ok=True, samples=s)
            for (t, tg, src), s in sorted(grouped.items())]


def fetch(url: str, start: float, end: float, targets: list[str], step: float | None = None) -> list[Scrape]:
    """Scrapes of every ctxload-relevant series between ``start`` and ``end`` (Unix s)."""
    if end <= start:
        raise ValueError(f"--end ({end}) must come after --start ({start})")
    step = step or max(1.0, (end - start) / 2000)  # under Prometheus's 11,000-point limit
    return to_scrapes(query_range(url, SELECTOR, start, end, step), targets)
