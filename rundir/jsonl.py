"""Reading a JSON-lines file of the run directory (or a trace) leniently, defined once: each
line that is not a JSON object, or that ``parse`` refuses, is named ``file:line: why`` and
skipped; the rest is read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable


def read_jsonl(path: Path, parse: Callable[[dict], object], problems: list[str]) -> list:
    """Parsed records of a JSON-lines file; each bad line is named in ``problems``."""
    path = Path(path)
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError("not a JSON object")
                out.append(parse(obj))
            except (ValueError, TypeError, KeyError) as e:
                msg = str(e).splitlines()[0][:160]
                problems.append(f"{path.name}:{i}: skipped ({type(e).__name__}: {msg})")
    return out
