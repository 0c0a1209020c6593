"""One line of ``operators.jsonl``, defined once: loadgen's profile pass writes it, analysis
reads it (docs/contracts.md). A target × prompt length × phase of a profile pass: every kernel
of the traces the server wrote for it, summed by name, and what the client saw.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

SCHEMA_VERSION = 1
PHASES = ("prefill", "decode")


#: Who counts the engine steps a profile took, and how a table says so.
STEPS_SOURCES = {"server": "server's count", "trace": "the trace's step marks",
                 "stream": "streamed tokens"}


@dataclass
class OperatorRecord:
    target: str
    prompt_tokens: int
    phase: str
    """``prefill`` (a request for one token) or ``decode`` (a window of decode steps)."""
    engine: str | None = None
    device: str | None = None
    """``cuda`` (GPU kernels, copies and sets) or ``cpu`` (operators by self time); None when
    nothing was traced."""
    kernels: list[dict] = field(default_factory=list)
    """``{"name", "count", "time_s"}`` of every kernel, by time, descending."""
    total_s: float | None = None
    steps: int | None = None
    """Engine steps while the profiler ran (``steps_source`` says who counted them)."""
    steps_source: str | None = None
    """Who counted them: a key of :data:`STEPS_SOURCES`."""
    window_s: float | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    completion_tokens: int | None = None
    traces: list[str] = field(default_factory=list)
    """Raw trace files kept (``profile.keep_traces``)."""
    error: str | None = None
    """Why nothing (or not all) was traced."""
    time: float = field(default_factory=time.time)
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "OperatorRecord":
        """Lenient: unknown fields are ignored; a line that cannot be placed raises ValueError
        (or KeyError, TypeError), which a reader reports as ``file:line``."""
        if obj.get("phase") not in PHASES:
            raise ValueError(f"phase {obj.get('phase')!r} is not prefill or decode")
        kernels = obj.get("kernels") or []
        for k in kernels:
            t = k.get("time_s")
            if not isinstance(k.get("name"), str) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
                raise ValueError("a kernel lacks its name or a time_s ≥ 0")
        known = {f for f in cls.__dataclass_fields__}
        out = cls(**{k: v for k, v in obj.items() if k in known})
        out.target, out.prompt_tokens = str(out.target), int(out.prompt_tokens)
        out.traces = list(out.traces or [])
        return out
