"""Display units: one formatter for every time, token count and size in the report."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from analysis import units
from analysis.report import write_report

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "runs" / "h100-context-sweep"
EXPONENT = re.compile(r"\b\d(\.\d+)?e[+-]\d+\b")  # 2.93e+04, 5.6e-09


@pytest.mark.parametrize("seconds, text", [
    (0.121, "121 ms"), (0.0009, "0.9 ms"), (5.65, "5.65 s"), (76.1, "76.1 s"), (1234.5, "1,234 s"),
    (0.02483, "24.8 ms"), (0.0007, "0.7 ms"), (0.00001234, "0.0123 ms"), (1.0, "1 s"),
    (0.99996, "1 s"), (0.9994, "999 ms"), (29.31, "29.3 s"), (0.0, "0 ms"), (None, "—"),
    (-5.6e-09, "−<0.001 ms"), (1.3e-4, "0.13 ms")])
def test_duration_reads_in_ms_below_a_second_and_seconds_above(seconds, text):
    assert units.duration(seconds) == text


@pytest.mark.parametrize("n, text", [(1024, "1K"), (32768, "32K"), (262144, "256K"), (262000, "262,000"),
                                     (7550.4, "7,550"), (100, "100"), (1048576, "1,024K"), (None, "?")])
def test_tokens(n, text):
    assert units.tokens(n) == text


def test_no_exponent_anywhere_in_sig():
    for x in (1e-9, 3.2e-5, 0.5, 12.0, 1e3, 1.5e6, 2.2e12):
        assert "e" not in units.sig(x), x
    assert units.gb(12.6e9) == "12.6 GB" and units.size(3.46e6) == "3.46 MB"
    assert units.ratio(38.2) == "38.2×" and units.percent(-0.64, signed=True) == "−64%"


def test_recorded_report_has_no_exponent_and_times_carry_units(tmp_path):
    run = tmp_path / "h100"
    shutil.copytree(FIXTURE, run)
    write_report(run)
    md = (run / "report" / "report.md").read_text()
    html = (run / "report" / "report.html").read_text()
    body = re.sub(r'src="data:image/png;base64,[^"]*"', "", html)
    assert not EXPONENT.search(md), EXPONENT.search(md)
    assert not EXPONENT.search(body)
    # mamba2-780m's TTFT at 32K, 29.3 s (old report: 2.93e+04 in a "ms" column)
    assert "| 29.3 s |" in md and "2.93e+04" not in md
    assert "TTFT p50 ms" not in md  # the unit is in the cell, not the header
