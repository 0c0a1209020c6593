"""The Locust user: takes a job, streams one completion, times every event, hands back a record.

Built on Locust's fast HTTP client (geventhttpclient): the body is read off the socket as bytes
arrive, and each server-sent event is stamped with the kernel's receive time of the read that
completed it (``read_events``), so a late wake-up of the gevent loop does not move the stamp.
The request body is serialised before the clock starts.
TTFT, ITL (the request's mean gap), TPOT and end-to-end go through ``events.request.fire`` as
their own request types, so Locust's statistics, CSV and distributed totals show them; the raw
per-gap values are in the record.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import socket
import struct
import sys
import time

import gevent
import gevent.event
from locust import constant, task
from locust.contrib.fasthttp import FastHttpUser

from loadgen import records
from loadgen.job import Job
from loadgen.openai_request import streamed_body
from rundir.errors import ErrorKind
from servers import settings

WORKER = f"{socket.gethostname()}:{os.getpid()}"


def request_body(job: Job, prompt: str) -> bytes:
    return json.dumps(streamed_body(job["model"], job["max_tokens"], chat=job["api"] == "chat", prompt=prompt,
                                    messages=job.get("messages"),
                                    ignore_eos=bool(job.get("ignore_eos")))).encode()


def _error_message(resp) -> str:
    try:
        data = json.loads(resp.content or b"{}")
        err = data.get("error", data)
        return str(err.get("message", err) if isinstance(err, dict) else err)[:500]
    except Exception:
        return (resp.content or b"")[:500].decode(errors="replace")


SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
"""Linux's receive-timestamp option (Python's socket module lacks the name)."""
_LINUX = sys.platform.startswith("linux") and hasattr(socket, "CMSG_SPACE")
_CMSG = socket.CMSG_SPACE(16) if _LINUX else 0
_TIMESPEC = struct.Struct("qq")
_SEP = b"\n\n"


def kernel_stamps_wanted() -> bool:
    """Kernel receive stamps are used on Linux unless ``CTXLOAD_KERNEL_STAMPS=0``."""
    return _LINUX and settings.kernel_stamps()


def _enable_kernel_stamps(sock) -> bool:
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        return True
    except (OSError, AttributeError):
        return False


class StreamClosed(ConnectionError):
    """The server closed the connection before the end of the stream; carries what came."""

    def __init__(self, body: bytes, marks: list):
        super().__init__("the server closed the connection before the end of the stream")
        self.body, self.marks = body, marks


def read_events(raw, timing: records.Timing) -> tuple[bytes, list[tuple[int, int, bool]]]:
    """Read the SSE body off the socket, stamping each read with when its bytes arrived.

    While the stream runs, each read only feeds the response's parser (which de-chunks into its
    body buffer) and notes (stamp, bytes so far, kernel?): nothing else competes with the other
    streams' wake-ups.  Returns the body and the marks; ``_parse`` splits and parses the lines
    after the end, and gives each event the stamp of the read that completed it.  A stream the
    server cut short raises ``StreamClosed``, which carries what came.

    The stamp is the kernel's: with ``SO_TIMESTAMPNS`` on the socket, each ``recvmsg`` carries
    the arrival time (CLOCK_REALTIME) of the last segment it copied, converted here to the
    ``perf_counter_ns`` domain — so a read that the gevent loop gets to late is still stamped
    when its bytes arrived.  To give each event its own segment's stamp, the reader first peeks
    at what is waiting and, when that holds more than one event end (``\n\n``; chunked framing
    never contains one), reads up to each event end with its own ``recvmsg``.  A kernel stamp
    outside [sent, now], a missing one, a socket that refuses the option or ``recvmsg`` (TLS), a
    non-Linux host or ``CTXLOAD_KERNEL_STAMPS=0`` fall back to ``perf_counter_ns()`` after the
    read (the user-space stamp), as do bytes that came with the headers.
    """
    buf = raw._body_buffer
    marks = [(time.perf_counter_ns(), len(buf), False)]
    sock = raw._sock
    kernel = sock is not None and kernel_stamps_wanted() and _enable_kernel_stamps(sock)
    # CLOCK_REALTIME − perf_counter_ns, once per stream: reads that share a kernel stamp (a
    # merged segment) then share one perf stamp too, instead of differing by the jitter of
    # sampling two clocks
    offset = time.time_ns() - time.perf_counter_ns()
    while not raw.message_complete:
        sock = raw._sock
        if sock is None:
            break
        try:
            if kernel:
                try:
                    more = _read_stamped(sock, raw, buf, marks, timing.sent_ns, offset)
                except NotImplementedError:  # a TLS socket: no recvmsg; nothing was read
                    kernel = False
                    continue
                if more:
                    continue
                data = b""
            else:
                data = sock.recv(65536)
        except BaseException:
            raw.release()
            raise
        now = time.perf_counter_ns()
        if not data:
            raw.release()
            raise StreamClosed(bytes(buf), marks)
        raw.feed(data)
        marks.append((now, len(buf), False))
    timing.end_ns = marks[-1][0]  # the last bytes' arrival, before any parsing
    return bytes(buf), marks


def _read_stamped(sock, raw, buf: bytearray, marks: list, sent_ns: int, offset: int) -> bool:
    """Wait for bytes, then read what is waiting, one ``recvmsg`` per event end, each marked
    with its kernel stamp (CLOCK_REALTIME − ``offset``, never before the previous mark) or the
    user-space one where that is missing or implausible. Returns False at the end of the stream
    (the peer closed)."""
    peek = sock.recvmsg(65536, 0, socket.MSG_PEEK)[0]  # blocks (cooperatively) until data
    n = len(peek)
    if not n:
        return False
    e = peek.find(_SEP) + 2
    if e == 1 or (n - e <= 2 and peek.find(_SEP, e) < 0):
        ends = [n]  # at most one event end, and no byte of a next event after it: one read
    else:
        ends = []
        while e > 1:
            ends.append(e)
            e = peek.find(_SEP, e) + 2
        if ends[-1] < n:
            ends.append(n)
    perf = time.perf_counter_ns
    pos = 0
    for e in ends:
        while pos < e:
            data, anc, _, _ = sock.recvmsg(e - pos, _CMSG)
            now = perf()
            if not data:
                return False
            pos += len(data)
            raw.feed(data)
            if anc:
                _, kind, val = anc[0]
                if kind == SO_TIMESTAMPNS and len(val) >= 16:
                    sec, nsec = _TIMESPEC.unpack_from(val)
                    k = sec * 1_000_000_000 + nsec - offset
                    if sent_ns <= k <= now:
                        # a kernel stamp can precede the user-space stamp of an earlier read
                        marks.append((max(k, marks[-1][0]), len(buf), True))
                        continue
            marks.append((now, len(buf), False))
    return True


def _parse(body: bytes, marks: list[tuple[int, int, bool]], timing: records.Timing, chat: bool) -> str | None:
    error = None
    pos, m = 0, 0
    feed = timing.feed
    for line in body.split(b"\n"):
        end = pos + len(line) + 1
        pos = end
        if not line.startswith(b"data:"):
            continue
        while m < len(marks) - 1 and marks[m][1] < end:
            m += 1
        err = feed(line, marks[m][0], chat, marks[m][2])
        if err and error is None:
            error = err
        if timing.response_id is None:
            timing.response_id = _response_id(line)
    return error


def _response_id(line: bytes) -> str:
    """The event's ``id`` (the same in every event of an OpenAI stream), or ``""``."""
    try:
        rid = json.loads(line[5:]).get("id")
    except (ValueError, AttributeError):
        return ""
    return rid if isinstance(rid, str) else ""


def stream_once(session, job: dict, prompt: str, timeout_s: float) -> dict:
    """Send one streamed request through a FastHttpSession and build its record."""
    sent = send(session, job, prompt, timeout_s)
    rec = sent.record()
    if sent.cancelled:
        rec["_cancelled"] = True
    return rec


class Sent:
    """One request's outcome as read off the wire (the timed part), before any parsing:
    ``record()`` parses the body and builds the record."""

    __slots__ = ("job", "timing", "chat", "body", "marks", "status", "kind", "message", "start_time",
                 "cancelled", "failed_ns")

    def record(self) -> dict:
        t = self.timing
        if self.body is not None:
            stream_err = _parse(self.body, self.marks, t, self.chat)
            if stream_err and self.kind is None:
                self.message, self.kind = stream_err[:500], records.classify_http(500, stream_err)
        if t.end_ns is None and t.token_ns:
            t.end_ns = self.failed_ns
        rec = records.build(self.job, t, http_status=self.status, error_kind=self.kind,
                            error_message=self.message, start_time=self.start_time, worker=WORKER)
        if t.text is not None:  # a conversation's reply, resent with its next turn (not recorded)
            rec["_reply"] = "".join(t.text)
        return rec


def send(session, job: dict, prompt: str, timeout_s: float, turn=None) -> Sent:
    """Send one streamed request through a FastHttpSession and read its stream to the end;
    ``turn``, when given, is waited for first (``SpareTime.turn``), before the clock starts."""
    chat = job["api"] == "chat"
    path = "/v1/chat/completions" if chat else "/v1/completions"
    data = request_body(job, prompt)
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream",
               "Accept-Encoding": "identity"}
    if job.get("api_key_env") and os.environ.get(job["api_key_env"]):
        headers["Authorization"] = f"Bearer {os.environ[job['api_key_env']]}"
    out = Sent()
    out.job, out.chat, out.body, out.marks, out.cancelled = job, chat, None, None, False
    out.start_time = time.time()
    keep = [] if job.get("messages") else None  # a conversation's reply is its next turn's history
    timing = out.timing = records.Timing(sent_ns=time.perf_counter_ns(), text=keep)
    status = kind = message = None
    try:
        if turn is not None:
            turn()
            out.start_time = time.time()
            timing = out.timing = records.Timing(sent_ns=time.perf_counter_ns(), text=keep)
        with gevent.Timeout(timeout_s, TimeoutError(f"no end of stream after {timeout_s:g} s")):
            resp = session.request("POST", job["url"] + path, data=data, headers=headers, stream=True,
                                   name=f"{job['target']} {job['stage']}")
            status = resp.status_code or None
            err = getattr(resp, "error", None)
            if err is not None and not status:
                raise err
            if status != 200:
                message = _error_message(resp)
                kind = records.classify_http(status or 0, message)
            else:
                out.body, out.marks = read_events(resp._response, timing)
    except gevent.GreenletExit:
        kind, message = ErrorKind.CANCELLED.value, "the load generator stopped the request"
        out.cancelled = True
    except StreamClosed as e:  # parse what came: a crash mid-stream still has its tokens
        out.body, out.marks = e.body, e.marks
        kind, message = records.classify_exception(e), f"ConnectionError: {e}"[:500]
    except (KeyboardInterrupt, SystemExit):
        raise  # Ctrl-C landing in this greenlet stops the run (gevent re-raises it in the main one)
    except BaseException as e:  # noqa: BLE001 - every failure becomes data (gevent.Timeout is a BaseException)
        e = records.unwrap(e)
        kind, message = records.classify_exception(e), f"{type(e).__name__}: {e}"[:500]
    out.failed_ns = time.perf_counter_ns()
    out.status, out.kind, out.message = status, kind, message
    return out


class SpareTime:
    """The event loop's spare time, handed out one piece at a time: what a user does besides
    reading its stream — starting a request (about 0.5 ms of CPU: the HTTP client, headers) and,
    after the stream, parsing it, building the record, writing it and firing Locust's events
    (about 1 ms) — waits until no I/O is pending, one piece per turn of the loop; starts go
    before records, so a record's work never delays a request.

    Streams of a closed-loop stage start and end together.  Done in their own greenlets right
    away, a few hundred starts or ends run back to back and hold every other stream's reads for
    as long: long enough for several events to wait in one socket, where the kernel merges
    their segments and with them their receive stamps.  One at a time, each when nothing is
    waiting to be read, they give way to the reads instead.
    """

    def __init__(self):
        self.starts: collections.deque = collections.deque()
        self.records: collections.deque = collections.deque()
        self.wake = gevent.event.Event()
        self.greenlet = None

    def _put(self, queue: collections.deque, item) -> None:
        queue.append(item)
        self.wake.set()
        if self.greenlet is None or self.greenlet.dead:
            self.greenlet = gevent.spawn(self._loop)

    def turn(self) -> None:
        """Wait for a turn (then run, in the caller's greenlet, until it next blocks)."""
        ev = gevent.event.Event()
        self._put(self.starts, ev)
        ev.wait()

    def later(self, fn) -> None:
        """Run ``fn`` in a turn of its own; the caller goes on at once."""
        self._put(self.records, fn)

    def drain(self) -> None:
        """Run every queued record now, in the caller's greenlet: the run is stopping (Ctrl-C,
        the end, a worker told to stop), and a finished request must not be lost."""
        while self.records:
            try:
                self.records.popleft()()
            except Exception:  # noqa: BLE001
                logging.getLogger(__name__).exception("finishing a stream's record failed")

    def _loop(self) -> None:
        starts, recs = self.starts, self.records
        while True:
            if not starts and not recs:
                self.wake.clear()
                self.wake.wait()
                continue
            gevent.idle()
            if starts:
                starts.popleft().set()
                continue
            if not recs:  # drained meanwhile (the run is stopping)
                continue
            try:
                recs.popleft()()
            except Exception:  # noqa: BLE001 - one failing record must not stop the others
                logging.getLogger(__name__).exception("finishing a stream's record failed")


SPARE = SpareTime()
"""This process's one (users of a process share one event loop)."""


def fire_events(env, rec: dict) -> None:
    """Report a finished request to Locust under its own request types."""
    fire = env.events.request.fire
    name = f"{rec['target']} {rec['stage']}"
    ctx = {"target": rec["target"], "stage": rec["stage"]}
    if rec["status"] != "ok":
        fire(request_type="E2E", name=name, response_time=(rec["e2e_s"] or 0) * 1000, response_length=0,
             exception=RuntimeError(f"{rec['error_kind']}: {rec['error_message']}"), context=ctx)
        return
    fire(request_type="TTFT", name=name, response_time=rec["ttft_s"] * 1000, response_length=0,
         exception=None, context=ctx)
    if rec["itl_s"]:
        fire(request_type="ITL", name=name, response_time=sum(rec["itl_s"]) / len(rec["itl_s"]) * 1000,
             response_length=0, exception=None, context=ctx)
    if rec["tpot_s"] is not None:
        fire(request_type="TPOT", name=name, response_time=rec["tpot_s"] * 1000, response_length=0,
             exception=None, context=ctx)
    fire(request_type="E2E", name=name, response_time=rec["e2e_s"] * 1000,
         response_length=rec["completion_tokens"] or 0, exception=None, context=ctx)


class StreamingUser(FastHttpUser):
    """One stream at a time: the user count of a stage is its concurrency."""

    host = "http://127.0.0.1"
    """Unused: every job carries its target's absolute URL."""
    wait_time = constant(0)
    """Closed loop: the next request as soon as the last ends (Poisson stages pace via jobs)."""
    network_timeout = 3600.0
    """Socket read timeout; the scenario's ``request_timeout_s`` bounds each request."""
    connection_timeout = 30.0
    max_retries = 0
    """Never resend a request silently: a failure is a record."""
    concurrency = 2
    """Connections in this user's pool (one stream at a time needs one)."""
    insecure = True

    @task
    def one_request(self) -> None:
        source = self.environment.ctxload  # a loadgen.controller.Controller or a worker's proxy
        job = source.take()
        if job is None:
            return
        prompt = source.prompt(job)
        sent = send(self.client, job, prompt, job["timeout_s"], turn=SPARE.turn)
        env = self.environment

        def after() -> None:
            rec = sent.record()
            source.finish(job, rec)
            fire_events(env, rec)

        if sent.cancelled:  # the run is stopping: no stream left to time
            after()
            raise gevent.GreenletExit()
        if sent.kind == ErrorKind.CONNECTION:  # refused: counted before this user takes another job,
            after()                    # so a dead server's stage stops (Stage.record)
            return
        SPARE.later(after)  # the next request need not wait for this one's record
