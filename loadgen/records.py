"""One request's record: raw ``perf_counter_ns`` stamps in, the run directory's fields out.

Each server-sent event that carries a token is stamped with when the read that completed it
arrived, in ``perf_counter_ns`` nanoseconds: the kernel's receive time where the socket gives one
(loadgen.user), else ``perf_counter_ns()`` after the read.  TTFT, ITL, TPOT and
end-to-end are computed from those stamps (DESIGN.md's definitions, the same as vLLM's
benchmark).  A failure is data on the record (``error_kind`` and message), never a lost record.
"""

from __future__ import annotations

import json
import os
import re
import socket
from dataclasses import dataclass, field

from loadgen.job import Job
from rundir.errors import ErrorKind
from rundir.requests import RequestRecord

_OOM = re.compile(r"out of memory|\boom\b|outofmemory|cannot allocate|memory.*exhausted|"
                  r"not enough (kv|memory|state)|no (free )?state slot", re.I)


@dataclass
class Timing:
    """Stamps of one streamed request (nanoseconds of ``perf_counter_ns``)."""

    sent_ns: int
    token_ns: list[int] = field(default_factory=list)
    empty: list[bool] = field(default_factory=list)
    """Per token event: its text was empty (a finish-only event, or a partial character)."""
    kernel: list[bool] = field(default_factory=list)
    """Per token event: its stamp is the kernel's receive time (else user space's, after the read)."""
    end_ns: int | None = None
    usage: dict | None = None
    events: int = 0
    response_id: str | None = None
    """The stream's ``id`` (from its first event), when the server gives one."""
    text: list[str] | None = None
    """The generated text, piece by piece, when kept (a list given; a chat stream only)."""

    def feed(self, line: bytes, now_ns: int, chat: bool, kernel: bool = False) -> str | None:
        """Take one SSE line stamped ``now_ns`` (``kernel``: a kernel receive stamp); returns an
        error message carried in the stream, if any."""
        if not line.startswith(b"data:"):
            return None
        payload = line[5:].strip()
        if not payload or payload == b"[DONE]":
            return None
        self.events += 1
        # Fast path for the common token event: no JSON parse, only byte tests (a JSON string
        # cannot contain an unescaped quote, so these keys cannot be faked by token text).
        if not chat and b'"text":' in payload and b'"usage":{' not in payload and b'"error"' not in payload:
            self.token_ns.append(now_ns)
            self.empty.append(b'"text":""' in payload)
            self.kernel.append(kernel)
            return None
        try:
            data = json.loads(payload)
        except ValueError:
            return f"unparseable event: {payload[:200]!r}"
        if "error" in data:
            err = data["error"]
            return err.get("message", str(err)) if isinstance(err, dict) else str(err)
        if data.get("usage"):
            self.usage = data["usage"]
        choices = data.get("choices")
        if choices:
            c = choices[0]
            if chat:
                delta = c.get("delta") or {}
                text = delta.get("content")
                bearing = text is not None and not (delta.get("role") and text == "")
            else:
                text = c.get("text")
                bearing = text is not None
            if bearing:
                self.token_ns.append(now_ns)
                self.empty.append(text == "")
                self.kernel.append(kernel)
                if self.text is not None and isinstance(text, str):
                    self.text.append(text)
        return None

    def settle(self) -> None:
        """When the server's usage says fewer tokens than events counted, the extra events are
        trailing empty ones (a finish-only event): drop them, so ITL has one gap per token."""
        n = (self.usage or {}).get("completion_tokens")
        if n is None:
            return
        while len(self.token_ns) > max(int(n), 1) and self.empty and self.empty[-1]:
            self.token_ns.pop()
            self.empty.pop()
            self.kernel.pop()
        return None

    def stamp_clock(self) -> str | None:
        """``kernel`` when every token event's stamp is the kernel's receive time, ``user`` when
        none is, ``mixed`` otherwise; None without token events."""
        if not self.token_ns:
            return None
        k = sum(self.kernel)
        return "kernel" if k == len(self.token_ns) else "user" if k == 0 else "mixed"


def classify_http(status: int, message: str) -> str:
    if _OOM.search(message or ""):
        return ErrorKind.OOM.value
    return (ErrorKind.REJECTED if 400 <= status < 500 else ErrorKind.SERVER_ERROR).value


def unwrap(exc: BaseException) -> BaseException:
    """The error under a client's retry wrapper: geventhttpclient re-raises a timeout that hit
    before the response's headers as ``RetriesExceeded(..., original=<the timeout>)``."""
    inner = getattr(exc, "original", None)
    return inner if isinstance(inner, BaseException) else exc


def classify_exception(exc: BaseException) -> str:
    exc = unwrap(exc)
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, (socket.timeout, TimeoutError)) or "timeout" in text.lower() or "timed out" in text.lower():
        return ErrorKind.TIMEOUT.value
    if _OOM.search(text):
        return ErrorKind.OOM.value
    if isinstance(exc, (ConnectionError, OSError)) or "connection" in text.lower() or "closed" in text.lower():
        return ErrorKind.CONNECTION.value
    return ErrorKind.SERVER_ERROR.value


def build(job: Job, timing: Timing, *, http_status: int | None, error_kind: str | None,
          error_message: str | None, start_time: float, worker: str) -> dict:
    """The ``requests.jsonl`` record (docs/contracts.md §4)."""
    t = timing
    t.settle()
    s = 1e-9
    ttft = (t.token_ns[0] - t.sent_ns) * s if t.token_ns else None
    itl = [(b - a) * s for a, b in zip(t.token_ns, t.token_ns[1:])]
    e2e = (t.end_ns - t.sent_ns) * s if t.end_ns is not None else None
    usage = t.usage or {}
    if usage.get("completion_tokens") is not None:
        completion, source = int(usage["completion_tokens"]), "usage"
    else:
        completion, source = len(t.token_ns), "events"
    tpot = (e2e - ttft) / (completion - 1) if (e2e is not None and ttft is not None and completion > 1) else None
    if error_kind is None and not t.token_ns:
        error_kind, error_message = ErrorKind.SERVER_ERROR.value, error_message or "the stream carried no token"
    if error_kind is None and job.get("ignore_eos") and source == "usage" and completion < job["max_tokens"]:
        # asked for exactly max_tokens: a server that stops short (vLLM shortens the output of a
        # prompt that leaves less room than asked) did not serve this prompt as asked
        error_kind = ErrorKind.TRUNCATED.value
        error_message = (f"the server generated {completion} of the {job['max_tokens']} tokens asked "
                         "with ignore_eos (its context limit cut the output)")
    return RequestRecord(
        request_id=job["request_id"], target=job["target"], model=job["model"], family=job.get("family"),
        engine=job.get("engine"), stage=job["stage"], stage_index=job["stage_index"], api=job["api"],
        prompt_tokens_requested=job["prompt_tokens"], prompt_tokens=usage.get("prompt_tokens"),
        completion_tokens=completion, max_tokens=job["max_tokens"], token_count_source=source,
        concurrency=job.get("concurrency", 1), start_time=start_time, ttft_s=ttft, itl_s=itl, tpot_s=tpot,
        e2e_s=e2e if error_kind is None else (e2e if t.token_ns else None),
        status="ok" if error_kind is None else "error", http_status=http_status, error_kind=error_kind,
        error_message=error_message, worker=worker, response_id=t.response_id or None,
        stamp_clock=t.stamp_clock(), shared_tokens=job.get("shared_tokens"), cached_tokens=_cached(usage),
        conversation=job.get("conversation"), turn=job.get("turn"),
    ).to_json()


def _cached(usage: dict) -> int | None:
    """Prompt tokens the server took from its prefix cache, where its usage says
    (``prompt_tokens_details.cached_tokens``: vLLM with --enable-prompt-tokens-details)."""
    details = usage.get("prompt_tokens_details")
    n = details.get("cached_tokens") if isinstance(details, dict) else None
    return int(n) if isinstance(n, (int, float)) else None


class RecordWriter:
    """Appends one JSON line per record with a single ``write`` on an ``O_APPEND`` descriptor:
    the line is in the kernel the moment the call returns, so killing the load generator loses
    no finished request, and writers in several processes never interleave a line."""

    def __init__(self, path: str | os.PathLike):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, record: dict) -> None:
        os.write(self.fd, (json.dumps(record, separators=(",", ":")) + "\n").encode())

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
