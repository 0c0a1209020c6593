"""The docs' tables of a sweep run: TTFT p50, TPOT p50 and the memory each target needed, one
row per swept prompt length and one column per target (docs/deploy.md, "Results on one NVIDIA
H200"), from the analysis the report uses.

    python benchmarks/gpu/paper_tables.py RUN_DIR      # e.g. tests/fixtures/runs/h200-paper
"""

from __future__ import annotations

import sys
from pathlib import Path

from analysis import scaling, units
from analysis.memory import memory_curves
from analysis.records import load_run


def pivot(title: str, targets: list[str], lengths: list[int], cell) -> str:
    head = "| prompt tokens | " + " | ".join(targets) + " |"
    rows = [head, "|" + "---|" * (len(targets) + 1)]
    for n in lengths:
        rows.append(f"| {units.tokens(n)} | " + " | ".join(cell(t, n) for t in targets) + " |")
    return f"{title}:\n\n" + "\n".join(rows)


def tables(run_dir: Path) -> str:
    run = load_run(run_dir)
    targets = run.targets()
    # the swept lengths (stages named prompt=N), not a max-context search's probes
    swept = sorted({r.prompt_length for r in run.requests
                    if r.ok and r.prompt_length and (r.stage or "").startswith("prompt=")})
    med = {(t, m): dict(zip(*scaling.curve(run, t, m))) for t in targets for m in ("ttft", "tpot")}
    mem = {c.target: dict(zip(c.lengths, c.peak_bytes)) for c in memory_curves(run)}

    def latency(metric):
        return lambda t, n: units.duration(med[(t, metric)].get(n))

    return "\n\n".join([
        pivot("TTFT p50", targets, swept, latency("ttft")),
        pivot("TPOT p50", targets, swept, latency("tpot")),
        pivot("Memory needed", targets, swept, lambda t, n: units.gb(mem.get(t, {}).get(n))),
    ])


if __name__ == "__main__":
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        sys.exit("usage: python benchmarks/gpu/paper_tables.py RUN_DIR")
    print(tables(Path(sys.argv[1])))
