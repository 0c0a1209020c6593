"""A minimal OpenAI-compatible streaming server with a set TTFT and ITL, for testing the client.

Each stream's events are scheduled on absolute deadlines (sent + TTFT + k·ITL on the event
loop's monotonic clock), so the server's own scheduling jitter does not accumulate; what a
client measures beyond the set values is the client's error plus this server's lateness.

To tell the two apart, every event carries ``t_send_ns``, the server's ``perf_counter_ns()``
just before its bytes are written (CLOCK_MONOTONIC: comparable across processes on Linux), and
with ``--send-log PATH`` each finished stream appends ``{"id", "recv_ns", "send_ns": [...],
"sent_ns": [...]}`` to PATH (``recv_ns``: when the request reached its handler; ``sent_ns``:
just after each event's write returned, so that the moment its bytes left lies between the
two even when this process was preempted in between).  The first token's text is the
response id (`` cmpl-…``), so a tool that keeps only generated text can still be matched.
ssm-server's synthetic engine is the fuller version; this one has no dependency on it.

    python -m loadgen.synthetic_server --port 8000 --ttft-ms 50 --itl-ms 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

from aiohttp import web


def make_app(ttft_s: float, itl_s: float, model: str = "synthetic", max_model_len: int = 1 << 20,
             send_log: str | None = None, hang_above: int | None = None) -> web.Application:
    counts = {"ok": 0, "failed": 0, "running": 0, "seq": 0}
    log_fd = os.open(send_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if send_log else None

    async def completions(request: web.Request) -> web.StreamResponse:
        recv_ns = time.perf_counter_ns()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        body = await request.json()
        chat = request.path.endswith("/chat/completions")
        n = int(body.get("max_tokens") or 16)
        prompt = body.get("prompt") if not chat else " ".join(m.get("content", "") for m in body.get("messages", []))
        prompt_tokens = len(str(prompt).split())
        if prompt_tokens + n > max_model_len:
            counts["failed"] += 1
            return web.json_response({"error": {"message": f"prompt of {prompt_tokens} tokens exceeds "
                                                f"max_model_len {max_model_len}", "type": "BadRequestError",
                                                "code": 400, "param": "prompt"}}, status=400)
        if hang_above is not None and prompt_tokens > hang_above:
            counts["running"] += 1  # accepted and never answered: vLLM 0.26 stalled a prompt that
            try:  # filled its KV cache exactly (prefilled, preempted, waiting for ever)
                await asyncio.Event().wait()
            finally:
                counts["running"] -= 1
        if not body.get("stream"):
            await asyncio.sleep(ttft_s + itl_s * (n - 1))
            counts["ok"] += 1
            return web.json_response({"choices": [{"text": " tok" * n, "index": 0, "finish_reason": "length"}],
                                      "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": n}})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        counts["running"] += 1
        counts["seq"] += 1
        rid = f"cmpl-{os.getpid()}-{counts['seq']}"
        sends: list[int] = []
        sent: list[int] = []
        try:
            for k in range(n):
                delay = t0 + ttft_s + k * itl_s - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                text = " " + rid if k == 0 else " tok"
                if chat:
                    choice = {"index": 0, "delta": {"content": text}, "finish_reason": None}
                else:
                    choice = {"index": 0, "text": text, "finish_reason": None}
                if k == n - 1:
                    choice["finish_reason"] = "length"
                ev = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                      "model": model, "choices": [choice]}
                sends.append(time.perf_counter_ns())
                ev["t_send_ns"] = sends[-1]
                await resp.write(b"data: " + json.dumps(ev).encode() + b"\n\n")
                sent.append(time.perf_counter_ns())
            usage = {"id": rid, "model": model, "choices": [],
                     "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": n,
                               "total_tokens": prompt_tokens + n}}
            await resp.write(b"data: " + json.dumps(usage).encode() + b"\n\ndata: [DONE]\n\n")
            await resp.write_eof()
            counts["ok"] += 1
            if log_fd is not None:
                os.write(log_fd, (json.dumps({"id": rid, "recv_ns": recv_ns, "send_ns": sends, "sent_ns": sent}) + "\n").encode())
        finally:
            counts["running"] -= 1
        return resp

    async def health(_):
        return web.Response(text="")

    async def models(_):
        return web.json_response({"object": "list", "data": [{"id": model, "object": "model",
                                                              "max_model_len": max_model_len}]})

    async def tokenize(request):
        body = await request.json()
        toks = str(body.get("prompt", "")).split()
        return web.json_response({"count": len(toks), "max_model_len": max_model_len,
                                  "tokens": list(range(len(toks)))})

    async def metrics(_):
        text = (f'synthetic:request_success_total{{model_name="{model}"}} {counts["ok"]}\n'
                f'synthetic:request_failure_total{{model_name="{model}"}} {counts["failed"]}\n'
                f'synthetic:num_requests_running{{model_name="{model}"}} {counts["running"]}\n')
        return web.Response(text=text, content_type="text/plain")

    app = web.Application(client_max_size=1 << 30)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", completions)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_get("/metrics", metrics)
    return app


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--ttft-ms", type=float, default=50.0)
    ap.add_argument("--itl-ms", type=float, default=10.0)
    ap.add_argument("--served-model-name", default="synthetic")
    ap.add_argument("--max-model-len", type=int, default=1 << 20)
    ap.add_argument("--send-log", default=None, help="append each finished stream's send stamps here (JSON lines)")
    ap.add_argument("--hang-above-tokens", type=int, default=None,
                    help="accept a longer prompt and never answer it (a server stalled at its memory's edge)")
    a = ap.parse_args(argv)
    try:
        import uvloop  # optional: a tighter event loop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(make_app(a.ttft_ms / 1000, a.itl_ms / 1000, a.served_model_name, a.max_model_len, a.send_log,
                        a.hang_above_tokens),
                host=a.host, port=a.port, print=None, access_log=None, backlog=4096)


if __name__ == "__main__":
    main()
