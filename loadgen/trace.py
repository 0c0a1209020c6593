"""Request traces to replay (a scenario's ``trace`` load): when each request came, how long its
prompt and its output were, and which blocks of its prompt it shared with others.

The format is the Mooncake traces' (FAST'25, kvcache-ai/Mooncake ``traces/``): JSON lines of

============== ======================================================================
``timestamp``  milliseconds since the trace's start (need not be sorted; replay sorts)
``input_length``  prompt tokens
``output_length`` tokens to generate
``hash_ids``   one id per block of ``block_tokens`` prompt tokens (512 in Mooncake's), in
               order; two requests with the same id at the same position share that block's
               tokens (and so can share a prefix cache's)
============== ======================================================================

A line that is not such an object, or whose ``hash_ids`` do not cover its ``input_length``, is
named ``file:line: why`` and skipped; the rest replays.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from rundir.jsonl import read_jsonl

SHIPPED = Path(__file__).resolve().parent / "data" / "example_trace.jsonl"
"""A small generated trace in this format (``path: shipped``): docs/scenarios.md says how."""


@dataclass(frozen=True)
class TraceEntry:
    at_s: float
    """Seconds after the trace's first request."""
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]
    shared_tokens: int = 0
    """Its leading tokens in blocks an earlier request of the trace began with too: what a
    prefix cache could reuse when every earlier request was served."""


def _int(obj: dict, key: str, least: int) -> int:
    v = obj.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < least:
        raise ValueError(f"{key} must be an integer ≥ {least}, not {v!r}")
    return v


def read(path: str | Path, block_tokens: int = 512) -> tuple[list[TraceEntry], list[str]]:
    """The trace's requests in time order, and the problems of the lines skipped."""
    p = SHIPPED if str(path) == "shipped" else Path(path)
    problems: list[str] = []

    def parse(obj: dict) -> tuple:
        ts = obj.get("timestamp")
        if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts) or ts < 0:
            raise ValueError(f"timestamp must be milliseconds ≥ 0, not {ts!r}")
        n, out = _int(obj, "input_length", 1), _int(obj, "output_length", 1)
        ids = obj.get("hash_ids")
        if not isinstance(ids, list) or not all(isinstance(h, int) and not isinstance(h, bool) for h in ids):
            raise ValueError("hash_ids must be a list of integers")
        if len(ids) != math.ceil(n / block_tokens):
            raise ValueError(f"{len(ids)} hash_ids for {n} tokens; blocks of {block_tokens} need "
                             f"{math.ceil(n / block_tokens)}")
        return float(ts) / 1e3, n, out, tuple(ids)

    rows = [(ts, i, n, o, ids) for i, (ts, n, o, ids) in enumerate(read_jsonl(p, parse, problems))]
    rows.sort()
    t0 = rows[0][0] if rows else 0.0
    seen: set[tuple[int, ...]] = set()
    out = []
    for ts, _i, n, o, ids in rows:
        k = 0  # leading blocks whose whole prefix an earlier request had
        while k < len(ids) and ids[:k + 1] in seen:
            k += 1
        full = n // block_tokens  # a partial last block is never reused
        shared = min(k, full) * block_tokens
        for j in range(1, len(ids) + 1):
            seen.add(ids[:j])
        out.append(TraceEntry(ts - t0, n, o, ids, shared))
    return out, problems


def synthesize(requests: int = 48, seed: int = 0, block_tokens: int = 512, documents: int = 4,
               rate: float = 2.0) -> list[dict]:
    """A Mooncake-format trace of ``requests`` Poisson arrivals at ``rate``/s: each asks about
    one of ``documents`` shared documents (1–6 blocks), then a question of its own (a partial
    block or two), the shipped example (``python -m loadgen.trace > loadgen/data/example_trace.jsonl``)."""
    import random

    rng = random.Random(seed)
    docs = [list(range(1000 * (d + 1), 1000 * (d + 1) + rng.randint(1, 6))) for d in range(documents)]
    t, next_id, out = 0.0, 1_000_000, []
    for _ in range(requests):
        t += rng.expovariate(rate)
        doc = rng.choice(docs)
        tail = rng.randint(1, 2 * block_tokens - 1)
        n = len(doc) * block_tokens + tail
        own = list(range(next_id, next_id + math.ceil(tail / block_tokens)))
        next_id += len(own)
        out.append({"timestamp": round(t * 1e3), "input_length": n, "output_length": rng.choice((16, 32, 64, 128)),
                    "hash_ids": doc + own})
    return out


if __name__ == "__main__":
    for row in synthesize():
        print(json.dumps(row))
