"""Read torch.profiler Chrome traces into a table of kernels (or CPU ops) and their time.

The traces are what ``torch.profiler`` writes with ``export_chrome_trace`` or
``tensorboard_trace_handler`` (``*.pt.trace.json``, or ``.json.gz``), which is also what vLLM
writes when started with ``--profiler-config '{"profiler": "torch", "torch_profiler_dir": …}'``
between ``POST /start_profile`` and ``POST /stop_profile``.

* A trace with GPU activity: the ``"ph": "X"`` events of categories ``kernel``, ``gpu_memcpy``
  and ``gpu_memset`` (kineto's spellings; old traces capitalise them), each timed by its
  duration. Kernels of concurrent streams overlap, so the total is device busy time summed
  over streams, as ``torch.profiler``'s own "CUDA total" is.
* A CPU-only trace: the ``cpu_op`` events (``aten::mm``, ``_C::onednn_mm``, …), each timed by
  its *self* time: its duration less the durations of the ``cpu_op`` events nested directly in
  it on the same pid/tid (events nest by ``[ts, ts + dur]``). ``python_function``,
  ``user_annotation`` and the other categories are not ops and are ignored (they do not take
  part in the nesting either).

Times in the trace are microseconds; the table is in seconds.

vLLM marks each engine step with a ``user_annotation`` named
``execute_context_<prefills>(<tokens>)_generation_<decodes>(<tokens>)``: the table counts them
(``steps``, the steps with work), so a decode window's step count comes from the server's own
trace, not from a stream that may bunch tokens.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

#: Categories of device activity (lower case: old traces write ``Kernel``, ``Memcpy``…).
GPU_CATEGORIES = frozenset({"kernel", "gpu_memcpy", "gpu_memset", "memcpy", "memset"})
CPU_OP = "cpu_op"
TRACE_SUFFIXES = (".json", ".json.gz")
#: vLLM's annotation of one engine step (v1 model runner, 0.26 and 0.32 alike).
VLLM_STEP = re.compile(r"^execute_context_(\d+)\((\d+)\)_generation_(\d+)\((\d+)\)$")


def load(path: str | os.PathLike) -> dict[str, Any]:
    """The trace's JSON object (``.gz`` decompressed); a bare event list is wrapped as
    ``{"traceEvents": [...]}`` (the Chrome trace format allows both)."""
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        data = json.load(f)
    if isinstance(data, list):
        data = {"traceEvents": data}
    return data


def kernel_table(path: str | os.PathLike) -> dict[str, Any]:
    """The kernels (GPU trace) or CPU ops (CPU-only trace) of the trace at ``path``.

    Returns ``{"device": "cuda" | "cpu", "total_s": float, "kernels": [{"name", "count",
    "time_s"}, …], "steps": int | None}``, kernels aggregated by name and sorted by time,
    largest first; ``total_s`` is the sum of their times; ``steps`` the engine steps with work
    the trace's annotations mark (vLLM's), None where it has none.
    """
    return table_from_events(load(path).get("traceEvents") or [])


def table_from_events(events: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """:func:`kernel_table` of an already loaded event list."""
    events = [e for e in events if isinstance(e, dict) and e.get("ph") == "X"]
    marks = [VLLM_STEP.match(str(e.get("name", ""))) for e in events if e.get("cat") == "user_annotation"]
    marks = [m for m in marks if m]
    steps = sum(1 for m in marks if int(m.group(2)) + int(m.group(4)) > 0) if marks else None
    gpu = [e for e in events if str(e.get("cat", "")).lower() in GPU_CATEGORIES]
    if gpu:
        device = "cuda"
        timed = ((e.get("name", ""), float(e.get("dur") or 0.0)) for e in gpu)
    else:
        device = "cpu"
        timed = self_times([e for e in events if e.get("cat") == CPU_OP])
    count: dict[str, int] = defaultdict(int)
    time_us: dict[str, float] = defaultdict(float)
    for name, t in timed:
        count[name] += 1
        time_us[name] += t
    kernels = [{"name": n, "count": count[n], "time_s": time_us[n] / 1e6} for n in time_us]
    kernels.sort(key=lambda k: (-k["time_s"], k["name"]))
    return {"device": device, "total_s": sum(k["time_s"] for k in kernels), "kernels": kernels, "steps": steps}


def self_times(ops: list[dict[str, Any]]) -> list[tuple[str, float]]:
    """``(name, self time in µs)`` of each event: its duration less those of the events nested
    directly inside it on the same pid/tid. O(n log n): per thread, events sorted by start
    (an enclosing event before the events it encloses) are walked with a stack of the open
    ones. A child that overruns its parent's end by rounding still counts as its child; self
    time is never negative."""
    by_thread: dict[tuple[Any, Any], list[dict[str, Any]]] = defaultdict(list)
    for e in ops:
        by_thread[(e.get("pid"), e.get("tid"))].append(e)
    out: list[tuple[str, float]] = []
    for evs in by_thread.values():
        evs.sort(key=lambda e: (float(e.get("ts", 0.0)), -float(e.get("dur") or 0.0)))
        child = [0.0] * len(evs)
        stack: list[tuple[float, int]] = []  # (end, index) of the open events
        for i, e in enumerate(evs):
            ts = float(e.get("ts", 0.0))
            dur = float(e.get("dur") or 0.0)
            while stack and stack[-1][0] <= ts:
                stack.pop()
            if stack:
                child[stack[-1][1]] += dur
            stack.append((ts + dur, i))
        for i, e in enumerate(evs):
            out.append((e.get("name", ""), max(0.0, float(e.get("dur") or 0.0) - child[i])))
    return out


def is_trace_file(path: str | os.PathLike) -> bool:
    return Path(path).name.endswith(TRACE_SUFFIXES)


def new_traces(directory: str | os.PathLike, before: set[str]) -> list[Path]:
    """Trace files (``*.json``, ``*.json.gz``) in ``directory`` whose names are not in
    ``before`` (the names listed before a profile was taken), oldest first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if p.is_file() and is_trace_file(p) and p.name not in before]
    return sorted(found, key=lambda p: (p.stat().st_mtime, p.name))


def trace_names(directory: str | os.PathLike) -> set[str]:
    """The names of the trace files in ``directory`` now: the ``before`` of :func:`new_traces`."""
    d = Path(directory)
    return {p.name for p in d.iterdir() if p.is_file() and is_trace_file(p)} if d.is_dir() else set()
