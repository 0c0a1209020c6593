"""``ctxload report`` and ``ctxload compare`` as a user runs them."""

from __future__ import annotations

import subprocess
import sys

from analysis import synthetic


def ctxload(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "ctxload", *map(str, args)], capture_output=True,
                          text=True, timeout=180, cwd=cwd)


def test_report_and_compare_commands(tmp_path):
    spec = synthetic.SyntheticRun(lengths=(256, 512, 1024, 2048), concurrency_levels=(1, 2))
    a = synthetic.write(tmp_path / "runs" / "a", spec)
    b = synthetic.write(tmp_path / "runs" / "b", synthetic.SyntheticRun(seed=5, lengths=spec.lengths))
    p = ctxload("report", a)
    assert p.returncode == 0, p.stderr
    assert str(a / "report" / "report.html") in p.stdout
    for name in ("report.html", "report.md", "summary.csv", "summary.parquet", "ttft_vs_prompt.png"):
        assert (a / "report" / name).stat().st_size > 0
    p = ctxload("compare", a, b)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "runs" / "compare-a-b" / "compare.html").exists()


def test_user_mistakes_exit_2_naming_the_argument(tmp_path):
    p = ctxload("report", tmp_path / "nope")
    assert p.returncode == 2 and "RUN: no run directory" in p.stderr
    a = synthetic.write(tmp_path / "a", synthetic.SyntheticRun(lengths=(64, 128)))
    p = ctxload("compare", a)
    assert p.returncode == 2 and "at least two" in p.stderr
