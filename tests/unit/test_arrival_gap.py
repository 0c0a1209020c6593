"""benchmarks/gpu/arrival_gap.py: the decoding streams' largest gap while a long prompt waits for
its first token, from a run's requests.jsonl."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu" / "arrival_gap.py"


def _rec(target, stage, prompt, start, ttft, itl, status="ok"):
    return dict(target=target, stage=stage, status=status, prompt_tokens_requested=prompt, start_time=start,
                ttft_s=ttft, itl_s=itl)


def _run(tmp_path, recs):
    (tmp_path / "requests.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True, timeout=60)


def test_counts_only_the_gaps_that_end_while_the_long_prompt_waits(tmp_path):
    # two streams from t=100.1: a 0.3 s gap ending at 102.4 (before the arrival at 103) and a
    # 0.05 s gap ending at 104.05 (while the long prompt waits, until 109); the long prompt's
    # TTFT alone (the median of its context_sweep stage) 5 s
    before = [0.002] * 1000 + [0.3] + [0.002] * 2000
    during = [0.002] * 1975 + [0.05] + [0.002] * 2000
    out = _run(tmp_path, [
        _rec("a", "trace", 1024, 100.0, 0.1, before), _rec("a", "trace", 1024, 100.0, 0.1, during),
        _rec("a", "trace", 1 << 20, 103.0, 6.0, [0.002] * 15),
        _rec("a", "prompt=1048576", 1 << 20, 50.0, 4.0, []), _rec("a", "prompt=1048576", 1 << 20, 60.0, 6.0, []),
        _rec("a", "trace", 1024, 100.0, None, [], status="error"),
    ])
    assert out.returncode == 0, out.stderr
    row = [line for line in out.stdout.splitlines() if line.startswith("| a |")]
    assert row == ["| a | trace | 1,048,576 | 2 | 50.0 ms | 2.00 / 2.0 ms | 6.00 / 5.00 s (1.20×) |"]


def test_a_run_without_such_a_stage_says_so(tmp_path):
    out = _run(tmp_path, [_rec("a", "s", 1024, 0.0, 0.1, [0.01]), _rec("a", "s", 2048, 0.0, 0.1, [0.01])])
    assert out.returncode == 1 and "no stage where one prompt arrives" in out.stdout
