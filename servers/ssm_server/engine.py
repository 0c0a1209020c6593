"""The scheduler: one task owns the model; requests queue for state slots.

Every step runs on one worker thread (the only code touching the device) and does:
  1. drop cancelled requests, freeing their slots;
  2. grant free slots to waiting requests, in arrival order;
  3. one prefill chunk (at most ``prefill_chunk_size`` tokens) of the oldest request still
     prefilling, and one batched decode step of every request already decoding — so a long
     prompt arriving costs the running streams one chunk per token, never a freeze;
  4. sample, detokenize, check stop conditions, and hand tokens to the HTTP handlers.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import time

import torch

from servers.ssm_server.protocol import APIError
from servers.ssm_server.request import Event, Request
from servers.ssm_server.sampling import new_generator, sample
from servers.ssm_server.textio import Detokenizer

log = logging.getLogger("ssm_server")


class Engine:
    def __init__(self, backend, text, metrics, *, max_queue: int, prefill_chunk_size: int,
                 model_name: str):
        self.b = backend
        self.text = text
        self.m = metrics
        self.model_name = model_name
        self.max_queue = max_queue
        self.chunk = prefill_chunk_size if backend.exact_chunking else 1 << 62
        self.max_model_len = backend.max_model_len
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.free_slots = list(range(backend.num_slots - 1, -1, -1))
        self._wake = asyncio.Event()
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="device")
        self._task: asyncio.Task | None = None
        self.steps = 0

    # ---- interface used by the HTTP layer --------------------------------------------------
    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="engine")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)

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

    def state(self) -> dict[str, float]:
        used = self.b.num_slots - len(self.free_slots)
        kv = self.b.kv_bytes_used([r.pos + len(r.generated) for r in self.running])
        budget = self.b.kv_bytes_per_token * self.max_model_len * self.b.num_slots
        out = {"ssm:num_requests_running": len(self.running),
               "ssm:num_requests_waiting": len(self.waiting),
               "ssm:state_slots_used": used, "ssm:state_slots_total": self.b.num_slots,
               "ssm:state_bytes_per_sequence": self.b.state_bytes,
               "ssm:kv_cache_bytes_used": kv,
               "ssm:kv_cache_usage_perc": kv / budget if budget else 0.0}
        if self.b.device.type == "cuda":
            out["ssm:device_memory_allocated_bytes"] = torch.cuda.memory_allocated(self.b.device)
            out["ssm:device_memory_reserved_bytes"] = torch.cuda.memory_reserved(self.b.device)
            out["ssm:device_memory_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(self.b.device)
        return out

    # ---- the loop ---------------------------------------------------------------------------
    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._drop_cancelled()
            self._admit()
            if not self.running:
                self._wake.clear()
                await self._wake.wait()
                continue
            prefill = next((r for r in self.running if not r.prefilled), None)
            decode = [r for r in self.running if r.prefilled]
            try:
                results = await loop.run_in_executor(self._pool, self._step, prefill, decode)
            except torch.OutOfMemoryError as e:
                self._fail(([prefill] if prefill else []) + decode, "oom",
                           f"out of device memory: {str(e).splitlines()[0]}")
                await loop.run_in_executor(self._pool, _empty_cache)
                continue
            except Exception as e:  # a failed step fails its requests, never the server
                log.exception("engine step failed")
                self._fail(([prefill] if prefill else []) + decode, "error", f"{type(e).__name__}: {e}")
                continue
            self.steps += 1
            now = time.perf_counter()
            for req, token in results:
                self._emit(req, token, now)
            # no yield here: the HTTP handlers write what was produced while the next step runs
            # on the device thread (the await on it yields to them)

    @torch.inference_mode()
    def _step(self, prefill: Request | None, decode: list[Request]):
        """Runs on the device thread. Returns [(request, sampled token)]."""
        rows, reqs = [], []
        if prefill is not None:
            ids = prefill.prompt_ids[prefill.pos:prefill.pos + self.chunk]
            logits = self.b.prefill_chunk(prefill.slot, ids, prefill.pos)
            prefill.pos += len(ids)
            self.m.prompt_tokens.labels(self.model_name).inc(len(ids))
            if prefill.prefilled:
                rows.append(logits[None])
                reqs.append(prefill)
        out = []
        if decode and hasattr(self.b, "decode_sample"):  # sampling inside the backend's decode step
            tokens = self.b.decode_sample([r.slot for r in decode], [r.generated[-1] for r in decode],
                                          [r.params for r in decode], self._banned(decode),
                                          [r.generator for r in decode])
            out = list(zip(decode, tokens))
        elif decode:
            rows.append(self.b.decode([r.slot for r in decode], [r.generated[-1] for r in decode],
                                      [r.prompt_len + len(r.generated) - 1 for r in decode]))
            reqs.extend(decode)
        if not reqs:
            return out
        logits = torch.cat(rows) if len(rows) > 1 else rows[0]
        tokens = sample(logits, [r.params for r in reqs], self._banned(reqs), [r.generator for r in reqs])
        return list(zip(reqs, tokens)) + out

    def _banned(self, reqs: list[Request]) -> list[list[int]]:
        eos = self.text.eos_token_id
        return [[eos] if eos is not None and (r.params.ignore_eos or len(r.generated) < r.params.min_tokens)
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
            self.m.queue.labels(self.model_name).observe(now - req.created)
            self.running.append(req)

    def _drop_cancelled(self) -> None:
        for req in [r for r in self.running if r.cancelled]:
            self._release(req)
            self._count_failure("cancelled")

    def _release(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
        if req.slot is not None:
            self.b.free(req.slot)
            self.free_slots.append(req.slot)
            req.slot = None

    def _emit(self, req: Request, token: int, now: float) -> None:
        if req.cancelled:
            return
        p = req.params
        name = self.model_name
        if req.t_first is None:
            req.t_first = now
            self.m.ttft.labels(name).observe(now - req.created)
            self.m.prefill.labels(name).observe(now - req.t_scheduled)
        else:
            self.m.itl.labels(name).observe(now - req.t_last)
        req.t_last = now
        req.generated.append(token)
        self.m.generation_tokens.labels(name).inc()
        eos = self.text.eos_token_id
        reason = None
        if token in p.stop_token_ids or (token == eos and not p.ignore_eos):
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
        req.out.put_nowait(Event("token", text=req.releasable_text(), token_id=token))
        if reason:
            self._release(req)
            self.m.success.labels(name, reason).inc()
            self.m.e2e.labels(name).observe(now - req.created)
            req.out.put_nowait(Event("done", finish_reason=reason))

    def _fail(self, reqs: list[Request], reason: str, message: str) -> None:
        for req in reqs:
            self._release(req)
            req.finished = "error"
            self._count_failure(reason)
            req.out.put_nowait(Event("error", text=message, status=507 if reason == "oom" else 500))

    def _count_failure(self, reason: str) -> None:
        self.m.failure.labels(self.model_name, reason).inc()


def _empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
