"""Client mistakes against the real ssm-server (tiny Mamba2, vocabulary 2,048): each is a 400
with an OpenAI error body naming the field, never a 500, and none harms the healthy streams
that run beside it."""

from __future__ import annotations

import gzip
import json
import sys
import threading
import urllib.request

import pytest

from benchmarks.reliability import RAW, bad_inputs, j, send_raw
from servers.process import ManagedServer, free_port
from tests.conftest import build_tiny, tiny_ssm_server

pytestmark = pytest.mark.timeout(180)
VOCAB = 2048


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with tiny_ssm_server(tmp_path_factory.mktemp("bad"), "ssm-bad", "--max-num-seqs", "8", "--max-model-len", "1024") as srv:
        yield srv


def send(server, path, body: bytes, headers=None):
    req = urllib.request.Request(server.url + path, body, {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


CASES = bad_inputs(VOCAB)  # (name, path, body, headers, param named); benchmarks/reliability.py sends them too


@pytest.mark.parametrize("name,path,body,headers,param", CASES, ids=[c[0] for c in CASES])
def test_client_mistakes_are_400_naming_the_field(server, name, path, body, headers, param):
    status, raw = send(server, path, body, headers)
    assert status == 400, (name, status, raw[:300])
    err = json.loads(raw)["error"]
    assert err["type"] == "BadRequestError" and err["message"]
    if param:
        assert err["param"] == param, err


def test_a_tiny_temperature_samples_greedily(server):
    body = {"prompt": [1, 2, 3], "max_tokens": 8, "ignore_eos": True}
    status, greedy = send(server, "/v1/completions", j({**body, "temperature": 0}))
    status2, tiny = send(server, "/v1/completions", j({**body, "temperature": 1e-45}))
    assert status == status2 == 200
    assert json.loads(tiny)["choices"][0]["text"] == json.loads(greedy)["choices"][0]["text"]


def test_a_gzip_body_is_read(server):
    status, raw = send(server, "/v1/completions", gzip.compress(j({"prompt": [1, 2], "max_tokens": 2})),
                       {"Content-Encoding": "gzip"})
    assert status == 200 and json.loads(raw)["usage"]["completion_tokens"] == 2


def test_bad_requests_beside_healthy_streams_harm_none(server):
    """Three 300-token streams run while every bad case is sent: each stream ends with its
    300 tokens and finish_reason length."""
    results: list[dict] = []

    def stream():
        body = j({"prompt": [1, 2, 3, 4], "max_tokens": 300, "ignore_eos": True, "stream": True,
                  "stream_options": {"include_usage": True}})
        req = urllib.request.Request(server.url + "/v1/completions", body, {"Content-Type": "application/json"})
        events = []
        with urllib.request.urlopen(req, timeout=120) as r:
            for line in r:
                if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
                    events.append(json.loads(line[6:]))
        results.append(events)

    threads = [threading.Thread(target=stream) for _ in range(3)]
    for t in threads:
        t.start()
    for _ in range(3):
        for _, path, body, headers, _ in CASES:
            assert send(server, path, body, headers)[0] == 400
    for t in threads:
        t.join(120)
    assert len(results) == 3
    for events in results:
        assert not any("error" in e for e in events), events[-1]
        assert events[-1]["usage"]["completion_tokens"] == 300
        assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "length"


@pytest.mark.parametrize("field,value", [("logprobs", 2), ("echo", True), ("best_of", 3)])
def test_fields_it_does_not_honour_are_rejected_by_name(server, field, value):
    status, raw = send(server, "/v1/completions", j({"prompt": "hi", "max_tokens": 2, field: value}))
    assert status == 400 and json.loads(raw)["error"]["param"] == field
    status, _ = send(server, "/v1/completions", j({"prompt": "hi", "max_tokens": 2, field: None}))
    assert status == 200  # null is "not asked for"


def test_error_params_and_chat_ids(server):
    status, raw = send(server, "/v1/completions", j({"prompt": 5, "max_tokens": 2}))
    assert status == 400 and json.loads(raw)["error"]["param"] == "prompt"  # not `prompt.str`
    status, raw = send(server, "/v1/chat/completions",
                       j({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}))
    assert status == 200 and json.loads(raw)["id"].startswith("chatcmpl-")


def test_a_body_that_inflates_past_the_limit_is_413(tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "servers.ssm_server", "--engine", "synthetic", "--port", str(port),
           "--max-request-bytes", "1MiB", "--api-key", "sesame"]
    with ManagedServer("ssm-limits", cmd, port, log_path=tmp_path / "log", startup_timeout_s=60) as srv:
        bomb = gzip.compress(b'{"prompt": "' + b"a" * (8 << 20) + b'"}')  # 8 MiB in ~8 KiB
        auth = {"Authorization": "Bearer sesame"}
        status, raw = send(srv, "/v1/completions", bomb, {"Content-Encoding": "gzip", **auth})
        assert status == 413 and json.loads(raw)["error"]["code"] == 413
        # vLLM's --api-key: /v1/* wants the key, /health and /metrics do not
        status, raw = send(srv, "/v1/completions", j({"prompt": "hi", "max_tokens": 2}))
        assert status == 401 and json.loads(raw)["error"]["type"] == "AuthenticationError"
        assert send(srv, "/v1/completions", j({"prompt": "hi", "max_tokens": 2}),
                    {"Authorization": "Bearer wrong"})[0] == 401
        assert send(srv, "/v1/completions", j({"prompt": "hi", "max_tokens": 2}), auth)[0] == 200
        for path in ("/health", "/metrics"):
            with urllib.request.urlopen(srv.url + path, timeout=10) as r:
                assert r.status == 200


def test_a_huge_prompt_is_refused_at_once_and_stalls_no_stream(server):
    """A 4,000,000-character prompt to a server of 1,024 tokens: refused from its length
    before any tokenizing, while a stream runs; the stream's largest gap stays far under the
    seconds the tokenizer would have held the event loop."""
    import time

    gaps: list[float] = []

    def stream():
        body = j({"prompt": [1, 2, 3], "max_tokens": 200, "ignore_eos": True, "stream": True})
        req = urllib.request.Request(server.url + "/v1/completions", body, {"Content-Type": "application/json"})
        last = None
        with urllib.request.urlopen(req, timeout=120) as r:
            for line in r:
                if line.startswith(b"data: "):
                    now = time.perf_counter()
                    if last is not None:
                        gaps.append(now - last)
                    last = now

    t = threading.Thread(target=stream)
    t.start()
    time.sleep(0.3)
    t0 = time.perf_counter()
    status, raw = send(server, "/v1/completions", j({"prompt": "word " * 800_000, "max_tokens": 4}))
    took = time.perf_counter() - t0
    t.join(120)
    err = json.loads(raw)["error"]
    assert status == 400 and err["code"] == "context_length_exceeded" and err["param"] == "prompt"
    assert took < 2.0, took  # was 8 s of tokenizing on the event loop
    assert gaps and max(gaps) < 1.0, max(gaps)


def test_sigterm_stops_the_server_within_a_second(tmp_path):
    import time

    port = free_port()
    cmd = [sys.executable, "-m", "servers.ssm_server", "--port", str(port), "--model", str(build_tiny("tiny-mamba2"))]
    srv = ManagedServer("ssm-term", cmd, port, log_path=tmp_path / "log", startup_timeout_s=120).__enter__()
    assert send(srv, "/v1/completions", j({"prompt": [1, 2], "max_tokens": 2}))[0] == 200
    proc = srv.proc
    t0 = time.perf_counter()
    proc.terminate()
    assert proc.wait(10) == 0
    took = time.perf_counter() - t0
    srv.stop()
    assert took < 1.0, took  # was 3.5–3.9 s


@pytest.mark.parametrize("name,data", RAW, ids=[r[0] for r in RAW])
def test_malformed_http_gets_an_openai_error_body(server, name, data):
    status, body = send_raw(server.url, data)
    assert status == "400 (JSON)", (status, body[:200])
    err = json.loads(body)["error"]
    assert err["code"] == 400 and err["type"] == "BadRequestError" and err["message"]
    assert send(server, "/health", None)[0] == 200  # and the server is fine
