"""Prompt exactness, the record's arithmetic, SSE parsing and the max-context bisection."""

from __future__ import annotations

import math
import time

import pytest

from loadgen import records, shapes
from loadgen import scenario as sc
from loadgen.prompts import LocalTokenizer, PromptBuilder

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import build_tiny  # noqa: E402


@pytest.fixture(scope="module")
def builder():
    return PromptBuilder(LocalTokenizer(build_tiny("tiny-llama")))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 17, 64, 1000, 4096, 12345])
def test_prompt_has_exact_token_count(builder, n):
    assert builder.tok.count(builder.build(n, index=n)) == n


def test_prompts_differ_per_request_but_not_in_length(builder):
    a, b = builder.build(500, 1), builder.build(500, 2)
    assert a != b and builder.tok.count(a) == builder.tok.count(b) == 500
    assert builder.build(500, 7, unique=False) == builder.build(500, 8, unique=False)


def test_file_source_is_exact(builder):
    fb = PromptBuilder(builder.tok, "shipped")
    text = fb.build(3000, 5)
    assert fb.tok.count(text) == 3000
    assert " light on a far out at" in text  # the shipped text's words, in its order


@pytest.mark.parametrize("tokens, question", [(512, 32), (4096, 256), (40, 64), (3, 256)])
def test_shared_prefix_prompts_share_exactly_their_document(builder, tokens, question):
    """A group's requests share their first shared_tokens tokens and no more; every prompt has
    exactly the tokens asked; the next group shares nothing with this one."""
    ids = builder.tok._tok
    shared = builder.shared_tokens(tokens, question)
    group = [builder.build_shared(tokens, i, question, group=1) for i in range(4, 8)]
    other = builder.build_shared(tokens, 8, question, group=2)
    enc = [ids(t)["input_ids"] for t in group + [other]]
    assert all(len(e) == tokens for e in enc)
    for e in enc[1:4]:
        assert e[:shared] == enc[0][:shared] and e[shared:] != enc[0][shared:]
    assert enc[4][:shared] != enc[0][:shared]
    assert shared == (tokens - question if tokens - question > builder.special else builder.special + 1)


def test_million_token_prompt_is_fast_and_exact(builder):
    t0 = time.perf_counter()
    text = builder.build(1 << 20, index=9)
    assert time.perf_counter() - t0 < 5.0
    assert builder.tok.count(text) == 1 << 20


def _job(**kw):
    base = dict(request_id="r1", target="t", model="m", family="ssm", engine="e", stage="prompt=8",
                stage_index=0, api="completions", prompt_tokens=8, max_tokens=4)
    return {**base, **kw}


def _feed(t: records.Timing, stamps_ns, usage=True, chat=False):
    for i, ns in enumerate(stamps_ns):
        ev = ('{"choices":[{"delta":{"content":"x"}}]}' if chat else '{"choices":[{"text":"x"}]}')
        assert t.feed(f"data: {ev}".encode(), ns, chat) is None
    if usage:
        t.feed(b'data: {"choices":[],"usage":{"prompt_tokens":8,"completion_tokens":4}}', stamps_ns[-1], chat)
    t.feed(b"data: [DONE]", stamps_ns[-1], chat)


def test_record_derives_ttft_itl_tpot_e2e_from_stamps():
    t = records.Timing(sent_ns=1_000_000_000)
    _feed(t, [1_100_000_000, 1_110_000_000, 1_130_000_000, 1_160_000_000])
    t.end_ns = 1_170_000_000
    r = records.build(_job(), t, http_status=200, error_kind=None, error_message=None, start_time=5.0, worker="w")
    assert r["ttft_s"] == pytest.approx(0.1)
    assert r["itl_s"] == pytest.approx([0.01, 0.02, 0.03])
    assert r["e2e_s"] == pytest.approx(0.17)
    assert r["tpot_s"] == pytest.approx((0.17 - 0.1) / 3)
    assert (r["completion_tokens"], r["token_count_source"], r["prompt_tokens"]) == (4, "usage", 8)
    assert r["status"] == "ok" and r["error_kind"] is None


def test_without_usage_tokens_are_counted_events_and_chat_role_event_is_not_a_token():
    t = records.Timing(sent_ns=0)
    t.feed(b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}', 5, True)
    _feed(t, [10, 20, 30], usage=False, chat=True)
    t.end_ns = 40
    r = records.build(_job(api="chat"), t, http_status=200, error_kind=None, error_message=None,
                      start_time=0, worker="w")
    assert (r["completion_tokens"], r["token_count_source"]) == (3, "events")
    assert r["ttft_s"] == pytest.approx(10e-9)


@pytest.mark.parametrize("status,msg,kind", [
    (400, "prompt too long", "rejected"), (429, "queue full", "rejected"),
    (500, "CUDA out of memory", "oom"), (503, "engine dead", "server_error"),
])
def test_http_errors_are_classified(status, msg, kind):
    assert records.classify_http(status, msg) == kind


def test_exceptions_are_classified():
    assert records.classify_exception(ConnectionRefusedError(111, "refused")) == "connection"
    assert records.classify_exception(TimeoutError("no end of stream")) == "timeout"


def test_error_in_stream_is_data_not_lost():
    t = records.Timing(sent_ns=0)
    msg = t.feed(b'data: {"error":{"message":"out of memory","code":500}}', 1, False)
    r = records.build(_job(), t, http_status=200, error_kind=records.classify_http(500, msg),
                      error_message=msg, start_time=0, worker="w")
    assert (r["status"], r["error_kind"], r["ttft_s"]) == ("error", "oom", None)


def _search(limit: int, load: sc.MaxContext, crash_above: int | None = None, **kw):
    s = shapes.Search()
    gen = shapes.bisect(load, s, **kw)
    try:
        spec = next(gen)
        while True:
            n = spec.prompt_tokens
            if crash_above and n > crash_above:
                res = shapes.StageResult(requests=1, ok=0, errors={"connection": 1})
            elif n <= limit:
                res = shapes.StageResult(requests=1, ok=1)
            else:
                res = shapes.StageResult(requests=1, ok=0, errors={"rejected": 1})
            spec = gen.send(res)
    except StopIteration:
        pass
    return s


@pytest.mark.parametrize("limit", [1500, 3000, 40000, 123457, 1_000_000])
def test_bisection_brackets_the_limit_within_tolerance(limit):
    load = sc.MaxContext(kind="max_context", min_tokens=1024, max_tokens=1 << 20, tolerance=0.01)
    s = _search(limit, load)
    assert s.converged and s.max_ok <= limit < s.min_fail
    assert (s.min_fail - s.max_ok) <= 0.01 * s.max_ok
    assert s.failure_kind == "rejected"


def test_bisection_reports_a_limit_beyond_max_tokens_and_stops_on_crash():
    load = sc.MaxContext(kind="max_context", min_tokens=1024, max_tokens=8192)
    s = _search(1 << 30, load)
    assert s.max_ok == 8192 and s.min_fail is None and s.converged
    s = _search(1 << 30, sc.MaxContext(kind="max_context"), crash_above=5000)
    assert s.crashed and s.max_ok == 4096 and s.min_fail == 8192 and s.failure_kind == "connection"
    assert len(s.probes) == 4  # 1024, 2048, 4096, 8192: nothing after the crash


def test_the_servers_declared_limit_settles_the_search_in_two_probes():
    load = sc.MaxContext(kind="max_context", min_tokens=1024, max_tokens=1 << 22, tolerance=0.01)
    s = _search(654_300, load, hint=654_300)  # vLLM's max_model_len less the output
    assert [p["prompt_tokens"] for p in s.probes] == [654_300, 654_301]
    assert s.converged and (s.max_ok, s.min_fail, s.failure_kind) == (654_300, 654_301, "rejected")
    # the declared limit fails just above the real one (vLLM stalled a prompt filling its KV
    # cache exactly): one tolerance below settles it
    s = _search(650_000, load, hint=654_300)
    assert [p["prompt_tokens"] for p in s.probes] == [654_300, 647_822]  # ceil(654,300 / 1.01)
    assert s.converged and (s.max_ok, s.min_fail) == (647_822, 654_300)
    # the declared limit does not hold (an OOM far below it): start again from the shortest
    s = _search(100_000, load, hint=654_300)
    assert s.probes[0] == {"prompt_tokens": 654_300, "ok": False, "failure_kind": "rejected"}
    assert s.probes[1]["prompt_tokens"] == 647_822 and not s.probes[1]["ok"]
    assert s.probes[2]["prompt_tokens"] == 1024
    assert s.converged and s.max_ok <= 100_000 < s.min_fail <= 1.01 * s.max_ok + 1
    # more than declared works too: keep doubling from there
    s = _search(3_000_000, load, hint=654_300)
    assert s.max_ok >= 654_301 and s.max_ok <= 3_000_000 < s.min_fail


def test_a_search_after_a_sweep_starts_above_what_the_sweep_got_through():
    load = sc.MaxContext(kind="max_context", min_tokens=1024, max_tokens=1 << 22, tolerance=0.01)
    s = _search(3_000_000, load, known_ok=1 << 20)
    assert s.probes[0]["prompt_tokens"] == 1 << 21 and s.known_ok == 1 << 20
    assert s.converged and s.max_ok <= 3_000_000 < s.min_fail
    s = _search(1 << 30, load, known_ok=1 << 22)  # the sweep already reached max_tokens
    assert s.probes == [] and s.converged and s.max_ok == 1 << 22
    s = _search(900_000, load, known_ok=1 << 18, hint=1_000_000)  # the declared limit fails
    assert s.probes[0] == {"prompt_tokens": 1_000_000, "ok": False, "failure_kind": "rejected"}
    assert s.probes[1]["prompt_tokens"] > 1 << 18  # bisects from what the sweep got through
    assert s.converged and s.max_ok <= 900_000 < s.min_fail


def test_a_targets_max_prompt_tokens_caps_the_search():
    load = sc.MaxContext(kind="max_context", min_tokens=1024, max_tokens=1 << 22)
    s = _search(1 << 30, load, cap=100_000, hint=200_000)  # a hint past the cap is ignored
    assert s.max_ok == 100_000 and s.min_fail is None and s.converged and s.max_tried == 100_000


def test_client_exporter_serves_contract_names_over_http():
    import urllib.request

    from loadgen.exporter import ClientMetrics
    from loadgen.scrape import scrape

    m = ClientMetrics()
    port = m.serve(0)
    m.stage("t", "prompt=8", users=3, prompt_tokens=8)
    ok = {"target": "t", "stage": "prompt=8", "status": "ok", "ttft_s": 0.2, "itl_s": [0.01, 0.02]}
    m.record(ok)
    m.record({**ok, "status": "error", "error_kind": "oom"})
    samples = scrape(f"http://127.0.0.1:{port}/metrics")
    by = {(s["name"], tuple(sorted(s["labels"].items()))): s["value"] for s in samples}
    lab = (("stage", "prompt=8"), ("target", "t"))
    assert by[("ctxload:client_users", lab)] == 3
    assert by[("ctxload:client_prompt_tokens", lab)] == 8
    assert by[("ctxload:client_requests_total", tuple(sorted(lab + (("status", "ok"),))))] == 1
    assert by[("ctxload:client_errors_total", tuple(sorted(lab + (("kind", "oom"),))))] == 1
    assert by[("ctxload:client_time_to_first_token_seconds_count", lab)] == 1
    assert by[("ctxload:client_inter_token_latency_seconds_count", lab)] == 2
    assert urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").status == 200


def test_trailing_finish_only_event_is_not_a_token():
    t = records.Timing(sent_ns=0)
    for ns in (10, 20, 30):
        t.feed(b'data: {"choices":[{"text":" a","finish_reason":null}]}', ns, False)
    t.feed(b'data: {"choices":[{"text":"","finish_reason":"length"}]}', 31, False)
    t.feed(b'data: {"choices":[],"usage":{"prompt_tokens":8,"completion_tokens":3}}', 31, False)
    t.end_ns = 32
    r = records.build(_job(), t, http_status=200, error_kind=None, error_message=None, start_time=0, worker="w")
    assert r["completion_tokens"] == 3 and len(r["itl_s"]) == 2


def test_stamp_clock_says_which_clock_stamped_the_token_events():
    def clock(flags, finish_flag=None):
        t = records.Timing(sent_ns=0)
        for i, k in enumerate(flags):
            t.feed(b'data: {"choices":[{"text":" a"}]}', 10 * (i + 1), False, k)
        if finish_flag is not None:  # a trailing finish-only event, dropped by settle()
            t.feed(b'data: {"choices":[{"text":"","finish_reason":"length"}]}', 99, False, finish_flag)
            t.feed(f'data: {{"choices":[],"usage":{{"completion_tokens":{len(flags)}}}}}'.encode(), 99, False)
        t.end_ns = 100
        return records.build(_job(), t, http_status=200, error_kind=None, error_message=None, start_time=0,
                             worker="w")["stamp_clock"]

    assert clock([True, True, True]) == "kernel"
    assert clock([False, False]) == "user"  # CTXLOAD_KERNEL_STAMPS=0, TLS, a non-Linux host
    assert clock([False, True, True]) == "mixed"  # e.g. the first token came with the headers
    assert clock([True, True], finish_flag=False) == "kernel"  # only the kept token events count
    t = records.Timing(sent_ns=0)
    t.feed(b'data: {"choices":[{"text":" a"}]}', 10, False)  # feed's default: a user-space stamp
    assert t.stamp_clock() == "user"
    assert records.Timing(sent_ns=0).stamp_clock() is None


def test_goodput_counts_requests_meeting_every_slo():
    from loadgen.controller import meets

    slos = sc.Slos(ttft_s=0.5, itl_s=0.05, tpot_s=0.02)
    good = {"ttft_s": 0.4, "tpot_s": 0.01, "itl_s": [0.01] * 99, "e2e_s": 1.5}
    assert meets(good, slos)
    assert not meets({**good, "ttft_s": 0.6}, slos)
    assert not meets({**good, "tpot_s": 0.03}, slos)
    assert not meets({**good, "itl_s": [0.01] * 90 + [0.2] * 10}, slos)  # p99 gap over the bound
    assert meets({**good, "itl_s": [0.01] * 199 + [0.2]}, slos)          # one slow gap in 200 is p99.5


def test_stage_opens_its_series_at_zero_before_any_request():
    from prometheus_client.exposition import generate_latest

    from loadgen.exporter import ClientMetrics

    m = ClientMetrics()
    m.stage("t", "prompt=1024", 1, 1024)
    text = generate_latest(m.registry).decode()
    lab = 'stage="prompt=1024",target="t"'
    for line in (f"ctxload:client_time_to_first_token_seconds_count{{{lab}}} 0.0",
                 f"ctxload:client_inter_token_latency_seconds_count{{{lab}}} 0.0",
                 'ctxload:client_requests_total{stage="prompt=1024",status="ok",target="t"} 0.0',
                 'ctxload:client_errors_total{kind="timeout",stage="prompt=1024",target="t"} 0.0'):
        assert line in text, line


def _in_child(code: str):
    """``code`` run by a Python child process from the repository root (importing Locust
    monkey-patches the interpreter, which this test process must not be)."""
    import subprocess

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])


def test_queued_records_are_drained_in_order_when_the_run_stops():
    """Records wait for the loop's spare time; a stop (Ctrl-C, the end, a worker's stop) runs
    what is still queued, in order, and one failing record does not stop the rest. In a child
    process: importing Locust monkey-patches the interpreter."""
    code = ("from loadgen.user import SpareTime\n"
            "s, out = SpareTime(), []\n"
            "for i in range(5):\n"
            "    s.later(lambda i=i: out.append(i) if i != 2 else 1 / 0)\n"
            "s.drain()\n"
            "assert out == [0, 1, 3, 4] and not s.records, out\n"
            "print('drained')\n")
    p = _in_child(code)
    assert p.returncode == 0 and "drained" in p.stdout, p.stdout + p.stderr
    assert "ZeroDivisionError" in p.stderr  # the failing record is logged, not swallowed


def test_ctrl_c_inside_a_request_is_not_recorded_as_its_failure():
    """A Ctrl-C that lands while a user greenlet sends stops the run: it is re-raised, not
    turned into an error record (the demo then exited 0 after finishing its sweep). A
    timeout is still data. In a child process: importing Locust monkey-patches the interpreter."""
    code = ("import gevent\n"
            "from loadgen.user import send\n"
            "class S:\n"
            "    def __init__(self, e): self.e = e\n"
            "    def request(self, *a, **k): raise self.e\n"
            "job = {'api': 'completions', 'model': 'm', 'max_tokens': 2, 'url': 'http://127.0.0.1:9',\n"
            "       'target': 't', 'stage': 's'}\n"
            "assert send(S(gevent.Timeout(1)), job, 'p', 5).kind == 'timeout'\n"
            "try:\n"
            "    send(S(KeyboardInterrupt()), job, 'p', 5)\n"
            "except KeyboardInterrupt:\n"
            "    print('re-raised')\n")
    p = _in_child(code)
    assert p.returncode == 0 and "re-raised" in p.stdout, p.stdout + p.stderr


def test_a_probes_deadline_is_extrapolated_from_what_the_target_served():
    # no length served yet: the scenario's request timeout
    assert shapes.probe_timeout({}, 1 << 20, 600) == 600
    # Llama-3.2-1B on vLLM, H200 (2026-12-02): 11.7 s at 256K, 4.5 s at 128K; the probe at
    # 678,096 stalled; served at 672,806 in 66 s
    served = {65536: 1.19, 131072: 4.49, 262144: 11.68}
    p = math.log(11.68 / 4.49) / math.log(2)
    assert shapes.probe_timeout(served, 678_096, 600) == pytest.approx(3 * 11.68 * (678_096 / 262144) ** p + 60)
    assert 66 < shapes.probe_timeout(served, 678_096, 600) < 200
    # the exponent is held within 1..2: a flat pair extrapolates linearly, a steep one quadratically
    assert shapes.probe_timeout({1000: 1.0, 2000: 1.0}, 4000, 600) == pytest.approx(3 * 2.0 + 60)
    assert shapes.probe_timeout({1000: 1.0, 2000: 9.0}, 4000, 600) == pytest.approx(3 * 36.0 + 60)
    # one length: quadratic; below the longest: the longest's time; never past the ceiling
    assert shapes.probe_timeout({1000: 2.0}, 2000, 600) == pytest.approx(3 * 8.0 + 60)
    assert shapes.probe_timeout(served, 100_000, 600) == pytest.approx(3 * 11.68 + 60)
    assert shapes.probe_timeout(served, 1 << 24, 600) == 600


def test_a_timeout_under_the_http_clients_retry_wrapper_is_a_timeout():
    from geventhttpclient.useragent import RetriesExceeded

    wrapped = RetriesExceeded("http://127.0.0.1:1/v1/completions", 0,
                              original=TimeoutError("no end of stream after 4 s"))
    assert records.classify_exception(wrapped) == "timeout"
    assert isinstance(records.unwrap(wrapped), TimeoutError)
    assert records.classify_exception(RetriesExceeded("u", 0, original=ConnectionRefusedError())) == "connection"


def test_max_stage_tokens_sends_fewer_requests_at_the_long_end_and_resume_counts_them():
    load = sc.ContextSweep(kind="context_sweep", prompt_tokens=[256, 8192, 16384, 32768, 65536], requests=3,
                           max_stage_tokens=32768)
    assert [s.requests for s in load.stages()] == [3, 3, 2, 1, 1]
    assert [load.planned_requests(f"prompt={n}") for n in (256, 16384, 65536)] == [3, 2, 1]
    plain = sc.ContextSweep(kind="context_sweep", prompt_tokens=[256, 65536], requests=3)
    assert [s.requests for s in plain.stages()] == [3, 3]



RAMP = """
import gevent
from locust import User, constant
from locust.env import Environment
from loadgen.runner import spawn_rate

class Idle(User):
    wait_time = constant(600)
    def on_start(self):
        gevent.sleep(600)

assert spawn_rate(1, 64) == 64 and spawn_rate(64, 1) == 64 and spawn_rate(500, 0) == 100 and spawn_rate(0, 0) == 1
runner = Environment(user_classes=[Idle]).create_local_runner()
runner.start(64, spawn_rate=spawn_rate(64, runner.user_count))
runner.spawning_greenlet.join()
up = runner.user_count
runner.start(1, spawn_rate=spawn_rate(1, runner.user_count))
runner.spawning_greenlet.join(timeout=10)  # rated by the new count alone (1/s): 63 s
print(up, runner.user_count)
runner.quit()
"""


def test_a_stage_with_fewer_users_stops_the_rest_at_once_not_one_a_second():
    """Locust stops users at the spawn rate too: 64 streams down to a warm-up's 1 user, rated by
    the new count alone (1/s), took 63 s between two targets. Rated by both, a real Locust runner
    is down to 1 user within 10 s. (A child process: Locust's gevent patching stays out of this one.)"""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", RAMP], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["64", "1"]
