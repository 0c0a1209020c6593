"""The stall a long prompt's arrival costs the streams already decoding, from a run's records.

usage: python3 benchmarks/gpu/arrival_gap.py RUN_DIR
For each target and each stage where one prompt is at least 16× the length of every other
(``scenarios/traces/long-arrival.jsonl``: a 1M-token prompt arriving 3 s into 32 streams of 1K
prompts decoding 8,000 tokens): the decoding streams' largest gap between two tokens among the
gaps that end while the long prompt waits for its first token, their ITL p50 and p99 over that
window, and the long prompt's TTFT beside them against its TTFT alone (the median of the same
target's context_sweep stage at that prompt length, ``prompt=N``, if the run has one). Reads
``requests.jsonl`` (docs/contracts.md §4); prints a table.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from itertools import accumulate
from pathlib import Path


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main(run_dir: Path) -> int:
    recs = [json.loads(line) for line in (run_dir / "requests.jsonl").read_text().splitlines() if line.strip()]
    recs = [r for r in recs if r.get("status") == "ok" and r.get("ttft_s") is not None]
    stages: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in recs:
        stages[r["target"], r["stage"]].append(r)
    alone = {(t, int(s.split("=", 1)[1])): statistics.median(r["ttft_s"] for r in rs)
             for (t, s), rs in stages.items() if s.startswith("prompt=")}  # context_sweep stages
    rows = []
    for (target, stage), rs in stages.items():
        rs = sorted(rs, key=lambda r: -r["prompt_tokens_requested"])
        if len(rs) < 2 or rs[0]["prompt_tokens_requested"] < 16 * rs[1]["prompt_tokens_requested"]:
            continue
        big, others = rs[0], rs[1:]
        t0, t1 = big["start_time"], big["start_time"] + big["ttft_s"]
        gaps = []
        for r in others:
            first = r["start_time"] + r["ttft_s"]
            ends = [first + s for s in accumulate(r["itl_s"])]
            gaps += [g for g, end in zip(r["itl_s"], ends) if t0 <= end <= t1]
        if not gaps:
            continue
        solo = alone.get((target, big["prompt_tokens_requested"]))
        rows.append((target, stage, big["prompt_tokens_requested"], len(others), max(gaps),
                     statistics.median(gaps), pct(gaps, 0.99), big["ttft_s"], solo))
    if not rows:
        print(f"{run_dir}: no stage where one prompt arrives among much shorter ones")
        return 1
    print("| target | stage | long prompt | streams | their largest gap | ITL p50 / p99 while it waits "
          "| its TTFT beside / alone |")
    print("|---|---|---|---|---|---|---|")
    for target, stage, n, k, top, p50, p99, ttft, solo in rows:
        ratio = f"{ttft:.2f} / {solo:.2f} s ({ttft / solo:.2f}×)" if solo else f"{ttft:.2f} s / (not run)"
        print(f"| {target} | {stage} | {n:,} | {k} | {top * 1e3:.1f} ms | {p50 * 1e3:.2f} / {p99 * 1e3:.1f} ms "
              f"| {ratio} |")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__.split("\n\n")[1].splitlines()[0])
    sys.exit(main(Path(sys.argv[1])))
