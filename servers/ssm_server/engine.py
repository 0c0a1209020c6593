"""The scheduler: one task owns the model; requests queue for state slots.

Every step runs on one worker thread (the device thread) and does:
  1. drop cancelled requests, freeing their slots;
  2. grant free slots to waiting requests, in arrival order;
  3. one batched decode step of every request already decoding, and one prefill: a chunk (at
     most ``prefill_chunk_size`` tokens; ``prefill_chunk_size_decoding`` while other streams
     decode, for a prompt longer than that) of the oldest request still prefilling — or, when
     its whole prompt fits in that budget and the backend packs (``PackedPrefill``), the whole
     prompts of every fresh request waiting after it that still fit, in one forward (a burst of
     short prompts costs one prefill, not one step each);
  4. sample, detokenize, check stop conditions, and hand tokens to the HTTP handlers.

Prefill overlap (``prefill_overlap=True``, ``--prefill-overlap``; off by default): the prefill
chunk runs on a second thread of its own, beside the decode steps, not in them — on CUDA on a
stream of its own at low priority (the backend's ``prefill_thread`` / ``device_thread``), the
decode steps on a high-priority one. A prompt arriving then costs the running streams a share
of the device while it prefills, not a stall of one chunk per token (launching a chunk's few
hundred kernels alone takes longer than a decode step) — but the prompts wait longer: on an
H200 the 64-stream ITL p99 fell from 103 to 2.5 ms and the TTFT p50 rose from 0.53 to 7.2 s
(docs/ssm-server.md). One chunk is in flight at a time; its request's first token is sampled
on that thread. The two threads touch different state slots: a slot is prefilled only by the
request that holds it and decoded only once its prefill is done (the backend orders a new
prefill after any decode step still in flight that used its slot).

With a backend that can launch a decode step without waiting for it (``decode_launch`` /
``decode_collect``: the native mamba_ssm backend, whose graph feeds each slot's last sampled
token to the next step on the device), the loop is pipelined: one call on the device thread
launches step N+1 and then collects step N's tokens, and the event loop emits them (detokenize,
stop checks, metrics, SSE writes) while step N+1 runs. A request that stops at step N has
therefore already been scheduled into step N+1; that extra token is discarded (its slot is free
for the next request, whose prefill the stream orders after that step). Requests known to end
at their in-flight token (max_tokens / max_model_len) are left out of the next step. Seeded
requests (host-side generators) and the transformers backend run synchronously.

A step that holds decoding streams longer than ``slow_step_s`` (50 ms: the gap the issue "ssm-server
under real traffic" allows a stream while a long prompt arrives) is logged with what it held —
the streams, the prefill beside them — and so is a wait that long between two such steps (the
event loop's own work), so a token gap a load test sees can be found in the server log.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import sys
import time

import torch

from servers.ssm_server.protocol import APIError
from servers.ssm_server.protocols import DeviceSampling, PackedPrefill, PipelinedBackend
from servers.ssm_server.request import Event, Request
from servers.ssm_server.sampling import new_generator, sample, sample_tensor
from servers.ssm_server.stall import StallWatch
from servers.ssm_server.textio import Detokenizer

log = logging.getLogger("ssm_server")

DECODING_CHUNK = 4096
"""``--prefill-chunk-size-decoding``'s default (capped by ``--prefill-chunk-size``): on an H200 a
4,096-token continuation chunk takes ~25 ms beside a decode step, and a 1M-token prompt taken
so gets its first token 1.2× later than alone (docs/ssm-server.md)."""


class Engine:
    def __init__(self, backend, text, metrics, *, max_queue: int, prefill_chunk_size: int,
                 model_name: str, prefill_chunk_size_decoding: int | None = None,
                 prefill_overlap: bool = False):
        self.b = backend
        self._pipelined = isinstance(backend, PipelinedBackend)
        self._device_sampling = isinstance(backend, DeviceSampling)
        self._packs = isinstance(backend, PackedPrefill)
        self.text = text
        self.m = metrics
        self.model_name = model_name
        self.max_queue = max_queue
        self.chunk = prefill_chunk_size if backend.exact_chunking else 1 << 62
        # while other streams decode: a smaller chunk keeps their gaps short (a backend that
        # cannot split a prompt exactly prefills it whole either way)
        self.chunk_decoding = min(self.chunk, prefill_chunk_size_decoding or DECODING_CHUNK) \
            if backend.exact_chunking else self.chunk
        self.prefill_chunk_size = prefill_chunk_size
        self.max_model_len = backend.max_model_len
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.free_slots = list(range(backend.num_slots - 1, -1, -1))
        self._wake = asyncio.Event()
        # the device thread's own stream only beside a prefill thread: without the overlap, the
        # steps stay on PyTorch's default stream, as they were measured
        self._pool = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="device",
            initializer=getattr(backend, "device_thread", None) if prefill_overlap else None)
        self.prefill_overlap = prefill_overlap
        self._prefill_pool = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="prefill", initializer=getattr(backend, "prefill_thread", None)) \
            if prefill_overlap else None
        self._prefilling: tuple[list[Request], asyncio.Future] | None = None
        """The overlapped prefill in flight: (its requests, the future)."""
        self._task: asyncio.Task | None = None
        self.stall = StallWatch(lambda: bool(self.running or self.waiting))
        """Logs every thread's stack when the engine holds requests and no work of it ends."""
        self.steps = 0
        self.slow_step_s = 0.05
        """A step holding decoding streams longer than this is logged (``_log_slow``)."""
        self._firsts: list[tuple[list[Request], torch.Tensor, torch.cuda.Event]] = []
        """First tokens sampled on the device and not yet read back: (requests, pinned host
        tensor the tokens are copied into, the copy's event) — see ``_defer_first``."""
        self.step_work_s = 0.0
        """The last step's own time on the device thread (of its wall time in the loop)."""
        self.step_phases: list[tuple[str, float]] = []
        """The last step's own time by part, [(part, seconds)] in the order they ran: what a
        slow step's log line splits its work into."""
        model = getattr(backend, "model", None)
        self.weight_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())) \
            if model is not None else 0
        self.cache_peak = 0
        """The most KV cache + recurrent state its sequences held at once since start (bytes)."""
        name = model_name
        self._eos = text.eos_token_id
        self._ttft, self._itl = metrics.ttft.labels(name), metrics.itl.labels(name)
        self._prefill_h, self._e2e = metrics.prefill.labels(name), metrics.e2e.labels(name)
        self._gen_tokens = metrics.generation_tokens.labels(name)
        self._prompt_tokens = metrics.prompt_tokens.labels(name)
        self._steps, self._busy = metrics.engine_steps.labels(name), metrics.engine_busy.labels(name)
        self._collect_wait = metrics.engine_collect_wait.labels(name)
        self._queue = metrics.queue.labels(name)

    # ---- interface used by the HTTP layer --------------------------------------------------
    async def start(self) -> None:
        if self.prefill_overlap:
            # the device thread waits for the GIL while the prefill thread launches kernels:
            # hand it over within 1 ms, not Python's 5
            sys.setswitchinterval(min(sys.getswitchinterval(), 0.001))
        self._task = asyncio.create_task(self._loop(), name="engine")
        self._task.add_done_callback(self._loop_ended)
        self.stall.start()

    def _loop_ended(self, task: asyncio.Task) -> None:
        """The loop ends only when stopped; an error in it (a defect) would leave every stream
        waiting for tokens that never come. Say so in the log, fail every request, and answer
        /health and new requests 503 with why."""
        if task.cancelled() or task.exception() is None:
            return
        e = task.exception()
        self.stopped = f"{type(e).__name__}: {e}"
        log.critical("the engine loop stopped: %s; failing every request (restart the server)", self.stopped,
                     exc_info=e)
        self.ready = False
        reqs = list(self.running) + list(self.waiting)
        self.waiting.clear()
        self._fail(reqs, "error", f"the engine stopped ({self.stopped})")

    stopped: str | None = None
    """Why the engine loop failed (None while it serves)."""

    ready = False
    """Warm: every kernel the first requests would compile has run (``warm_up``)."""

    async def warm_up(self) -> float:
        """Run the engine's whole path once before any client: a full prefill chunk followed by
        a short one that starts from the state it carried, a short prompt alone, then decode
        steps of both at once, one greedy and one sampled — so compiling and autotuning happen
        here, not in the first requests. (The carried state matters: Triton autotunes a kernel
        again when its arguments change, and mamba_ssm's state passing takes an initial state
        only from a prompt's second chunk on: on an H200 the first prompt longer than one chunk
        paid for it — 1.56 s at 64K against 1.39 s at 128K, and a profiled 128K prefill showed
        Triton's benchmark launches, 3,663 state-passing kernels for 192 and 2,779 cache fills.)
        Kept out of every metric. Returns the seconds it took; the server sets ``ready`` once its
        own warm-up (``api.Server._warm_up``) is done."""
        from servers.ssm_server.sampling import SamplingParams

        t0 = time.perf_counter()
        full = max(1, min(self.prefill_chunk_size + 17, self.max_model_len - 8))
        short = min(17, full)
        # then two short prompts at once: packed into one prefill where the backend packs
        for phase in (((full, {"temperature": 0.0}), (short, {"temperature": 1.0, "seed": 0})),
                      ((short, {"temperature": 0.0}), (max(1, short - 8), {"temperature": 0.0}))):
            reqs = [Request([1 + i % 7 for i in range(n)], SamplingParams(max_tokens=4, ignore_eos=True, **kw),
                            internal=True) for n, kw in phase]
            for r in reqs:
                self.submit(r)
            for r in reqs:
                while (ev := await r.out.get()).kind == "token" and not ev.finish_reason:
                    pass
                if ev.kind == "error":
                    log.warning("warm-up request failed: %s", ev.text)
        took = time.perf_counter() - t0
        log.info("warmed up in %.2f s (prefill %d tokens in %d chunk(s), %d tokens alone, two short prompts "
                 "at once; 4 decode steps of 2 streams each time)", took, full, -(-full // self.chunk), short)
        return took

    async def stop(self) -> None:
        self.stall.stop()
        if self._task:
            self._task.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._prefill_pool is not None:
            self._prefill_pool.shutdown(wait=False, cancel_futures=True)

    async def run_on_device(self, fn, *args):
        """Run ``fn(*args)`` on the device thread, between two steps (it runs one thing at a
        time), and return its result: for what must run where the model does (the profiler)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def submit(self, req: Request) -> None:
        if self.stopped:
            raise APIError(503, f"the engine stopped ({self.stopped}); restart the server")
        if len(self.waiting) - len(self.free_slots) >= self.max_queue:  # free slots admit at the next step
            self._count_failure("rejected")
            raise APIError(429, f"request queue is full ({self.max_queue} waiting); retry later",
                           headers={"Retry-After": "1"})
        req.generator = new_generator(req.params, self.b.device)
        req.detok = Detokenizer(self.text)
        self.waiting.append(req)
        self._wake.set()

    def cancel(self, req: Request) -> None:
        if not req.finished:
            req.cancelled = True
            self._wake.set()

    def _cache_bytes(self) -> tuple[int, int]:
        """(KV bytes, KV + recurrent state bytes) of the sequences running now."""
        kv = self.b.kv_bytes_used([r.pos + len(r.generated) for r in self.running])
        return kv, kv + self.b.state_bytes * len(self.running)

    def state(self) -> dict[str, float]:
        used = self.b.num_slots - len(self.free_slots)
        kv, _ = self._cache_bytes()
        budget = self.b.kv_bytes_per_token * self.max_model_len * self.b.num_slots
        out = {"ssm:num_requests_running": len(self.running),
               "ssm:num_requests_waiting": len(self.waiting),
               "ssm:state_slots_used": used, "ssm:state_slots_total": self.b.num_slots,
               "ssm:state_bytes_per_sequence": self.b.state_bytes,
               "ssm:kv_cache_bytes_used": kv,
               "ssm:kv_cache_usage_perc": kv / budget if budget else 0.0,
               "ssm:cache_bytes_peak": self.cache_peak, "ssm:weight_bytes": self.weight_bytes}
        if self.b.device.type == "cuda":
            out["ssm:device_memory_allocated_bytes"] = torch.cuda.memory_allocated(self.b.device)
            out["ssm:device_memory_reserved_bytes"] = torch.cuda.memory_reserved(self.b.device)
            out["ssm:device_memory_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(self.b.device)
        return out

    # ---- the loop ---------------------------------------------------------------------------
    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        pending = None  # (requests, handle) of the launched, not yet collected decode step
        t_end = None  # when the last step holding decoding streams ended
        while True:
            self._drop_cancelled()
            self._admit()
            if self.prefill_overlap:
                await self._overlapped_prefill(loop)
            if not self.running and pending is None:
                t_end = None
                self._wake.clear()
                await self._wake.wait()
                self.stall.progress()  # idle is no stall
                continue
            inflight = set(pending[0]) if pending else ()
            # not a request cancelled while its overlapped prefill ran: it has no token to feed
            # (dropped at the next turn; it must not fail the step of every stream beside it)
            decode = [r for r in self.running  # (a first token still on the device: not yet)
                      if r.prefilled and r.generated and not r.cancelled and not self._ends_inflight(r, inflight)]
            if self.prefill_overlap and not decode and pending is None:
                t_end = None
                if self._prefilling is not None:  # nothing to decode: wait for the prefill
                    await asyncio.wait([self._prefilling[1]])
                continue
            prefill, budget = ([], 0) if self.prefill_overlap else self._next_prefill(bool(decode) or pending is not None)
            banned = self._banned(decode, inflight)
            launch = (decode and self._pipelined
                      and self.b.can_launch([r.generator for r in decode], banned))
            if decode and not launch and pending is not None:
                prefill, decode = [], []  # a synchronous step needs the in-flight tokens first
            stepped = [r for r in dict.fromkeys(prefill + decode + (list(pending[0]) if pending else []))
                       if not r.finished]
            t_step, pos0 = time.perf_counter(), prefill[0].pos if prefill else 0
            if decode and t_end is not None and t_step - t_end > self.slow_step_s:
                log.info("slow turn: %.1f ms between two steps holding %d decoding streams (the event loop's "
                         "work between steps: admitting, emitting tokens, HTTP)", (t_step - t_end) * 1e3, len(decode))
            try:
                results, pending, failed = await loop.run_in_executor(
                    self._pool, self._step, prefill, budget, decode, banned, bool(launch), pending, inflight)
            except torch.OutOfMemoryError as e:
                pending = None
                self._fail(stepped, *_failure(e))
                await loop.run_in_executor(self._pool, _empty_cache)
                continue
            except Exception as e:  # a failed step fails its requests, never the server
                pending = None
                log.exception("engine step failed")
                self._fail(stepped, *_failure(e))
                continue
            self.steps += 1
            self._steps.inc()
            self.stall.progress()
            t_end = time.perf_counter() if decode else None
            if decode and t_end - t_step > self.slow_step_s:
                self._log_slow(t_end - t_step, decode, prefill, pos0)
            self.cache_peak = max(self.cache_peak, self._cache_bytes()[1])
            for req, reason, message in failed:  # a prefill or a sampling of its own: that request alone
                self._fail([req], reason, message)
                if reason == "oom":
                    await loop.run_in_executor(self._pool, _empty_cache)
            if results:
                self._emit_all(results, time.perf_counter())
            # no yield here: the HTTP handlers write what was produced while the next step runs
            # on the device thread (the await on it yields to them)

    def _log_slow(self, took: float, decode: list[Request], prefill: list[Request], pos0: int) -> None:
        if not prefill:
            beside = "no prefill"
        elif len(prefill) > 1:
            beside = f"{len(prefill)} whole prompts packed ({sum(r.prompt_len for r in prefill):,} tokens)"
        else:
            r = prefill[0]
            beside = (f"a prefill chunk of {r.pos - pos0:,} tokens (to {r.pos:,} of {r.prompt_len:,}"
                      + (", its last)" if r.prefilled else ")"))
        parts = " · ".join(f"{part} {s * 1e3:.1f}" for part, s in self.step_phases)
        log.info("slow step: %.1f ms holding %d decoding streams (%.1f ms of it the step's own work on the "
                 "device thread: %s ms); beside them %s", took * 1e3, len(decode), self.step_work_s * 1e3,
                 parts or "none", beside)

    async def _overlapped_prefill(self, loop) -> None:
        """Take the result of the prefill in flight, if it is done, and start the next (the
        oldest request still prefilling, or several short fresh ones packed) on the prefill
        thread."""
        if self._prefilling is not None and self._prefilling[1].done():
            group, fut = self._prefilling
            self._prefilling = None
            self.stall.progress()
            try:
                advanced, tokens, failed = fut.result()
            except Exception as e:  # noqa: BLE001 - its own prompts' failure (their sampling), never the others'
                failed = [(r, *_failure(e, "prefill failed")) for r in group]
            else:
                self._advance(advanced)
                if tokens:
                    self._emit_all(tokens, time.perf_counter())
            for req, reason, message in failed:
                self._fail([req], reason, message)
            if any(reason == "oom" for _, reason, _ in failed):
                await loop.run_in_executor(self._prefill_pool, _empty_cache)
        if self._prefilling is None:
            group, budget = self._next_prefill(any(r.prefilled for r in self.running))
            if group:
                fut = loop.run_in_executor(self._prefill_pool, self._prefill_step, group, budget)
                self._prefilling = (group, fut)

    def _next_prefill(self, decoding: bool) -> tuple[list[Request], int]:
        """(the requests of the next prefill, the prompt tokens it may take). The oldest request
        still prefilling; with it, when its whole prompt fits in the budget and the backend
        packs, the later fresh requests whose whole prompts still fit (in arrival order, none
        skipped past one that does not). The budget is ``prefill_chunk_size``, and while other
        streams decode, ``prefill_chunk_size_decoding`` for a prompt longer than that: a prompt
        that fits in one chunk costs the streams one gap, a long one many short gaps instead of
        many long ones."""
        todo = [r for r in self.running if not r.prefilled and not r.cancelled]
        if not todo:
            return [], 0
        budget = self.chunk_decoding if decoding and todo[0].prompt_len > self.chunk else self.chunk
        group, total = todo[:1], todo[0].prompt_len - todo[0].pos
        if not self._packs or todo[0].pos or total > budget:
            return group, budget
        for r in todo[1:]:
            if r.pos or total + r.prompt_len > budget:
                break
            group.append(r)
            total += r.prompt_len
        return group, budget

    def _prefill(self, group: list[Request], budget: int):
        """Runs on the device (or prefill) thread: the group's next prompt tokens — a chunk of
        one request, or several whole prompts packed. Returns ([(request, tokens done)], the
        requests whose prompt is now done, their logits [k, V] (None when none is))."""
        if len(group) > 1:
            logits = self.b.prefill_packed([r.slot for r in group], [r.prompt_ids for r in group])
            return [(r, r.prompt_len) for r in group], group, logits
        r = group[0]
        ids = r.prompt_ids[r.pos:r.pos + budget]
        logits = self.b.prefill_chunk(r.slot, ids, r.pos)
        done = r.pos + len(ids) >= r.prompt_len
        return [(r, len(ids))], [r] if done else [], logits[None] if done else None

    def _prefill_each(self, group: list[Request], budget: int):
        """``_prefill``, and when a packed one fails, each of its requests alone (a bad prompt,
        or memory short for the pack, fails no other prompt). Returns ``_prefill``'s three and
        [(request, reason, message)] of those that failed."""
        try:
            return (*self._prefill(group, budget), [])
        except Exception as e:  # noqa: BLE001 - its own prompts' failure, never the others'
            if len(group) == 1:
                return [], [], None, [(group[0], *_failure(e, "prefill failed"))]
            log.warning("a packed prefill of %d prompts failed (%s: %s); prefilling each alone",
                        len(group), type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        advanced, done, rows, failed = [], [], [], []
        for r in group:
            a, d, logits, f = self._prefill_each([r], budget)
            advanced, done, failed = advanced + a, done + d, failed + f
            if logits is not None:
                rows.append(logits)
        return advanced, done, torch.cat(rows) if rows else None, failed

    def _advance(self, advanced) -> None:
        for r, n in advanced:
            r.pos += n
            if not r.internal:
                self._prompt_tokens.inc(n)

    @torch.inference_mode()
    def _prefill_step(self, group: list[Request], budget: int):
        """Runs on the prefill thread: ``_prefill_each``, then the first token of each request
        whose prompt it finished. Returns ([(request, tokens done)], [(request, first token)],
        [(request, reason, message)] of failed prompts); waits for the device when no token is
        sampled."""
        t0 = time.perf_counter()
        try:
            advanced, done, logits, failed = self._prefill_each(group, budget)
            if not done:
                if self.b.device.type == "cuda":
                    torch.cuda.current_stream().synchronize()
                return advanced, [], failed
            tokens = sample(logits, [r.params for r in done], self._banned(done), [r.generator for r in done])
            return advanced, list(zip(done, tokens)), failed
        finally:
            self._busy.inc(time.perf_counter() - t0)

    def _ends_inflight(self, r: Request, inflight) -> bool:
        """r's in-flight token (if any) is its last: max_tokens or max_model_len reached."""
        if r not in inflight:
            return False
        n = len(r.generated) + 1
        return n >= r.params.max_tokens or r.prompt_len + n >= self.max_model_len

    @torch.inference_mode()
    def _step(self, prefill: list[Request], budget: int, decode: list[Request], banned, launch: bool, pending,
              inflight):
        """Runs on the device thread. Returns ([(request, sampled token)], new pending step,
        [(request, reason, message)] of the requests whose own work failed: a prefill (out of
        memory, or any error: its requests fail, the decode rows of the step go on) or the
        sampling of its row (a batch that fails to sample is sampled row by row). A decode step
        that fails fails every row in it (the caller's): its states may be half-written."""
        t0 = time.perf_counter()
        try:
            return self._step_work(prefill, budget, decode, banned, launch, pending, inflight)
        finally:
            self.step_work_s = time.perf_counter() - t0
            self._busy.inc(self.step_work_s)

    def _step_work(self, prefill, budget, decode, banned, launch, pending, inflight):
        rows, reqs = [], []
        new_pending = None
        out = []
        phases = self.step_phases = []
        t = time.perf_counter()

        def ended(part: str) -> None:
            nonlocal t
            now = time.perf_counter()
            phases.append((part, now - t))
            t = now

        if launch:  # enqueue the decode step first: the device starts on it at once
            tokens = [-1 if r in inflight else r.generated[-1] for r in decode]
            handle = self.b.decode_launch([r.slot for r in decode], tokens, [r.params for r in decode], banned)
            new_pending = (decode, handle)
            ended("decode launch")
        failed = []
        if prefill:
            advanced, done, logits, failed = self._prefill_each(prefill, budget)
            self._advance(advanced)
            if done:
                rows.append(logits)
                reqs.extend(done)
            ended("prefill")
        if pending is not None:  # the previous step's tokens (usually ready by now)
            out = list(zip(pending[0], self.b.decode_collect(pending[1])))
            ended("collect")
            self._collect_wait.inc(phases[-1][1])
        if self._firsts:
            out.extend(self._read_firsts(wait=not launch))
            ended("first tokens read")
        if rows and launch and self.b.device.type == "cuda" and all(r.generator is None for r in reqs):
            try:
                self._defer_first(rows[0], reqs)
                rows, reqs = [], []
            except Exception:  # noqa: BLE001 - sampled below, synchronously, row by row where it fails
                log.exception("sampling %d first token(s) on the device failed", len(reqs))
            ended("first tokens sampled")
        if decode and not launch and self._device_sampling:  # seeded rows: synchronous
            tokens = self.b.decode_sample([r.slot for r in decode], [r.generated[-1] for r in decode],
                                          [r.params for r in decode], banned,
                                          [r.generator for r in decode])
            out.extend(zip(decode, tokens))
        elif decode and not launch:
            rows.append(self.b.decode([r.slot for r in decode], [r.generated[-1] for r in decode],
                                      [r.prompt_len + len(r.generated) - 1 for r in decode]))
            reqs.extend(decode)
        if reqs:
            logits = torch.cat(rows) if len(rows) > 1 else rows[0]
            try:
                tokens = sample(logits, [r.params for r in reqs], self._banned(reqs, ()),
                                [r.generator for r in reqs])
                out.extend(zip(reqs, tokens))
            except Exception:  # noqa: BLE001 - find the row that fails: sample each alone
                log.exception("sampling a batch of %d failed; sampling row by row", len(reqs))
                for i, r in enumerate(reqs):
                    try:
                        out.extend(zip([r], sample(logits[i:i + 1], [r.params], self._banned([r], ()), [r.generator])))
                    except Exception as e:  # noqa: BLE001
                        failed.append((r, "error", f"{type(e).__name__}: {e}"))
        if decode and not launch or reqs:
            ended("decode and sampling" if decode and not launch else "sampling")
        return out, new_pending, failed

    def _defer_first(self, logits: torch.Tensor, reqs: list[Request]) -> None:
        """Sample the first tokens of prompts just prefilled beside a launched decode step
        without waiting for them: reading them back now would hold this step — and every stream
        in it — until the device has run all it was given (the step before, this prefill), ~3×
        a step's pace. They are read in a later step, once there (``_read_firsts``); the
        requests decode from the step after that."""
        tokens = sample_tensor(logits, [r.params for r in reqs], self._banned(reqs, ()), [None] * len(reqs))
        host = torch.empty(len(reqs), dtype=torch.long, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self._firsts.append((reqs, host, done))

    def _read_firsts(self, wait: bool) -> list[tuple[Request, int]]:
        """The deferred first tokens whose copy has ended ([(request, token)]); all of them when
        ``wait`` (no decode step is in flight to keep the device busy meanwhile)."""
        out, left = [], []
        for reqs, host, done in self._firsts:
            if wait or done.query():
                done.synchronize()
                out.extend(zip(reqs, host.tolist()))
            else:
                left.append((reqs, host, done))
        self._firsts = left
        return out

    def _banned(self, reqs: list[Request], inflight=()) -> list[list[int]]:
        eos = self.text.eos_token_id
        if eos is None:
            return [[] for _ in reqs]
        return [[eos] if r.params.ignore_eos or len(r.generated) + (r in inflight) < r.params.min_tokens
                else [] for r in reqs]

    def _admit(self) -> None:
        now = time.perf_counter()
        while self.waiting and self.free_slots:
            req = self.waiting.popleft()
            if req.cancelled:
                self._count_failure("cancelled")
                continue
            req.slot = self.free_slots.pop()
            req.t_scheduled = now
            if not req.internal:
                self._queue.observe(now - req.created)
            self.running.append(req)

    def _drop_cancelled(self) -> None:
        busy = self._prefilling[0] if self._prefilling is not None else ()  # their slots are in use
        for req in [r for r in self.running if r.cancelled and r not in busy]:
            self._release(req)
            self._count_failure("cancelled")

    def _release(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
        if req.slot is not None:
            self.b.free(req.slot)
            self.free_slots.append(req.slot)
            req.slot = None

    def _emit_all(self, results, now: float) -> None:
        n = 0
        for req, token in results:
            if not (req.cancelled or req.finished):  # a stopped request's extra step: discarded
                self._emit(req, token, now)
                n += not req.internal
        if n:
            self._gen_tokens.inc(n)

    def _emit(self, req: Request, token: int, now: float) -> None:
        p = req.params
        if req.internal:
            pass
        elif req.t_first is None:
            self._ttft.observe(now - req.created)
            self._prefill_h.observe(now - req.t_scheduled)
        else:
            self._itl.observe(now - req.t_last)
        if req.t_first is None:
            req.t_first = now
        req.t_last = now
        req.generated.append(token)
        reason = None
        if token in p.stop_token_ids or (token == self._eos and not p.ignore_eos):
            reason = "stop"
        else:
            req.text += req.detok.add(token)
            if p.stop and req.check_stop_strings():
                reason = "stop"
        if reason is None and (len(req.generated) >= p.max_tokens
                               or req.prompt_len + len(req.generated) >= self.max_model_len):
            reason = "length"
        if reason:
            req.finished = reason
        # the last token's event carries the finish reason (one SSE chunk, as vLLM sends it)
        req.out.put_nowait(Event("token", text=req.releasable_text(), token_id=token, finish_reason=reason))
        if reason:
            self._release(req)
            if not req.internal:
                self.m.success.labels(self.model_name, reason).inc()
                self._e2e.observe(now - req.created)

    def _fail(self, reqs: list[Request], reason: str, message: str) -> None:
        for req in reqs:
            self._release(req)
            req.finished = "error"
            self._count_failure(reason)
            req.out.put_nowait(Event("error", text=message, status=507 if reason == "oom" else 500))

    def _count_failure(self, reason: str) -> None:
        self.m.failure.labels(self.model_name, reason).inc()


def _failure(e: BaseException, log_as: str | None = None) -> tuple[str, str]:
    """(reason, message) of failed work: ``oom`` when the device ran out of memory, else
    ``error`` (logged with its traceback as ``log_as``, when given)."""
    if isinstance(e, torch.OutOfMemoryError):
        return "oom", f"out of device memory: {str(e).splitlines()[0]}"
    if log_as:
        log.error(log_as, exc_info=e)
    return "error", f"{type(e).__name__}: {e}"


def _empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
