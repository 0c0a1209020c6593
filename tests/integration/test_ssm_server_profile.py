"""ssm-server's profiling routes against the real server (tiny Mamba2 on CPU): POST
/start_profile and /stop_profile (vLLM's) run torch.profiler on the engine's device thread and
write a gzip Chrome trace into ``--profile-dir``; without the flag both are a 404."""

from __future__ import annotations

import gzip
import json
import os
import re
import threading
import urllib.request

import pytest

from tests.conftest import tiny_ssm_server

pytestmark = pytest.mark.timeout(180)

PROMPT = [1 + (i * 37) % 2000 for i in range(64)]  # 64 token ids of the tiny model's 2,048


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """(plain, profiled): the same tiny server without and with --profile-dir, started together."""
    tmp = tmp_path_factory.mktemp("profile")
    trace_dir = tmp / "traces" / "nested"  # made by the server at start-up
    plain = tiny_ssm_server(tmp / "plain", "ssm-noprofile", "--max-model-len", "512")
    profiled = tiny_ssm_server(tmp / "profiled", "ssm-profile", "--max-model-len", "512",
                               "--profile-dir", str(trace_dir))
    try:
        plain.start()
        profiled.start()
        plain.wait_healthy()
        profiled.wait_healthy()
        profiled.trace_dir = trace_dir
        yield plain, profiled
    finally:
        plain.stop()
        profiled.stop()


def post(server, path, body=None):
    data = json.dumps(body).encode() if body is not None else b""
    req = urllib.request.Request(server.url + path, data, {"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            raw = r.read()
            return r.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def complete(server, max_tokens=4):
    status, body = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True})
    assert status == 200, body
    assert body["usage"]["completion_tokens"] == max_tokens
    return body


def test_without_profile_dir_the_routes_are_404(servers):
    plain, _ = servers
    for path in ("/start_profile", "/stop_profile"):
        status, body = post(plain, path)
        assert status == 404, body
        err = body["error"]
        assert err["type"] == "NotFoundError" and "--profile-dir" in err["message"], err
    complete(plain)  # and serving is untouched
    with urllib.request.urlopen(plain.url + "/openapi.json", timeout=30) as r:
        paths = json.loads(r.read())["paths"]
    assert {"/start_profile", "/stop_profile"} <= set(paths)


def test_a_profile_of_a_completion_holds_its_aten_ops(servers):
    _, srv = servers
    assert srv.trace_dir.is_dir()
    status, body = post(srv, "/start_profile")
    assert status == 200 and body == {}
    complete(srv, max_tokens=4)
    status, body = post(srv, "/stop_profile")
    assert status == 200, body
    path = body["trace"]
    assert os.path.isabs(path) and os.path.dirname(path) == str(srv.trace_dir)
    assert re.fullmatch(r"ssm-server\.\d+\.pt\.trace\.json\.gz", os.path.basename(path)), path
    # a prefill step, then the decode steps of the other 3 tokens (at least one step in all)
    assert body["steps"] >= 1
    with gzip.open(path, "rt") as f:
        trace = json.load(f)
    ops = {e["name"] for e in trace["traceEvents"] if e.get("cat") == "cpu_op"}
    # the model's matmuls ran on the device thread: recorded only because the profiler started there
    assert ops & {"aten::mm", "aten::addmm", "aten::linear", "aten::matmul", "aten::bmm"}, sorted(ops)[:50]
    assert not [p for p in os.listdir(srv.trace_dir) if p.startswith(".")]  # no partial file left


def test_start_twice_and_stop_twice_are_409(servers):
    _, srv = servers
    assert post(srv, "/start_profile", {"profile_prefix": "twice"})[0] == 200
    status, body = post(srv, "/start_profile")
    assert status == 409 and body["error"]["type"] == "ConflictError", body
    status, body = post(srv, "/stop_profile")
    assert status == 200 and os.path.basename(body["trace"]).startswith("twice."), body
    assert body["steps"] == 0  # nothing ran between them
    assert os.path.isfile(body["trace"])
    status, body = post(srv, "/stop_profile")
    assert status == 409 and body["error"]["type"] == "ConflictError", body


def test_a_bad_prefix_is_400_and_starts_nothing(servers):
    _, srv = servers
    status, body = post(srv, "/start_profile", {"profile_prefix": "../escape"})
    assert status == 400 and body["error"]["param"] == "profile_prefix", body
    assert post(srv, "/stop_profile")[0] == 409


def test_serving_goes_on_across_start_and_stop(servers):
    """A stream running while the profiler starts and stops ends whole; a completion after works."""
    _, srv = servers
    got = {}

    def stream():
        req = urllib.request.Request(srv.url + "/v1/completions", json.dumps(
            {"prompt": PROMPT, "max_tokens": 200, "ignore_eos": True, "stream": True,
             "stream_options": {"include_usage": True}}).encode(), {"Content-Type": "application/json"})
        events = []
        with urllib.request.urlopen(req, timeout=120) as r:
            for line in r:
                if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
                    events.append(json.loads(line[6:]))
        got["events"] = events

    t = threading.Thread(target=stream)
    t.start()
    assert post(srv, "/start_profile")[0] == 200
    status, body = post(srv, "/stop_profile")
    assert status == 200 and os.path.isfile(body["trace"]), body
    t.join(120)
    events = got["events"]
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "length"
    assert events[-1]["usage"]["completion_tokens"] == 200
    complete(srv)


def test_the_profile_client_leaves_the_server_clean_after_a_failure(servers):
    """loadgen.profiling against the real server: a window that fails once the profiler runs
    stops it and deletes what it wrote; the next window works, and a decode window counts the
    server's own engine steps."""
    from loadgen import profiling

    _, profiled = servers
    prof = profiling.Profiler(profiled.url, "tiny", profiled.trace_dir)
    before = set(os.listdir(profiled.trace_dir))

    def failing(start, stop):
        start()
        complete(profiled)
        raise profiling.ProfileError("the window went wrong")

    with pytest.raises(profiling.ProfileError, match="went wrong"):
        prof._traced(failing, "failing")
    assert set(os.listdir(profiled.trace_dir)) == before  # its trace is gone
    w, files = prof.decode(" ".join(["word"] * 40), 4, "after")  # 409 here if still running
    assert w.steps_source == "server" and w.steps >= 4 and w.error is None
    assert [f.name.split(".")[0] for f in files] == ["after"]
    for f in files:
        f.unlink()
