"""How long ``write_report`` takes on synthetic runs of growing size.

    .venv/bin/python benchmarks/bench_report.py [--per-stage 4 16 64] [--out /tmp/bench-report]

Prints, per run: requests, metric scrapes, seconds to load + analyse, seconds for the whole
report (plots, HTML, Markdown, CSV, Parquet).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from analysis import synthetic
from analysis.analyze import analyze
from analysis.records import load_run
from analysis.report import write_report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-stage", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="bench-report-"))
    print(f"{'requests':>9} {'scrapes':>8} {'analyse s':>10} {'report s':>9}")
    for k in args.per_stage:
        run_dir = synthetic.write(root / f"k{k}", synthetic.SyntheticRun(per_stage=k, max_tokens=64))
        t0 = time.perf_counter()
        a = analyze(load_run(run_dir))
        t1 = time.perf_counter()
        write_report(run_dir)
        t2 = time.perf_counter()
        print(f"{len(a.run.requests):>9} {len(a.run.scrapes):>8} {t1 - t0:>10.2f} {t2 - t1:>9.2f}")


if __name__ == "__main__":
    main()
