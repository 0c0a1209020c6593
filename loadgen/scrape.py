"""Scrape every running target's ``/metrics`` on an interval into ``metrics.jsonl``.

Each scrape is tied to the stage running at its time (``stage``, ``stage_target``,
``stage_index``: the same index the requests of that stage carry) and says which targets were
up (``resident``), so the analysis can tell a target's own readings from a shared device's.
When several targets run stages at once (``placement: by_gpu``), a scrape also carries
``stages``: ``{target: {"stage", "stage_index"}}`` of each, and its own three fields name the
stage of the scraped server's target (null for an exporter's scrape, or a target between
stages): each target's GPU readings then go to its own stage (:func:`stage_fields`).
A scrape of a GPU exporter also carries ``pids``: the processes of each running server's
process group, which match the exporter's per-process memory to a target.

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


def _state(stage) -> dict:
    """What the runner says is running: ``{"stage", "stage_target", "stage_index",
    "resident": {target: {"url", "pid"}}}``, or with targets running at once ``{"stages":
    {target: {"stage", "stage_index"}}, "resident": …}``; a bare label (or None) from older
    callers."""
    st = stage()
    return st if isinstance(st, dict) else {"stage": st}


def stage_fields(st: dict, target: str) -> dict:
    """A scrape's stage fields under the runner's state ``st`` (:func:`_state`), for a scrape
    of ``target`` (a server's target, or an exporter's name). One stage running (or none): its
    ``stage``, ``stage_target`` and ``stage_index``, as every run before waves wrote them.
    Several: ``stages`` (each running target's), and the three fields of ``target``'s own
    stage, null when it runs none (an exporter: its readings are split by ``stages``)."""
    stages = st.get("stages")
    if stages is None:
        return {"stage": st.get("stage"), "stage_target": st.get("stage_target"), "stage_index": st.get("stage_index")}
    if len(stages) <= 1:
        name, own = next(iter(stages.items()), (None, {}))
        return {"stage": own.get("stage"), "stage_target": name, "stage_index": own.get("stage_index")}
    own = stages.get(target) or {}
    return {"stage": own.get("stage"), "stage_target": target if own else None,
            "stage_index": own.get("stage_index"), "stages": stages}


class Scraper:
    """``sources``: (target name, source kind, metrics URL) scraped always (exporters, and the
    targets of callers that pass no state); ``stage()`` gives the runner's state (:func:`_state`),
    whose ``resident`` targets are scraped too — only those named in ``servers``, when given."""

    def __init__(self, path, sources: list[tuple[str, str, str]], stage=lambda: None, servers=None):
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.sources = sources
        self.stage = stage
        self.servers = servers

    def once(self) -> None:
        st = _state(self.stage)
        resident = st.get("resident")
        sources = list(self.sources)
        known = {name for name, _, _ in sources}
        for name, info in (resident or {}).items():
            if name not in known and info.get("url") and (self.servers is None or name in self.servers):
                sources.append((name, "server", info["url"].rstrip("/") + "/metrics"))
        for target, source, url in sources:
            tags = stage_fields(st, target)
            rec = {"schema_version": SCHEMA_VERSION, "time": time.time(), "target": target,
                   "source": source, "url": url, "stage": tags.pop("stage"), "ok": True, "error": None,
                   "samples": []}
            if resident is not None:
                rec.update(tags, resident=sorted(resident))
                if source == "gpu":
                    rec["pids"] = {n: group_pids(i["pid"]) for n, i in resident.items() if i.get("pid")}
            try:
                rec["samples"] = scrape(url)
            except Exception as e:  # noqa: BLE001 - a failed scrape is recorded, not raised
                rec["ok"], rec["error"] = False, f"{type(e).__name__}: {e}"[:300]
            os.write(self.fd, (json.dumps(rec, separators=(",", ":")) + "\n").encode())

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def group_pids(pgid: int) -> list[int]:
    """Processes of the process group ``pgid`` (a server and what it started), from /proc."""
    out = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return out
    for d in names:
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            out.append(int(d))
    return out


class ScraperProcess:
    """The scraper in its own process: parsing a large ``/metrics`` page takes milliseconds of
    CPU, which inside the load generator's event loop would delay the stamps of every stream.
    The runner's state (:func:`_state`) is passed through a small JSON file it rewrites."""

    def __init__(self, path, sources: list[tuple[str, str, str]], interval_s: float, stage_file):
        import subprocess
        import sys

        self.stage_file = stage_file
        self.set_stage(None)
        args = [sys.executable, "-m", "loadgen.scrape", "--out", str(path), "--interval", str(interval_s),
                "--stage-file", str(stage_file)]
        for name, kind, url in sources:
            args += ["--source", f"{name}|{kind}|{url}"]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL)

    def set_stage(self, label: str | None, *, target: str | None = None, index: int | None = None,
                  resident: dict | None = None, stages: dict | None = None) -> None:
        """The stage now running (``label`` of ``target``'s stage ``index``) and the targets up:
        ``{name: {"url", "pid"}}``; or, with targets running at once, each one's stage:
        ``stages`` = ``{target: {"stage", "stage_index"}}`` (``label`` and the rest unused)."""
        state = {"stage": label, "stage_target": target, "stage_index": index, "resident": resident or {}}
        if stages is not None:
            state = {"stages": stages, "resident": resident or {}}
        tmp = f"{self.stage_file}.tmp"
        with open(tmp, "w") as f:
            json.dump(state, f)
        os.replace(tmp, self.stage_file)

    def close(self, final: bool = True) -> None:
        """Stop it; with ``final``, after one last scrape (SIGUSR1 asks for it)."""
        import signal
        import subprocess

        if self.proc.poll() is None:
            if final:
                self.proc.send_signal(signal.SIGUSR1)
                try:
                    self.proc.wait(15)
                except subprocess.TimeoutExpired:
                    pass
            if self.proc.poll() is None:
                self.proc.terminate()
                self.proc.wait(10)


def _main(argv=None) -> int:
    import argparse
    import signal

    ap = argparse.ArgumentParser(description="scrape /metrics pages into metrics.jsonl")
    ap.add_argument("--out", required=True)
    ap.add_argument("--interval", type=float, default=2.0)
    ap.add_argument("--stage-file", required=True)
    ap.add_argument("--source", action="append", default=[], help="NAME|KIND|URL")
    a = ap.parse_args(argv)

    def stage():
        try:
            with open(a.stage_file) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    sources = [tuple(s.split("|", 2)) for s in a.source]
    scraper = Scraper(a.out, sources, stage=stage)
    stop = {"final": False}
    signal.signal(signal.SIGUSR1, lambda *_: stop.update(final=True))
    signal.signal(signal.SIGTERM, lambda *_: stop.update(final=True))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C reaches the whole group: the runner stops us
    parent = os.getppid()
    while not stop["final"]:
        if os.getppid() != parent:  # the load generator is gone (even kill -9): stop too
            break
        t0 = time.monotonic()
        scraper.once()
        while not stop["final"] and time.monotonic() - t0 < a.interval:
            time.sleep(0.05)
    scraper.once()
    scraper.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
