"""What a run shows while it runs: a live line per stage in a terminal, plain lines elsewhere."""

from __future__ import annotations

import io
import time
from types import SimpleNamespace

from rich.console import Console

from loadgen.progress import HEARTBEAT_S, Progress


def test_a_terminal_gets_one_live_line_per_stage_and_the_messages_above_it():
    out = io.StringIO()
    counts = SimpleNamespace(total=5, errors=1)  # the controller's running totals
    p = Progress(counts, say=None, live=True, console=Console(file=out, force_terminal=True, width=120))
    p.stage("qwen prompt=1024", 3)
    counts.total, counts.errors = 7, 2  # two requests of this stage, one failed
    p.tick()
    p.message("qwen prompt=1024: 2/3 ok")
    p.close()
    text = out.getvalue()
    assert "qwen prompt=1024" in text and "2/3" in text and "1 errors" in text
    assert "qwen prompt=1024: 2/3 ok" in text


def test_a_file_gets_the_messages_and_a_heartbeat_only_on_a_long_stage():
    lines: list[str] = []
    counts = SimpleNamespace(total=0, errors=0)
    p = Progress(counts, say=lines.append, live=False)
    p.stage("llama probe=678096", 1)
    for _ in range(5):
        p.tick()
    assert lines == []  # a short stage: its start and end are the runner's own lines
    p.last_beat = p.t0 = time.monotonic() - HEARTBEAT_S - 1  # a minute in
    p.tick()
    p.tick()
    assert len(lines) == 1 and lines[0].startswith("  llama probe=678096: 0/1 requests, 0 errors, 6")
    p.end_stage()
    p.last_beat = time.monotonic() - 2 * HEARTBEAT_S
    p.tick()
    assert len(lines) == 1  # nothing between stages
    p.message("done")
    assert lines[-1] == "done"
