"""Load shapes as generators: each yields the next stage and receives that stage's result.

That makes sweeps and adaptive searches the same thing: a context ramp ignores the result, a
max-context search bisects on it.  One generator runs per target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generator

from rundir.errors import ErrorKind

if TYPE_CHECKING:  # the scenario's load kinds build their stages from these (loadgen.scenario)
    from loadgen import scenario as sc


@dataclass(frozen=True)
class StageSpec:
    label: str
    users: int
    prompt_tokens: int | None = None
    """The one prompt length, or None with ``mix``."""
    mix: tuple[tuple[int, float], ...] = ()
    requests: int | None = None
    duration_s: float | None = None
    rate: float | None = None
    """Poisson arrivals per second (open loop), else closed loop."""
    seed: int = 0
    trace: tuple = ()
    """Or: the requests of a trace (loadgen.trace.TraceEntry), each sent at its time (open loop)."""
    speed: float = 1.0
    block_tokens: int = 512
    conversation: "sc.Conversation | None" = None
    """Or: multi-turn chat (closed loop, ``users`` conversations at a time)."""


@dataclass
class StageResult:
    requests: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    ttft_p50: float | None = None
    itl_p99: float | None = None
    tpot_p50: float | None = None
    goodput: int | None = None
    """Requests that met every SLO given (None when the scenario sets none)."""
    messages: list[str] = field(default_factory=list)
    e2e_max: float | None = None
    """The longest request that succeeded, start to last token (s)."""

    @property
    def error_rate(self) -> float:
        return 1 - self.ok / self.requests if self.requests else 0.0

    @property
    def crashed(self) -> bool:
        return self.errors.get(ErrorKind.CONNECTION.value, 0) > 0

    @property
    def failure_kind(self) -> str | None:
        if self.ok == self.requests and self.requests:
            return None
        return max(self.errors, key=self.errors.get) if self.errors else ErrorKind.SERVER_ERROR.value


Shape = Generator[StageSpec, StageResult, None]


def _probe(n: int, load: "sc.MaxContext") -> StageSpec:
    return StageSpec(f"probe={n}", 1, n, requests=load.requests_per_probe)


class Search:
    """The state of one max-context search, readable after the generator ends."""

    def __init__(self):
        self.max_ok: int | None = None
        self.min_fail: int | None = None
        self.failure_kind: str | None = None
        self.crashed = False
        self.probes: list[dict] = []
        self.converged = False
        self.max_tried: int | None = None
        self.known_ok: int | None = None


def bisect(load: "sc.MaxContext", search: Search | None = None, *, hint: int | None = None,
           cap: int | None = None, known_ok: int | None = None) -> Shape:
    """Double from ``min_tokens`` until a failure (or ``max_tokens``), then bisect between the
    longest success and the shortest failure until they are within ``tolerance``.  A lost
    connection (the server crashed) ends the search: the target is not hit again.

    ``hint``: the longest prompt the server says it takes (its max_model_len less the output):
    probed first, then one token more; when the first works and the second fails the search
    is done in two probes.  When the first fails, one ``tolerance`` below it is probed next
    (vLLM 0.26 on an H200 stalled a Llama prompt that filled its auto-fitted KV cache exactly,
    and served one 1% shorter): its success settles the search too; else it goes on as above
    with what they taught.  ``cap``: the
    target's own ``max_prompt_tokens``, which lowers ``max_tokens``.  ``known_ok``: the longest
    prompt that already worked on this server (an earlier load of the run): the doubling
    starts above it instead of at ``min_tokens``."""
    s = search or Search()
    top = min(load.max_tokens, cap) if cap else load.max_tokens
    if hint is not None and not load.min_tokens <= hint < top:
        hint = None
    queue = [hint, hint + 1] if hint is not None else []
    n = load.min_tokens
    if known_ok and known_ok >= load.min_tokens:
        s.max_ok = s.known_ok = min(known_ok, top)
        if s.max_ok >= top and not queue:
            s.converged = True
            return
        n = min(s.max_ok * 2, top)
    n = queue.pop(0) if queue else n
    for _ in range(load.max_probes):
        res = yield _probe(n, load)
        ok = res.failure_kind is None
        s.probes.append({"prompt_tokens": n, "ok": ok, "failure_kind": res.failure_kind})
        s.max_tried = max(s.max_tried or 0, n)
        if ok:
            s.max_ok = max(s.max_ok or 0, n)
        else:
            if s.min_fail is None or n < s.min_fail:
                s.min_fail, s.failure_kind = n, res.failure_kind
            if res.crashed:
                s.crashed = True
                return
        if queue and ok:  # the hint worked: try one more token
            n = queue.pop(0)
            continue
        if queue and not ok:  # the declared limit failed: the real one is most often just below it
            queue = []
            below = min(n - 1, math.ceil(n / (1 + load.tolerance)))  # within tolerance of n
            if below > (s.max_ok or 0) and below >= load.min_tokens:
                n = below
                continue
        queue = []
        if s.max_ok is None:
            if n > load.min_tokens:  # the hint failed: start again from the shortest
                n = load.min_tokens
                continue
            return  # even the shortest failed
        if s.min_fail is None:
            if n >= top:
                s.converged = True
                return
            n = min(n * 2, top)
            continue
        if (s.min_fail - s.max_ok) <= max(1, load.tolerance * s.max_ok):
            s.converged = True
            return
        n = (s.max_ok + s.min_fail) // 2


def probe_timeout(served: dict[int, float], n: int, ceiling: float, *, factor: float = 3.0,
                  floor_s: float = 60.0) -> float:
    """How long a probe of ``n`` prompt tokens may take before it counts as failed (timeout).

    ``served``: prompt length -> the longest request (s) of a stage this target served in
    full at batch 1.  The probe's time is extrapolated from the two longest of them by a power
    law whose exponent is held within 1..2 (prefill grows linearly for an SSM, up to
    quadratically for attention); the probe gets ``factor`` times that plus ``floor_s``, never
    more than ``ceiling`` (the scenario's ``request_timeout_s``), and the whole ``ceiling``
    when nothing was served yet.  A request a server never finishes (a stall at its memory's
    edge) then costs minutes, not the full request timeout."""
    points = sorted((length, t) for length, t in served.items() if length > 0 and t > 0)
    if not points:
        return ceiling
    (l2, t2) = points[-1]
    p = 2.0
    if len(points) >= 2:
        (l1, t1) = points[-2]
        p = min(2.0, max(1.0, math.log(max(t2, 1e-9) / max(t1, 1e-9)) / math.log(l2 / l1)))
    est = t2 * (n / l2) ** p if n > l2 else t2
    return min(ceiling, factor * est + floor_s)
