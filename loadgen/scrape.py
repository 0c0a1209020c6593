"""Scrape every target's ``/metrics`` on an interval into ``metrics.jsonl``, tagged with the stage.

With these scrapes a run directory is complete without a Prometheus server.  A failed scrape
is a record too (``ok: false`` with the error), so a gap in the data explains itself.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

SCHEMA_VERSION = 1


def parse(text: str) -> list[dict]:
    out = []
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.append({"name": s.name, "labels": dict(s.labels), "value": s.value})
    return out


def scrape(url: str, timeout: float = 5.0) -> list[dict]:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return parse(r.read().decode("utf-8", errors="replace"))


class Scraper:
    """``sources``: (target name, source kind, metrics URL).  ``stage()`` gives the current label."""

    def __init__(self, path, sources: list[tuple[str, str, str]], stage=lambda: None):
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.sources = sources
        self.stage = stage

    def once(self) -> None:
        for target, source, url in self.sources:
            rec = {"schema_version": SCHEMA_VERSION, "time": time.time(), "target": target,
                   "source": source, "url": url, "stage": self.stage(), "ok": True, "error": None,
                   "samples": []}
            try:
                rec["samples"] = scrape(url)
            except Exception as e:  # noqa: BLE001 - a failed scrape is recorded, not raised
                rec["ok"], rec["error"] = False, f"{type(e).__name__}: {e}"[:300]
            os.write(self.fd, (json.dumps(rec, separators=(",", ":")) + "\n").encode())

    def loop(self, interval_s: float) -> None:
        import gevent

        while True:
            t0 = time.monotonic()
            self.once()
            gevent.sleep(max(0.0, interval_s - (time.monotonic() - t0)))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
