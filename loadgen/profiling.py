"""The profile pass (a scenario's ``profile:``): where a served target's device time goes.

For each length, two requests of their own, each traced by the server's own profiler (vLLM's
``--profiler-config``, ssm-server's ``--profile-dir``; ``POST /start_profile`` and
``/stop_profile`` on both):

- *prefill*: the profiler runs from before the request is sent until it has ended; the request
  asks for one token, so the trace is its prefill (and the sampling of that token);
- *decode*: the request streams; the profiler starts once its first token is in and stops
  ``decode_steps`` tokens later, so the trace is decode steps only.

The trace files the server wrote are summed by kernel (servers.traces) into one line of
``operators.jsonl`` per target × length × phase (docs/contracts.md); the raw traces are deleted
unless kept. The requests are not in ``requests.jsonl``: they are not load, and the profiler
slows them; their own TTFT and end-to-end time are on their line.

Plain blocking HTTP (urllib) and one reader thread: in ``ctxload run`` (gevent-patched) these
are greenlets, elsewhere threads.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from loadgen.openai_request import streamed_body
from rundir.operators import OperatorRecord
from servers import traces

#: How long a server may take to write its trace after ``/stop_profile`` has answered.
TRACE_WAIT_S = 120.0


#: The most a decode request asks for, room permitting (:func:`decode_tokens`).
DECODE_ASK = 8192


def decode_tokens(steps: int, room: int | None = None) -> int:
    """What the decode request asks for: enough that it is still streaming when the profiler
    has started — a small model on vLLM streams 16 tokens before ``/start_profile`` answers,
    and vLLM on an H200 had streamed 320 after a 128K prefill before its first token reached
    the client — so up to :data:`DECODE_ASK` where ``room`` (the server's max_model_len less
    the prompt) allows, at least ``4 × steps + 256``. The client drops it once the profiler has
    stopped."""
    least = 4 * steps + 256
    return max(least, min(DECODE_ASK, room)) if room else least


def trace_steps(prompt_tokens: int, decode_steps: int, step_tokens: int) -> int:
    """The most engine steps one start of a server's profiler needs to record: the prefill of
    a ``prompt_tokens`` prompt in chunks of ``step_tokens``, or ``decode_steps`` twice over
    (the client stops the profiler ``decode_steps`` tokens after it has started, and the
    engine steps on meanwhile), with 8 to spare. A bound, so that a late stop costs a few
    steps, not a trace of the whole request."""
    return max(-(-prompt_tokens // step_tokens), 2 * decode_steps) + 8


class ProfileError(RuntimeError):
    """The profile of one length × phase could not be taken (its line says why)."""


class EndedEarly(ProfileError):
    """A decode request streamed its whole output before the profiler had started."""


@dataclass
class Window:
    """What the client saw of the traced request."""

    ttft_s: float | None = None
    e2e_s: float | None = None
    completion_tokens: int = 0
    steps: int | None = None
    """Decode: tokens generated while the profiler ran (the server's count where it gives one)."""
    steps_source: str | None = None
    window_s: float | None = None
    """Seconds from the profiler's start to its stop, as the client saw them."""
    error: str | None = None
    events: list[tuple[float, int]] = field(default_factory=list)
    """(time, tokens so far) of each token-bearing event."""


def _post(url: str, path: str, body: dict | None, headers: dict, timeout_s: float) -> dict:
    data = json.dumps(body or {}).encode()
    req = urllib.request.Request(url + path, data=data, method="POST",
                                 headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            raw = r.read()
    except urllib.error.HTTPError as e:
        detail = e.read()[:300].decode(errors="replace")
        raise ProfileError(f"{path}: HTTP {e.code} {detail}".strip()) from None
    except OSError as e:
        raise ProfileError(f"{path}: {type(e).__name__}: {e}") from None
    try:
        out = json.loads(raw or b"{}")
    except ValueError:
        return {}
    return out if isinstance(out, dict) else {}


class _Stream:
    """One streamed completion read on a thread of its own, each token-bearing event stamped
    with the tokens so far (the server's continuous usage where it reports it, else counted)."""

    def __init__(self, url: str, body: dict, headers: dict, chat: bool, timeout_s: float):
        self.w = Window()
        self._cond = threading.Condition()
        self._done = False
        self._chat = chat
        path = "/v1/chat/completions" if chat else "/v1/completions"
        self._req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                           headers={"Content-Type": "application/json",
                                                    "Accept": "text/event-stream", **headers})
        self._timeout = timeout_s
        self._drop = False
        self.t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        w = self.w
        try:
            with urllib.request.urlopen(self._req, timeout=self._timeout) as resp:
                for line in resp:
                    if self._drop:  # closing the connection ends the request on the server
                        break
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        break
                    self._event(json.loads(data))
        except urllib.error.HTTPError as e:
            w.error = f"HTTP {e.code}: {e.read()[:300].decode(errors='replace')}"
        except Exception as e:  # noqa: BLE001 - the line records it
            w.error = f"{type(e).__name__}: {e}"[:300]
        with self._cond:
            w.e2e_s = time.perf_counter() - self.t0
            self._done = True
            self._cond.notify_all()

    def _event(self, ev: dict) -> None:
        if "error" in ev:
            err = ev["error"]
            self.w.error = str(err.get("message", err) if isinstance(err, dict) else err)[:300]
            return
        choice = (ev.get("choices") or [{}])[0]
        text = (choice.get("delta") or {}).get("content") if self._chat else choice.get("text")
        usage = ev.get("usage") or {}
        with self._cond:
            w = self.w
            if usage.get("completion_tokens") is not None:
                tokens = int(usage["completion_tokens"])
            else:
                tokens = w.completion_tokens + bool(text)
            if tokens > w.completion_tokens:
                now = time.perf_counter()
                if w.ttft_s is None:
                    w.ttft_s = now - self.t0
                w.completion_tokens = tokens
                w.events.append((now, tokens))
                self._cond.notify_all()

    def wait_tokens(self, n: int, timeout_s: float) -> bool:
        """Until ``n`` tokens are in (True) or the stream ended first (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._done or self.w.completion_tokens >= n, timeout_s) \
                and self.w.completion_tokens >= n

    def tokens(self) -> int:
        with self._cond:
            return self.w.completion_tokens

    def drop(self) -> None:
        """Stop reading at the next event and close the connection."""
        self._drop = True

    def join(self, timeout_s: float) -> Window:
        self._thread.join(timeout_s)
        return self.w


def request_body(model: str, prompt: str, max_tokens: int, chat: bool) -> dict:
    """The profiled request: exactly ``max_tokens``, the usage on every event (its tokens so far)."""
    return streamed_body(model, max_tokens, chat=chat, prompt=prompt, ignore_eos=True, continuous_usage=True)


@dataclass
class Profiler:
    """The profile pass's client for one served target."""

    url: str
    model: str
    trace_dir: Path
    chat: bool = False
    headers: dict = field(default_factory=dict)
    timeout_s: float = 600.0

    def _traced(self, run, prefix: str) -> tuple[Window, list[Path]]:
        """Run ``run(start, stop)`` and return its window and the trace files the server
        wrote between the start and the stop."""
        before = self._names()
        stopped: dict = {}
        state = {"started": False, "stopped": False}

        def start() -> float:
            _post(self.url, "/start_profile", {"profile_prefix": prefix}, self.headers, self.timeout_s)
            state["started"] = True
            return time.perf_counter()

        def stop() -> float:
            t = time.perf_counter()
            state["stopped"] = True
            stopped.update(_post(self.url, "/stop_profile", None, self.headers, self.timeout_s))
            return t

        try:
            w = run(start, stop)
        except BaseException:
            # the server's profiler is left stopped and what it wrote is gone: the next length
            # starts clean
            if state["started"] and not state["stopped"]:
                with contextlib.suppress(ProfileError):
                    _post(self.url, "/stop_profile", None, self.headers, self.timeout_s)
            if state["started"]:
                _wait_for_traces(self.trace_dir, before, wait_s=10.0)
                for p in self._written_since(before):
                    p.unlink(missing_ok=True)
            raise
        if stopped.get("steps") is not None:  # ssm-server counts its engine steps
            w.steps, w.steps_source = int(stopped["steps"]), "server"
        files = _wait_for_traces(self.trace_dir, before)
        if not files:
            raise ProfileError(f"the server wrote no trace in {self.trace_dir} within {TRACE_WAIT_S:.0f} s")
        # what else it wrote with them (vLLM on CPU: a summary table, *.profiler_out.txt) goes
        # where they go
        return w, files + [p for p in self._written_since(before) if p not in files]

    def _names(self) -> set[str]:
        return {p.name for p in self.trace_dir.iterdir()} if self.trace_dir.is_dir() else set()

    def _written_since(self, before: set[str]) -> list[Path]:
        if not self.trace_dir.is_dir():
            return []
        return [p for p in self.trace_dir.iterdir() if p.is_file() and p.name not in before
                and not p.name.startswith(".")]

    def prefill(self, prompt: str, prefix: str) -> tuple[Window, list[Path]]:
        def run(start, stop) -> Window:
            t_start = start()
            s = _Stream(self.url, request_body(self.model, prompt, 1, self.chat), self.headers, self.chat,
                        self.timeout_s)
            w = s.join(self.timeout_s)
            t_stop = stop()
            w.window_s = t_stop - t_start
            return w
        return self._traced(run, prefix)

    def decode(self, prompt: str, steps: int, prefix: str, room: int | None = None,
               attempts: int = 3) -> tuple[Window, list[Path]]:
        """Trace ``steps`` decode steps of a request of its own; ``room``: the tokens the server
        takes after this prompt (:func:`decode_tokens`). A request that ended before the
        profiler had started (a small model on a busy CPU streams its whole output while vLLM
        makes its profiler) is tried again, up to ``attempts`` in all: a later start is quicker."""
        for attempt in range(attempts):
            try:
                return self._decode_once(prompt, steps, prefix, room)
            except EndedEarly:
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def _decode_once(self, prompt: str, steps: int, prefix: str, room: int | None) -> tuple[Window, list[Path]]:
        def run(start, stop) -> Window:
            s = _Stream(self.url, request_body(self.model, prompt, decode_tokens(steps, room), self.chat),
                        self.headers, self.chat, self.timeout_s)
            try:
                if not s.wait_tokens(1, self.timeout_s):
                    w = s.join(5.0)
                    raise ProfileError(f"no first token: {w.error or 'the stream ended'}")
                t_start = start()
                at_start = s.tokens()
                s.wait_tokens(at_start + steps, self.timeout_s)
                at_stop = s.tokens()
                t_stop = stop()
            finally:
                s.drop()  # whatever happened, the request ends here
            w = s.join(self.timeout_s)
            if at_stop <= at_start:
                raise EndedEarly(f"the stream ended before the profiler had started ({at_start} tokens); "
                                 f"no decode step was traced")
            w.window_s, w.steps, w.steps_source = t_stop - t_start, at_stop - at_start, "stream"
            return w
        return self._traced(run, prefix)


def _wait_for_traces(directory: Path, before: set[str], wait_s: float = TRACE_WAIT_S) -> list[Path]:
    """The trace files written since ``before``, once their sizes hold still (a server may
    answer ``/stop_profile`` before its file is complete); none after ``wait_s``."""
    deadline = time.monotonic() + wait_s
    sizes: dict[Path, int] = {}
    while time.monotonic() < deadline:
        files = traces.new_traces(directory, before)
        now = {p: p.stat().st_size for p in files if p.exists()}
        if now and now == sizes:
            return files
        sizes = now
        time.sleep(0.5)
    return []


def line(target: str, engine: str | None, prompt_tokens: int, phase: str, *, window: Window | None = None,
         files: list[Path] = (), kept: list[str] = (), error: str | None = None) -> dict:
    """One line of ``operators.jsonl`` (:class:`rundir.operators.OperatorRecord`): the kernels
    of every trace file of this target × length × phase, summed by name."""
    rec = OperatorRecord(target=target, engine=engine, prompt_tokens=prompt_tokens, phase=phase,
                         traces=list(kept), error=error)
    if window is not None:
        rec.steps, rec.steps_source, rec.window_s = window.steps, window.steps_source, window.window_s
        rec.ttft_s, rec.e2e_s, rec.completion_tokens = window.ttft_s, window.e2e_s, window.completion_tokens
        if window.error and not error:
            rec.error = window.error
    files = [p for p in files if traces.is_trace_file(p)]
    if files:
        tables = [traces.kernel_table(p) for p in files]
        rec.device = "cuda" if any(t["device"] == "cuda" for t in tables) else "cpu"
        summed: dict[str, list] = {}
        for t in tables:
            if t["device"] != rec.device:
                continue  # a CPU-only trace beside the GPU worker's (a front end's): not the model's
            for k in t["kernels"]:
                s = summed.setdefault(k["name"], [0, 0.0])
                s[0] += k["count"]
                s[1] += k["time_s"]
        rec.kernels = [{"name": n, "count": c, "time_s": t}
                       for n, (c, t) in sorted(summed.items(), key=lambda kv: -kv[1][1])]
        rec.total_s = sum(k["time_s"] for k in rec.kernels)
        marked = [t["steps"] for t in tables if t["device"] == rec.device and t.get("steps") is not None]
        if marked and rec.steps_source != "server":  # the engine's own marks beat a stream's count
            rec.steps, rec.steps_source = max(marked), "trace"
    return rec.to_json()


def keep_or_delete(files: list[Path], keep: bool, into: Path) -> list[str]:
    """Move the traces into ``into`` (kept: their new paths) or delete them."""
    kept = []
    for p in files:
        if keep:
            into.mkdir(parents=True, exist_ok=True)
            dest = into / p.name
            shutil.move(str(p), dest)
            kept.append(str(dest))
        else:
            p.unlink(missing_ok=True)
    return kept


def auth_headers(api_key_env: str | None) -> dict:
    if api_key_env and os.environ.get(api_key_env):
        return {"Authorization": f"Bearer {os.environ[api_key_env]}"}
    return {}


def summary(rec: dict) -> str:
    """A progress line: device time, per step for decode, and the top kernel."""
    total = rec.get("total_s") or 0.0
    steps = rec.get("steps")
    per = f" ({total / steps * 1e3:.3g} ms a step over {steps})" if rec["phase"] == "decode" and steps else ""
    top = rec["kernels"][0]["name"][:60] if rec.get("kernels") else "-"
    return f"{rec.get('device')} time {total * 1e3:.4g} ms{per}, {len(rec.get('kernels') or [])} kernels, top {top}"
