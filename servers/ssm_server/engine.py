"""The scheduler: one task owns the model; requests queue for state slots.

Every step runs on one worker thread (the device thread) and does:
  1. drop cancelled requests, freeing their slots;
  2. grant free slots to waiting requests, in arrival order;
  3. one batched decode step of every request already decoding, and one prefill chunk (at most
     ``prefill_chunk_size`` tokens, ``prefill_chunk_size_decoding`` while other streams
     decode) of the oldest request still prefilling;
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
from servers.ssm_server.protocols import DeviceSampling, PipelinedBackend
from servers.ssm_server.request import Event, Request
from servers.ssm_server.sampling import new_generator, sample
from servers.ssm_server.textio import Detokenizer

log = logging.getLogger("ssm_server")


class Engine:
    def __init__(self, backend, text, metrics, *, max_queue: int, prefill_chunk_size: int,
                 model_name: str, prefill_chunk_size_decoding: int | None = None,
                 prefill_overlap: bool = False):
        self.b = backend
        self._pipelined = isinstance(backend, PipelinedBackend)
        self._device_sampling = isinstance(backend, DeviceSampling)
        self.text = text
        self.m = metrics
        self.model_name = model_name
        self.max_queue = max_queue
        self.chunk = prefill_chunk_size if backend.exact_chunking else 1 << 62
        # while other streams decode: a smaller chunk keeps their gaps short (a backend that
        # cannot split a prompt exactly prefills it whole either way)
        self.chunk_decoding = min(self.chunk, prefill_chunk_size_decoding or self.chunk)
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
        self._prefilling: tuple[Request, int, asyncio.Future] | None = None
        """The overlapped prefill chunk in flight: (request, its tokens, the future)."""
        self._task: asyncio.Task | None = None
        self.steps = 0
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

    # ---- interface used by the HTTP layer --------------------------------------------------
    async def start(self) -> None:
        if self.prefill_overlap:
            # the device thread waits for the GIL while the prefill thread launches kernels:
            # hand it over within 1 ms, not Python's 5
            sys.setswitchinterval(min(sys.getswitchinterval(), 0.001))
        self._task = asyncio.create_task(self._loop(), name="engine")

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
        Triton's benchmark launches, 3,663 state-passing kernels for 192 and 2,779 cache fills.) Kept out of every metric. Returns the seconds it took;
        ``ready`` is set after."""
        from servers.ssm_server.sampling import SamplingParams

        t0 = time.perf_counter()
        full = max(1, min(self.prefill_chunk_size + 17, self.max_model_len - 8))
        reqs = [Request([1 + i % 7 for i in range(n)], SamplingParams(max_tokens=4, ignore_eos=True, **kw),
                        internal=True)
                for n, kw in ((full, {"temperature": 0.0}), (min(17, full), {"temperature": 1.0, "seed": 0}))]
        for r in reqs:
            self.submit(r)
        for r in reqs:
            while (ev := await r.out.get()).kind == "token" and not ev.finish_reason:
                pass
            if ev.kind == "error":
                log.warning("warm-up request failed: %s", ev.text)
        self.cache_peak = 0  # what clients' sequences hold, from here on
        self.ready = True
        took = time.perf_counter() - t0
        log.info("warmed up in %.2f s (prefill %d tokens in %d chunk(s) and %d tokens, 4 decode steps of 2 streams)",
                 took, full, -(-full // self.chunk), min(17, full))
        return took

    async def stop(self) -> None:
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
        while True:
            self._drop_cancelled()
            self._admit()
            if self.prefill_overlap:
                await self._overlapped_prefill(loop)
            if not self.running and pending is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            prefill = None if self.prefill_overlap else next((r for r in self.running if not r.prefilled), None)
            inflight = set(pending[0]) if pending else ()
            decode = [r for r in self.running if r.prefilled and not self._ends_inflight(r, inflight)]
            if self.prefill_overlap and not decode and pending is None:
                if self._prefilling is not None:  # nothing to decode: wait for the chunk
                    await asyncio.wait([self._prefilling[2]])
                continue
            banned = self._banned(decode, inflight)
            launch = (decode and self._pipelined
                      and self.b.can_launch([r.generator for r in decode], banned))
            if decode and not launch and pending is not None:
                prefill, decode = None, []  # a synchronous step needs the in-flight tokens first
            stepped = [r for r in dict.fromkeys(([prefill] if prefill else []) + decode
                                                + (list(pending[0]) if pending else [])) if not r.finished]
            try:
                results, pending, failed = await loop.run_in_executor(
                    self._pool, self._step, prefill, decode, banned, bool(launch), pending, inflight)
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
            self.cache_peak = max(self.cache_peak, self._cache_bytes()[1])
            for req, reason, message in failed:  # a prefill or a sampling of its own: that request alone
                self._fail([req], reason, message)
                if reason == "oom":
                    await loop.run_in_executor(self._pool, _empty_cache)
            if results:
                self._emit_all(results, time.perf_counter())
            # no yield here: the HTTP handlers write what was produced while the next step runs
            # on the device thread (the await on it yields to them)

    async def _overlapped_prefill(self, loop) -> None:
        """Take the result of the prefill chunk in flight, if it is done, and start the next
        (the oldest request still prefilling) on the prefill thread."""
        if self._prefilling is not None and self._prefilling[2].done():
            req, n, fut = self._prefilling
            self._prefilling = None
            try:
                token = fut.result()
            except Exception as e:  # noqa: BLE001 - its own prompt's failure, never the others'
                reason, message = _failure(e, "prefill failed")
                self._fail([req], reason, message)
                if reason == "oom":
                    await loop.run_in_executor(self._prefill_pool, _empty_cache)
            else:
                req.pos += n
                if not req.internal:
                    self._prompt_tokens.inc(n)
                if token is not None:
                    self._emit_all([(req, token)], time.perf_counter())
        if self._prefilling is None:
            req = next((r for r in self.running if not r.prefilled and not r.cancelled), None)
            if req is not None:
                decoding = any(r.prefilled for r in self.running)
                ids = req.prompt_ids[req.pos:req.pos + (self.chunk_decoding if decoding else self.chunk)]
                last = req.pos + len(ids) >= req.prompt_len
                sampling = (req.params, self._banned([req]), req.generator) if last else None
                fut = loop.run_in_executor(self._prefill_pool, self._prefill_step, req.slot, ids, req.pos, sampling)
                self._prefilling = (req, len(ids), fut)

    @torch.inference_mode()
    def _prefill_step(self, slot: int, ids: list[int], start: int, sampling):
        """Runs on the prefill thread: one chunk into ``slot``; the first token when it is the
        prompt's last chunk (``sampling`` = (params, banned ids, generator)), else None once
        the chunk is done on the device."""
        logits = self.b.prefill_chunk(slot, ids, start)
        if sampling is None:
            if logits.is_cuda:
                torch.cuda.current_stream().synchronize()
            return None
        params, banned, generator = sampling
        return sample(logits[None], [params], banned, [generator])[0]

    def _ends_inflight(self, r: Request, inflight) -> bool:
        """r's in-flight token (if any) is its last: max_tokens or max_model_len reached."""
        if r not in inflight:
            return False
        n = len(r.generated) + 1
        return n >= r.params.max_tokens or r.prompt_len + n >= self.max_model_len

    @torch.inference_mode()
    def _step(self, prefill: Request | None, decode: list[Request], banned, launch: bool, pending, inflight):
        """Runs on the device thread. Returns ([(request, sampled token)], new pending step,
        [(request, reason, message)] of the requests whose own work failed: a prefill chunk (out
        of memory, or any error: the decode rows of the step go on) or the sampling of its row
        (a batch that fails to sample is sampled row by row). A decode step that fails fails
        every row in it (the caller's): its states may be half-written."""
        rows, reqs = [], []
        new_pending = None
        out = []
        if launch:  # enqueue the decode step first: the device starts on it at once
            tokens = [-1 if r in inflight else r.generated[-1] for r in decode]
            handle = self.b.decode_launch([r.slot for r in decode], tokens, [r.params for r in decode], banned)
            new_pending = (decode, handle)
        failed = []
        if prefill is not None:
            chunk = self.chunk_decoding if decode or pending is not None else self.chunk
            ids = prefill.prompt_ids[prefill.pos:prefill.pos + chunk]
            try:
                logits = self.b.prefill_chunk(prefill.slot, ids, prefill.pos)
            except Exception as e:  # noqa: BLE001 - its own prompt's failure, not the batch's
                failed.append((prefill, *_failure(e, "prefill failed")))
            else:
                prefill.pos += len(ids)
                if not prefill.internal:
                    self._prompt_tokens.inc(len(ids))
                if prefill.prefilled:
                    rows.append(logits[None])
                    reqs.append(prefill)
        if pending is not None:  # the previous step's tokens (usually ready by now)
            out = list(zip(pending[0], self.b.decode_collect(pending[1])))
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
        return out, new_pending, failed

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
                self.m.queue.labels(self.model_name).observe(now - req.created)
            self.running.append(req)

    def _drop_cancelled(self) -> None:
        busy = self._prefilling[0] if self._prefilling is not None else None  # its slot is in use
        for req in [r for r in self.running if r.cancelled and r is not busy]:
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
