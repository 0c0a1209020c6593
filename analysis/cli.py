"""``ctxload report RUN``: write RUN/report/ (HTML, Markdown, PNGs, summary.csv/.parquet)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="a run directory (runs/<run-id>)")
    parser.add_argument("--out", metavar="DIR", help="where to write the report (default RUN/report)")
    parser.add_argument("--prometheus", metavar="URL",
                        help="take metrics from this Prometheus server's HTTP API instead of metrics.jsonl")
    parser.add_argument("--start", metavar="TIME",
                        help="start of the Prometheus range: Unix seconds or ISO 8601 (default: env.json started_at)")
    parser.add_argument("--end", metavar="TIME",
                        help="end of the Prometheus range (default: env.json finished_at, else now)")
    parser.add_argument("--step", type=float, metavar="S", help="Prometheus query step in seconds")


def _scrapes(args, run: Path):
    from analysis import prometheus
    from analysis.records import load_run

    env = {}
    try:
        env = json.loads((run / "env.json").read_text())
    except (OSError, ValueError):
        pass
    start = args.start or env.get("started_at")
    end = args.end or env.get("finished_at") or time.time()
    if start is None:
        raise ValueError("--start: required (env.json has no started_at)")
    try:
        start_s, end_s = prometheus.parse_time(start), prometheus.parse_time(end)
    except ValueError as e:
        raise ValueError(f"--start/--end: {e}") from None
    targets = load_run(run, scrapes=[]).targets()
    return prometheus.fetch(args.prometheus, start_s, end_s, targets, step=args.step)


def main(args: argparse.Namespace) -> int:
    from analysis.prometheus import PrometheusError
    from analysis.report import write_report

    run = Path(args.run)
    if not run.is_dir():
        print(f"ctxload report: RUN: no run directory at {run}", file=sys.stderr)
        return 2
    scrapes = None
    if args.prometheus:
        try:
            scrapes = _scrapes(args, run)
        except ValueError as e:
            print(f"ctxload report: {e}", file=sys.stderr)
            return 2
        except PrometheusError as e:
            print(f"ctxload report: --prometheus: {e}", file=sys.stderr)
            return 1
    t0 = time.perf_counter()
    path = write_report(run, scrapes=scrapes, out_dir=args.out)
    print(f"report written in {time.perf_counter() - t0:.1f} s: {path}")
    return 0
