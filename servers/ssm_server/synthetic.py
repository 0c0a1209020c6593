"""The synthetic engine: tokens on a set schedule, no model.

The reference server for load-generator fidelity: token k of a request (k = 0, 1, …) is sent
at ``admission + ttft + k * itl``, an absolute deadline on the event loop's monotonic clock,
so scheduling jitter never accumulates. Admission is when the request gets a slot: a request
that queued for one then streams at the set pace, as a real server's would, instead of sending
every token it "owes" at once (``--schedule-from arrival`` counts from its arrival instead,
which holds the client's whole-request latency to the schedule). Each stream is one small coroutine; hundreds run at
once. Slots, queue bound, metrics and errors behave as the model engine's do.
"""

from __future__ import annotations

import asyncio
import collections
import time

from servers.ssm_server.protocol import APIError
from servers.ssm_server.request import Event, Request

_OUTPUT_WORDS = ("token", "stream", "state", "space", "model", "serve", "load", "test")


class SyntheticBackendInfo:
    """What the metrics and the API ask of a backend."""

    device = None
    state_bytes = 0
    kv_bytes_per_token = 0
    exact_chunking = True

    def __init__(self, num_slots: int, max_model_len: int):
        self.num_slots = num_slots
        self.max_model_len = max_model_len


class SyntheticEngine:
    def __init__(self, text, metrics, *, ttft_s: float, itl_s: float, max_num_seqs: int,
                 max_queue: int, max_model_len: int, model_name: str, from_arrival: bool = False):
        self.text = text
        self.m = metrics
        self.ttft_s = ttft_s
        self.itl_s = itl_s
        self.max_queue = max_queue
        self.max_model_len = max_model_len
        self.model_name = model_name
        self.from_arrival = from_arrival
        self.b = SyntheticBackendInfo(max_num_seqs, max_model_len)
        self.running: set[Request] = set()
        self.waiting: collections.deque[Request] = collections.deque()
        self._tasks: set[asyncio.Task] = set()

    ready = True  # nothing to compile
    stopped = None  # no loop of its own to fail

    async def start(self) -> None:
        pass

    async def warm_up(self) -> float:
        return 0.0

    async def stop(self) -> None:
        for t in list(self._tasks):
            t.cancel()

    def submit(self, req: Request) -> None:
        if len(self.running) < self.b.num_slots:
            self._start(req)
        elif len(self.waiting) >= self.max_queue:
            self.m.failure.labels(self.model_name, "rejected").inc()
            raise APIError(429, f"request queue is full ({self.max_queue} waiting); retry later",
                           headers={"Retry-After": "1"})
        else:
            self.waiting.append(req)

    def cancel(self, req: Request) -> None:
        if req.finished:
            return
        req.cancelled = True
        if req in self.waiting:
            self.waiting.remove(req)
        self.m.failure.labels(self.model_name, "cancelled").inc()
        self._finish(req)

    def state(self) -> dict[str, float]:
        return {"ssm:num_requests_running": len(self.running),
                "ssm:num_requests_waiting": len(self.waiting),
                "ssm:state_slots_used": len(self.running),
                "ssm:state_slots_total": self.b.num_slots}

    def _start(self, req: Request) -> None:
        self.running.add(req)
        req.t_scheduled = time.perf_counter()
        self.m.queue.labels(self.model_name).observe(req.t_scheduled - req.created)
        task = asyncio.get_running_loop().create_task(self._stream(req))
        req.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _finish(self, req: Request) -> None:
        if req in self.running:
            self.running.discard(req)
            task = getattr(req, "task", None)
            if task is not None and task is not asyncio.current_task():
                task.cancel()
            while self.waiting and len(self.running) < self.b.num_slots:
                self._start(self.waiting.popleft())

    async def _stream(self, req: Request) -> None:
        loop = asyncio.get_running_loop()
        # the request's admission (or arrival) on the loop's clock
        t0 = loop.time() - (time.perf_counter() - (req.created if self.from_arrival else req.t_scheduled))
        name = self.model_name
        self.m.prompt_tokens.labels(name).inc(req.prompt_len)
        n = req.params.max_tokens
        try:
            for k in range(n):
                delay = t0 + self.ttft_s + k * self.itl_s - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                now = time.perf_counter()
                if k == 0:
                    req.t_first = now
                    self.m.ttft.labels(name).observe(now - req.created)
                    self.m.prefill.labels(name).observe(now - req.t_scheduled)
                else:
                    self.m.itl.labels(name).observe(now - req.t_last)
                req.t_last = now
                req.generated.append(k)
                self.m.generation_tokens.labels(name).inc()
                word = _OUTPUT_WORDS[k % len(_OUTPUT_WORDS)]
                last = k == n - 1
                if last:
                    req.finished = "length"
                    self.m.success.labels(name, "length").inc()
                    self.m.e2e.labels(name).observe(now - req.created)
                # the last token's event carries the finish reason (one SSE chunk, as vLLM)
                req.out.put_nowait(Event("token", text=(" " if k else "") + word, token_id=k,
                                         finish_reason="length" if last else None))
        finally:
            self._finish(req)
