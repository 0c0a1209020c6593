"""Hands out jobs for the current stage and collects the records that come back.

One controller lives in the process that runs the scenario.  Users of a local run call it
directly; users in worker processes reach it through Locust's messages (loadgen.distributed),
so a stage's request budget is counted once for the whole run and every record is written by
one writer into the one ``requests.jsonl``.
"""

from __future__ import annotations

import random
import time

import gevent
import gevent.event
import gevent.queue

from loadgen import prompts
from loadgen.conversation import Conversations, Turn
from loadgen.job import Job
from loadgen.records import RecordWriter
from loadgen.shapes import StageResult, StageSpec
from loadgen.trace import TraceEntry
from rundir.errors import ErrorKind
from rundir.slos import percentile


#: A stage whose server refused this many connections in a row stops issuing requests: a dead
#: server is not hammered (its stage ends; the runner then stops the target).
REFUSED_IN_A_ROW = 5
#: The wait before the next request after a refused connection doubles from this, to 2 s.
BACKOFF_S = 0.05


class Stage:
    def __init__(self, spec: StageSpec, index: int, base: dict, max_error_rate: float = 1.0):
        self.spec, self.index, self.base = spec, index, base
        self.max_error_rate = max_error_rate
        """Past this share of errors (over 20 requests or more) the stage stops issuing."""
        self.refused = 0
        self.backoff_until = 0.0
        self.stopped: str | None = None
        """Why the stage stopped issuing requests before its budget was spent."""
        self.remaining = spec.requests if spec.duration_s is None and not spec.trace and not spec.conversation \
            else None
        if spec.rate and spec.requests is not None and spec.duration_s is None:
            self.remaining = spec.requests
        self.deadline: float | None = None
        self.rng = random.Random(spec.seed)
        self.conversations = Conversations(spec.conversation) if spec.conversation else None
        self.arrivals: gevent.queue.Queue | None = gevent.queue.Queue() \
            if spec.rate or spec.trace or self.conversations else None
        self._arrivals_done = False
        self.in_flight = 0
        self.issued = 0
        self.records: list[dict] = []
        self.failed = 0
        """Records of this stage that are not ``ok`` (counted as they come, not re-summed)."""
        self.done = gevent.event.Event()
        self.closed = False

    def open(self) -> None:
        if self.spec.duration_s is not None:
            self.deadline = time.monotonic() + self.spec.duration_s
        if self.conversations is not None:
            for t in self.conversations.first_turns():
                self.arrivals.put(t)
        elif self.arrivals is not None:
            gevent.spawn(self._arrive)

    def _arrive(self) -> None:
        """A Poisson process: exponential gaps at the stage's mean rate; or a trace's
        requests, each at its own time."""
        if self.spec.trace:
            t0 = time.monotonic()
            for e in self.spec.trace:
                if self.closed:
                    break
                gevent.sleep(max(0.0, t0 + e.at_s / self.spec.speed - time.monotonic()))
                self.arrivals.put(e)
            self._arrivals_done = True
            self.check()
            return
        n = 0
        while not self.closed:
            if self.remaining is not None and n >= self.remaining:
                break
            gevent.sleep(self.rng.expovariate(self.spec.rate))
            if self.deadline is not None and time.monotonic() >= self.deadline:
                break
            self.arrivals.put(self._tokens())
            n += 1
        self._arrivals_done = True
        self.check()

    def _tokens(self) -> int:
        if self.spec.prompt_tokens is not None:
            return self.spec.prompt_tokens
        lengths, weights = zip(*self.spec.mix)
        return self.rng.choices(lengths, weights)[0]

    def exhausted(self) -> bool:
        if self.closed:
            return True
        if self.conversations is not None:
            return self.conversations.finished and self.arrivals.empty()
        if self.arrivals is not None:
            return self._arrivals_done and self.arrivals.empty()
        if self.remaining is not None:
            return self.remaining <= 0
        return time.monotonic() >= (self.deadline or 0)

    def take(self, wait_s: float):
        """A prompt length to send now (or a trace's request, or a conversation's turn), or None
        (nothing for now)."""
        if self.closed:
            return None
        if time.monotonic() < self.backoff_until:
            return None
        if self.arrivals is not None:
            try:
                return self.arrivals.get(timeout=wait_s)
            except gevent.queue.Empty:
                return None
        if self.remaining is not None:
            if self.remaining <= 0:
                return None
            self.remaining -= 1
            return self._tokens()
        return self._tokens() if time.monotonic() < (self.deadline or 0) else None

    def check(self) -> None:
        if self.in_flight == 0 and self.exhausted():
            self.done.set()

    def record(self, rec: dict) -> None:
        """A request of this stage ended: keep it, and stop issuing when the server is gone
        (connections refused in a row, with a growing wait between) or errors pass the bound."""
        self.records.append(rec)
        if rec.get("error_kind") == ErrorKind.CONNECTION:
            self.refused += 1
            self.backoff_until = time.monotonic() + min(2.0, BACKOFF_S * 2 ** (self.refused - 1))
            if self.refused >= REFUSED_IN_A_ROW:
                self._stop(f"{self.refused} connections refused in a row")
        else:
            self.refused = 0
        self.failed += rec["status"] != "ok"
        n = len(self.records)
        if n >= 20 and self.failed / n > self.max_error_rate:
            self._stop(f"error rate {self.failed / n:.0%} > max_error_rate {self.max_error_rate:g} "
                       f"after {n} requests")

    def turn_done(self, job: dict, rec: dict, reply: str | None) -> None:
        """A conversation's turn ended: queue the next turn, at once or after the think time."""
        nxt, delay = self.conversations.done(job, rec, reply)
        if nxt is None:
            return
        if delay <= 0:
            self._queue_turn(nxt)
        else:
            gevent.spawn_later(delay, self._queue_turn, nxt)

    def _queue_turn(self, t: Turn) -> None:
        if self.closed:
            self.conversations.abandon(t)
        else:
            self.arrivals.put(t)
        self.check()

    def _stop(self, why: str) -> None:
        if not self.closed:
            self.closed, self.stopped = True, why

    def result(self, slos=None) -> StageResult:
        recs = self.records
        ok = [r for r in recs if r["status"] == "ok"]
        errors: dict[str, int] = {}
        for r in recs:
            if r["status"] != "ok":
                errors[r["error_kind"]] = errors.get(r["error_kind"], 0) + 1
        gaps = [g for r in ok for g in r["itl_s"]]
        tpots = [r["tpot_s"] for r in ok if r["tpot_s"] is not None]
        return StageResult(
            requests=len(recs), ok=len(ok), errors=errors,
            ttft_p50=percentile((r["ttft_s"] for r in ok), 50),
            itl_p99=percentile(gaps, 99),
            tpot_p50=percentile(tpots, 50),
            goodput=sum(meets(r, slos) for r in ok) if slos is not None and slos.model_dump(exclude_none=True)
            else None,
            messages=sorted({r["error_message"] for r in recs if r["error_message"]})[:5],
            e2e_max=max((r["e2e_s"] for r in ok if r.get("e2e_s") is not None), default=None))


def meets(rec: dict, slos) -> bool:
    """Whether a successful request met every SLO given (``rundir.slos``: the report's rule)."""
    return slos.meets(ttft_s=rec["ttft_s"], tpot_s=rec["tpot_s"], itl_s=rec["itl_s"], e2e_s=rec["e2e_s"])


class Controller:
    def __init__(self, writer: RecordWriter, on_record=None):
        self.writer = writer
        self.on_record = on_record
        self.stage: Stage | None = None
        self.counter = 0
        self.total = 0
        self.errors = 0
        self.stopping = False

    # -- the runner's side --
    def open(self, stage: Stage) -> None:
        stage.open()
        self.stage = stage

    def close(self) -> None:
        if self.stage is not None:
            self.stage.closed = True
        self.stage = None

    # -- the users' side --
    def take(self) -> dict | None:
        """The next job; blocks while the stage has none for now.  None when stopping."""
        while not self.stopping:
            st = self.stage
            if st is None:
                gevent.sleep(0.02)
                continue
            tokens = st.take(0.2)
            if tokens is None:
                if st is self.stage and not st.arrivals:
                    st.check()
                    gevent.sleep(0.02)
                continue
            return self._job(st, tokens)
        return None

    def take_for_remote(self, wait_s: float) -> dict | None:
        """A job for a worker's user, or None after ``wait_s`` (the worker asks again): a
        request never waits on the master across a stage change, when its user may be stopped."""
        st = self.stage
        if st is None or self.stopping:
            gevent.sleep(min(wait_s, 0.05))
            return None
        tokens = st.take(wait_s)
        if tokens is None:
            if not st.arrivals:
                st.check()
                gevent.sleep(0.02)
            return None
        return self._job(st, tokens)

    def _job(self, st: Stage, item) -> Job:
        """The job of one request of ``st``: ``item`` is its prompt length, a trace's request
        (its prompt and output lengths and shared blocks with it) or a conversation's turn (its
        history, and its new message built here: the next turn resends it)."""
        st.in_flight += 1
        st.issued += 1
        self.counter += 1
        job = dict(st.base, stage=st.spec.label, stage_index=st.index, prompt_tokens=item,
                   concurrency=st.spec.users, request_id=f"r{self.counter:07d}", seq=self.counter,
                   stage_seq=st.issued - 1, _stage=id(st))
        if isinstance(item, Turn):
            job.update(st.conversations.job_fields(item))
            text = build_prompt(dict(job, messages=None))
            job["messages"].append({"role": "user", "content": text})
        elif not isinstance(item, int):  # a trace's request
            job.update(prompt_tokens=item.input_length, max_tokens=item.output_length,
                       hash_ids=list(item.hash_ids), shared_tokens=item.shared_tokens,
                       block_tokens=st.spec.block_tokens)
        return job

    def give_back(self, job: dict) -> None:
        """A job whose user was gone before it started: its stage may issue it again."""
        st = self.stage
        if st is not None and id(st) == job.get("_stage"):
            st.in_flight -= 1
            if st.remaining is not None:
                st.remaining += 1
            elif job.get("conversation") is not None:
                st.arrivals.put(Turn(job["conversation"], job["turn"]))
            elif st.arrivals is not None:
                st.arrivals.put(job["prompt_tokens"] if job.get("hash_ids") is None else TraceEntry(
                    0.0, job["prompt_tokens"], job["max_tokens"], tuple(job["hash_ids"]), job["shared_tokens"]))
            st.check()

    def prompt(self, job: dict) -> str:
        return build_prompt(job)

    def finish(self, job: dict, rec: dict) -> None:
        reply = rec.pop("_reply", None)  # a conversation's: resent with its history, not recorded
        self.writer.write(rec)
        self.total += 1
        self.errors += rec["status"] != "ok"
        st = self.stage
        if st is not None and id(st) == job.get("_stage"):
            st.record(rec)
            st.in_flight -= 1
            if job.get("conversation") is not None:
                st.turn_done(job, rec, reply)
            st.check()
        if self.on_record:
            self.on_record(rec)


def build_prompt(job: Job) -> str:
    if job.get("messages"):  # a conversation's turn: its new message, built when it was issued
        return job["messages"][-1]["content"]
    tok = job["tokenizer"]
    if tok["kind"] == "local":
        b = prompts.local_builder(tok["path"], job.get("prompt_path"))
    else:
        b = prompts.remote_builder(tok["url"], tok["model"], job.get("prompt_path"))
    if job.get("hash_ids") is not None:  # a trace's request: its blocks, alike wherever their ids are
        return b.build_blocks(job["prompt_tokens"], job["hash_ids"], job["block_tokens"])
    shared = job.get("shared_prefix")
    if shared:
        # groups of consecutive requests of one stage; no two stages' groups alike (an earlier
        # stage's document must not be in the cache already)
        group = job.get("stage_index", 0) * 4096 + job.get("stage_seq", job["seq"]) // shared["group_size"] % 4096
        job["shared_tokens"] = b.shared_tokens(job["prompt_tokens"], shared["question_tokens"])
        return b.build_shared(job["prompt_tokens"], job["seq"], shared["question_tokens"], group,
                              job.get("unique_prefix", True))
    return b.build(job["prompt_tokens"], job["seq"], job.get("unique_prefix", True))
