"""``ctxload compare RUN RUN…``: several runs side by side, with relative differences."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directories; the first is the baseline")
    parser.add_argument("--out", metavar="DIR",
                        help="where to write compare.html (default: compare-<ids> beside the first run)")


def main(args: argparse.Namespace) -> int:
    from analysis.compare import write_compare

    runs = [Path(r) for r in args.runs]
    bad = [str(r) for r in runs if not r.is_dir()]
    if bad:
        print(f"ctxload compare: RUN: no run directory at {', '.join(bad)}", file=sys.stderr)
        return 2
    if len(runs) < 2:
        print("ctxload compare: RUN: give at least two run directories", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else runs[0].parent / ("compare-" + "-".join(r.name for r in runs))[:120]
    path = write_compare(runs, out)
    print(f"comparison written: {path}")
    return 0
