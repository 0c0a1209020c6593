"""torch.profiler over the engine's device thread: ``POST /start_profile`` and ``/stop_profile``
(vLLM's routes), on only with ``--profile-dir DIR``.

The profiler is started and stopped ON THE DEVICE THREAD (``Engine.run_on_device``, between two
steps): torch.profiler records the CPU ops (``aten::mm``, …) of the thread that started it
only — started from the event loop, a trace holds no op of the model's steps at all. (CUDA
kernels come from CUPTI for the whole device either way.) Stopping synchronizes the device
first, so the kernels of the last profiled step are in the trace; the Chrome trace is then
written off the device thread, so serving goes on while a large trace is gzipped.

Each session is its own ``torch.profiler.profile``; the file is
``<prefix>.<time_ns>.pt.trace.json.gz`` in the profile directory (the names
``torch.profiler.tensorboard_trace_handler`` gives), written under a hidden temporary name and
renamed, so a file that exists is whole. With profiling off nothing is on the step path.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
import warnings

from servers.ssm_server.protocol import APIError

log = logging.getLogger("ssm_server")

DEFAULT_PREFIX = "ssm-server"
_PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_prefix(prefix) -> str:
    """A file-name prefix a client may give (``profile_prefix``): letters, digits, ``._-``."""
    if prefix is None:
        return DEFAULT_PREFIX
    if not isinstance(prefix, str) or not _PREFIX.fullmatch(prefix):
        raise APIError(400, "profile_prefix must be 1-100 characters of letters, digits, '.', '_' or '-', "
                            "starting with a letter or digit", param="profile_prefix")
    return prefix


class Profiler:
    """One profiling session at a time over ``engine``'s device thread; traces go to ``out_dir``."""

    def __init__(self, engine, out_dir: str):
        self.engine = engine
        self.dir = os.path.abspath(out_dir)
        device = getattr(getattr(engine, "b", None), "device", None)
        self.cuda_device = device if getattr(device, "type", None) == "cuda" else None
        self._prof = None  # the running torch.profiler.profile
        self._prefix = DEFAULT_PREFIX
        self._steps0 = 0
        self._lock = asyncio.Lock()  # start and stop one at a time (a second start waits, then 409)
        # each session is a fresh profile object, so "events of earlier cycles" do not apply (torch
        # 2.11 says so on the first start)
        warnings.filterwarnings("ignore", message="Warning: Profiler clears events", category=UserWarning)

    @property
    def running(self) -> bool:
        return self._prof is not None

    async def _on_device(self, fn, *args):
        run = getattr(self.engine, "run_on_device", None)
        if run is None:  # the synthetic engine: its work is the event loop's
            return fn(*args)
        return await run(fn, *args)

    def _steps(self) -> int:
        return getattr(self.engine, "steps", 0)

    async def start(self, prefix: str | None = None) -> None:
        """Start profiling; returns once the profiler runs on the device thread. 409 if it runs."""
        prefix = check_prefix(prefix)
        async with self._lock:
            if self._prof is not None:
                raise APIError(409, "the profiler is already running: POST /stop_profile first")
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda_device else [])
            prof = profile(activities=activities, record_shapes=False, with_stack=False, profile_memory=False)
            try:
                await self._on_device(prof.start)
            except Exception as e:
                log.exception("starting the profiler failed")
                await self._discard(prof)
                raise APIError(500, f"the profiler failed to start: {type(e).__name__}: {e}") from None
            # the last step before prof.start() ran on the device thread was counted before this
            # line runs (the loop resumes awaiters in the order the device thread finishes them)
            self._prof, self._prefix, self._steps0 = prof, prefix, self._steps()
            log.info("profiler started (traces to %s)", self.dir)

    async def stop(self, prefix: str | None = None) -> dict:
        """Stop profiling and write the trace: ``{"trace": path, "steps": engine steps taken}``.
        409 if it is not running. ``prefix`` (if given) overrides the one given at start."""
        prefix = check_prefix(prefix) if prefix is not None else None
        async with self._lock:
            prof = self._prof
            if prof is None:
                raise APIError(409, "the profiler is not running: POST /start_profile first")
            self._prof = None  # whatever happens next, this session is over
            try:
                await self._on_device(self._stop_on_device, prof)
            except Exception as e:
                log.exception("stopping the profiler failed")
                raise APIError(500, f"the profiler failed to stop: {type(e).__name__}: {e}") from None
            steps = self._steps() - self._steps0  # the steps that ran between start and stop
            name = f"{prefix or self._prefix}.{time.time_ns()}.pt.trace.json.gz"
            path = os.path.join(self.dir, name)
            try:
                await asyncio.to_thread(_export, prof, path)
            except Exception as e:
                log.exception("writing the trace failed")
                raise APIError(500, f"writing the trace failed: {type(e).__name__}: {e}") from None
            log.info("profiler stopped: %d steps, trace %s", steps, path)
            return {"trace": path, "steps": steps}

    def _stop_on_device(self, prof) -> None:
        if self.cuda_device is not None:
            import torch

            torch.cuda.synchronize(self.cuda_device)  # the last step's kernels end inside the trace
        prof.stop()

    async def _discard(self, prof) -> None:
        try:
            await self._on_device(prof.stop)
        except Exception:  # noqa: BLE001 - it may never have started
            pass


def _export(prof, path: str) -> None:
    """Write ``prof``'s Chrome trace (gzip) to ``path``, whole or not at all."""
    head, tail = os.path.split(path)
    tmp = os.path.join(head, f".{tail}.{os.getpid()}.partial.gz")  # export gzips a path ending .gz
    try:
        prof.export_chrome_trace(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
