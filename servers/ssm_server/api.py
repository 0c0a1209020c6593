"""The aiohttp application: OpenAI-compatible routes over an engine."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import secrets
import time
import zlib

from aiohttp import web

from servers.ssm_server import protocol as P
from servers.ssm_server.openapi import openapi_spec
from servers.ssm_server.request import Request
from servers.ssm_server.sampling import SamplingParams

log = logging.getLogger("ssm_server")
DEFAULT_MAX_TOKENS = 16
WARM_HEADER = "X-Ssm-Server-Warm-Up"
"""The header that marks the server's own warm-up requests (with its per-process token)."""


class Server:
    def __init__(self, engine, text, metrics, *, model_name: str, max_model_len: int,
                 vocab_size: int | None = None, api_key: str | None = None,
                 max_request_bytes: int = 128 << 20, profile_dir: str | None = None):
        self.api_key = api_key
        """With a key, /v1/* wants ``Authorization: Bearer <key>`` (vLLM's --api-key)."""
        self.max_request_bytes = max_request_bytes
        # one thread: a fast tokenizer's per-call settings are not safe to change concurrently
        self._tokenizer_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tokenize")
        self.vocab_size = vocab_size
        """Token ids a prompt, a stop list or /detokenize may carry: [0, vocab_size)."""
        self.engine = engine
        self.text = text
        self.metrics = metrics
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.created = int(time.time())
        self.profiler = None
        """With ``--profile-dir``: POST /start_profile and /stop_profile (``profiler.Profiler``)."""
        self.listen: tuple[str, int] | None = None
        """(host, port) the app is served on, where its warm-up sends its own HTTP requests."""
        self._warm_token = secrets.token_hex(16)
        """Marks the warm-up's HTTP requests as the server's own (kept out of every metric)."""
        if profile_dir:
            from servers.ssm_server.profiler import Profiler

            self.profiler = Profiler(engine, profile_dir)

    def app(self) -> web.Application:
        # client_max_size bounds the body as read, after any Content-Encoding is undone: a small
        # gzip body cannot inflate past it
        app = web.Application(middlewares=[self._errors, self._auth], client_max_size=self.max_request_bytes)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics_route)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_post("/detokenize", self.detokenize)
        app.router.add_get("/openapi.json", self.openapi)
        app.router.add_post("/start_profile", self.start_profile)
        app.router.add_post("/stop_profile", self.stop_profile)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, app):
        await self.engine.start()
        # up at once, answering /health 503 until warm: what a load balancer or a load
        # generator waits for, so the first real request is not the one that compiles
        self._warming = asyncio.create_task(self._warm_up())

    async def _warm_up(self):
        # the synthetic engine is ready from the start (nothing to compile) and serves clients at
        # once: requests of a warm-up would be counted with theirs
        cold = not self.engine.ready
        try:
            await self._warm_text()
            await self.engine.warm_up()
            if cold:
                await self._warm_http()
        except Exception:  # serve anyway: a cold first request beats a server that never says ready
            log.exception("warm-up failed; serving cold")
        if cold:
            self.engine.cache_peak = 0  # what clients' sequences hold, from here on
        self.engine.ready = True

    async def _warm_text(self) -> None:
        """Tokenize a short text and one long enough to be cut in pieces on the tokenizer's
        thread, and detokenize: the first request then finds that thread, the Rust tokenizer's
        own threads and its caches started (on an H200's host the first 1K-token request took
        17.4 ms against 13.9 ms steady without it)."""
        from servers.ssm_server.textio import PARALLEL_CHARS

        words = "the quick brown fox jumps over the lazy dog, and 12 more: étude 日本語. "
        t0, texts = time.perf_counter(), (words, words * (PARALLEL_CHARS // len(words) + 1))
        for text in texts:
            ids = await self._encode(text, "prompt", limit=False)
        self.text.decode(ids[:16])
        log.info("warmed the tokenizer in %.1f ms (%s characters; the long one in pieces: %s)",
                 (time.perf_counter() - t0) * 1e3, " and ".join(f"{len(t):,}" for t in texts),
                 bool(getattr(self.text, "parallel", False)))

    async def _warm_http(self) -> None:
        """A streamed completion and a streamed chat completion through the server's own port,
        as a client sends them: the first client request then finds aiohttp's parsers, these
        handlers, the event stream, the chat template and a short prompt's prefill and decode at
        batch 1 run once. On an H200 (Mamba2-780m, 2026-12-03) the first 1K-token request after
        ready took 20.3 ms against 13.2 ms steady without it, 14.2 against 12.5 ms with it. Kept
        out of every metric: their header carries this process's token."""
        if self.listen is None:
            return
        import aiohttp

        host, port = self.listen
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
        base = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        headers = {WARM_HEADER: self._warm_token}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        common = {"model": self.model_name, "max_tokens": 4, "stream": True, "temperature": 0.0,
                  "ignore_eos": True, "stream_options": {"include_usage": True}}
        calls = (("/v1/completions", {"prompt": "The warm-up of the server's own HTTP path."}),
                 ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Warm up."}]}))
        t0, statuses = time.perf_counter(), []
        async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=120)) as session:
            for path, body in calls:
                for _ in range(100):  # the site starts listening once the app's startup is done
                    try:
                        async with session.post(base + path, json={**common, **body}) as r:
                            await r.read()
                            statuses.append(r.status)
                        break
                    except aiohttp.ClientConnectionError:
                        await asyncio.sleep(0.05)
        if statuses != [200, 200]:
            log.warning("the warm-up's HTTP requests to %s got %s (not 200 each): the first clients' may be slower",
                        base, statuses or "no answer")
            return
        log.info("warmed the HTTP path in %.1f ms (a streamed completion and a chat completion through %s)",
                 (time.perf_counter() - t0) * 1e3, base)

    async def _stop(self, app):
        if self.profiler is not None and self.profiler.running:
            log.warning("shutting down while profiling: no trace is written (POST /stop_profile writes it)")
        await self.engine.stop()

    @web.middleware
    async def _errors(self, request, handler):
        try:
            return await handler(request)
        except P.APIError as e:
            return web.json_response(e.body(), status=e.status, headers=e.headers)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            err = P.APIError(e.status, e.text if e.status == 413 and e.text else e.reason or "error")
            return web.json_response(err.body(), status=e.status)
        except Exception as e:  # never a traceback to the client
            log.exception("unhandled error")
            err = P.APIError(500, f"internal error: {type(e).__name__}")
            return web.json_response(err.body(), status=500)

    @web.middleware
    async def _auth(self, request, handler):
        if self.api_key and request.path.startswith("/v1/"):
            if request.headers.get("Authorization", "") != f"Bearer {self.api_key}":
                raise P.APIError(401, "Unauthorized: a missing or wrong API key (Authorization: Bearer …)",
                                 code="invalid_api_key")
        return await handler(request)

    # ---- simple routes -----------------------------------------------------------------------
    async def health(self, request):
        if self.engine.stopped:
            raise P.APIError(503, f"the engine stopped ({self.engine.stopped}); restart the server")
        if not self.engine.ready:
            raise P.APIError(503, "warming up: compiling and capturing before the first request")
        return web.Response(text="")

    async def models(self, request):
        return web.json_response({"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": self.created, "owned_by": "ctxload",
            "root": self.model_name, "max_model_len": self.max_model_len}]})

    async def metrics_route(self, request):
        return web.Response(body=self.metrics.render(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def openapi(self, request):
        return web.json_response(openapi_spec())

    async def tokenize(self, request):
        body = P.parse(P.TokenizeRequest, await _json(request))
        self._check_model(body.model)
        if body.messages is not None:
            prompt = self._chat_text(body.messages)
        elif body.prompt is not None:
            prompt = P.check_text(body.prompt, "prompt")
        else:
            raise P.APIError(400, "give either prompt or messages", param="prompt")
        ids = await self._encode(prompt, "prompt", limit=False, add_special_tokens=body.add_special_tokens)
        return web.json_response({"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids})

    async def detokenize(self, request):
        body = P.parse(P.DetokenizeRequest, await _json(request))
        self._check_model(body.model)
        return web.json_response({"prompt": self.text.decode(P.check_ids(body.tokens, self.vocab_size, "tokens"))})

    # ---- profiling (vLLM's routes; only with --profile-dir) -----------------------------------
    async def start_profile(self, request):
        await self.profiler_or_404().start(await _profile_prefix(request))
        return web.json_response({})

    async def stop_profile(self, request):
        return web.json_response(await self.profiler_or_404().stop(await _profile_prefix(request)))

    def profiler_or_404(self):
        if self.profiler is None:
            raise P.APIError(404, "profiling is off: start ssm-server with --profile-dir DIR")
        return self.profiler

    # ---- completions -----------------------------------------------------------------------
    async def completions(self, request):
        body = P.parse(P.CompletionRequest, await _json(request))
        self._check_model(body.model)
        if isinstance(body.prompt, str):
            ids = await self._encode(P.check_text(body.prompt, "prompt"), "prompt")
        else:
            ids = P.check_ids([int(t) for t in body.prompt], self.vocab_size, "prompt")
        return await self._serve(request, body, ids, chat=False)

    async def chat(self, request):
        body = P.parse(P.ChatRequest, await _json(request))
        self._check_model(body.model)
        prompt = self._chat_text(body.messages, body.add_generation_prompt)
        return await self._serve(request, body, await self._encode(prompt, "messages"), chat=True)

    async def _encode(self, text: str, param: str, *, limit: bool = True, add_special_tokens: bool = True):
        """Tokenize off the event loop (a long prompt would stall every stream's tokens), after
        a length check that needs no tokenizer: no token spans more than ``max_token_chars``."""
        per = self.text.max_token_chars
        if limit and per and len(text) > self.max_model_len * per:
            raise P.APIError(400, f"This model's maximum context length is {self.max_model_len} tokens; the "
                                  f"{param} has {len(text):,} characters, more than that many tokens can hold",
                             param=param, code="context_length_exceeded")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenizer_thread,
                                          lambda: self.text.encode(text, add_special_tokens=add_special_tokens))

    def _chat_text(self, messages, add_generation_prompt: bool = True) -> str:
        msgs = [{"role": m.role, "content": P.check_text(m.text(), f"messages.{i}.content")}
                for i, m in enumerate(messages)]
        try:
            return self.text.chat_prompt(msgs, add_generation_prompt)
        except Exception as e:  # noqa: BLE001 - the model's chat template refused these messages
            raise P.APIError(400, f"messages: the chat template cannot render them ({type(e).__name__}: "
                                  f"{str(e)[:200]})", param="messages") from None

    def _check_model(self, name):
        if name is not None and name != self.model_name:
            raise P.APIError(404, f"The model `{name}` does not exist; this server serves "
                                  f"`{self.model_name}`", param="model", code="model_not_found")

    def _params(self, body, prompt_len: int) -> SamplingParams:
        if prompt_len == 0:
            raise P.APIError(400, "prompt is empty", param="prompt")
        room = self.max_model_len - prompt_len
        max_tokens = body.max_completion_tokens or body.max_tokens
        if room < 1:
            raise P.APIError(400, f"This model's maximum context length is {self.max_model_len} tokens; "
                                  f"the prompt has {prompt_len} tokens", param="prompt",
                             code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = min(DEFAULT_MAX_TOKENS, room)
        elif prompt_len + max_tokens > self.max_model_len:
            raise P.APIError(400, f"This model's maximum context length is {self.max_model_len} tokens; "
                                  f"you asked for {prompt_len + max_tokens} ({prompt_len} in the prompt, "
                                  f"{max_tokens} to generate)", param="max_tokens",
                             code="context_length_exceeded")
        if body.min_tokens > max_tokens:
            raise P.APIError(400, "min_tokens must not exceed max_tokens", param="min_tokens")
        P.check_ids(list(body.stop_token_ids or ()), self.vocab_size, "stop_token_ids")
        # below vLLM's epsilon a temperature is greedy: dividing logits by it overflows them
        temperature = 0.0 if body.temperature < SAMPLING_EPS else body.temperature
        return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=body.top_p,
                              top_k=body.top_k, seed=body.seed, stop=tuple(body.stop or ()),
                              stop_token_ids=tuple(body.stop_token_ids or ()),
                              ignore_eos=body.ignore_eos, min_tokens=body.min_tokens)

    async def _serve(self, request, body, ids: list[int], *, chat: bool):
        req = Request(ids, self._params(body, len(ids)),
                      internal=request.headers.get(WARM_HEADER) == self._warm_token)
        self.engine.submit(req)
        try:
            if body.stream:
                return await self._stream(request, body, req, chat)
            return await self._whole(body, req, chat)
        except (asyncio.CancelledError, ConnectionResetError):
            self.engine.cancel(req)
            raise
        finally:
            if not req.finished:
                self.engine.cancel(req)

    async def _whole(self, body, req: Request, chat: bool):
        text, reason = [], None
        while True:
            ev = await req.out.get()
            if ev.kind == "token":
                text.append(ev.text)
                if ev.finish_reason:
                    reason = ev.finish_reason
                    break
            else:  # "error"
                raise P.APIError(ev.status, ev.text)
        out = "".join(text)
        choice = ({"index": 0, "message": {"role": "assistant", "content": out}, "finish_reason": reason,
                   "logprobs": None} if chat else
                  {"index": 0, "text": out, "finish_reason": reason, "logprobs": None})
        return web.json_response({"id": _response_id(req, chat), "object": "chat.completion" if chat else "text_completion",
                                  "created": int(time.time()), "model": self.model_name,
                                  "choices": [choice], "usage": _usage(req)})

    async def _stream(self, request, body, req: Request, chat: bool):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)
        obj = "chat.completion.chunk" if chat else "text_completion"
        created = int(time.time())

        def chunk(delta_text=None, reason=None, role=False, usage=None, choices=True):
            base = {"id": _response_id(req, chat), "object": obj, "created": created, "model": self.model_name}
            if choices:
                if chat:
                    delta = {"role": "assistant", "content": ""} if role else {}
                    if delta_text is not None:
                        delta["content"] = delta_text
                    c = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
                else:
                    c = {"index": 0, "text": delta_text or "", "finish_reason": reason, "logprobs": None}
                base["choices"] = [c]
            else:
                base["choices"] = []
            if usage is not None:
                base["usage"] = usage
            return b"data: " + json.dumps(base, separators=(",", ":")).encode() + b"\n\n"

        # a token chunk without finish_reason is this template around the JSON-encoded text:
        # one json.dumps of a string per token instead of a whole dict
        head, tail = chunk("\x00", None).split(b'"\\u0000"')
        dumps = json.dumps

        # vLLM's continuous_usage_stats: every chunk says the tokens so far (a text chunk may be
        # empty while a character's bytes are held back, so counting chunks is not counting tokens)
        every = body.include_usage and body.stream_options.continuous_usage_stats
        sent = 0

        def usage_now():
            return {"prompt_tokens": req.prompt_len, "completion_tokens": sent,
                    "total_tokens": req.prompt_len + sent} if every else None

        if chat:
            await resp.write(chunk(role=True, usage=usage_now()))
        while True:
            ev = await req.out.get()
            if ev.kind == "token":
                sent += 1
                if ev.finish_reason:  # the last token carries the finish reason, as vLLM sends it
                    await resp.write(chunk(ev.text, reason=ev.finish_reason, usage=usage_now()))
                    break
                if every:
                    await resp.write(chunk(ev.text, usage=usage_now()))
                else:
                    await resp.write(head + dumps(ev.text).encode() + tail)
            else:  # "error"
                err = P.APIError(ev.status, ev.text).body()
                await resp.write(b"data: " + json.dumps(err).encode() + b"\n\n")
                break
        if body.include_usage:
            await resp.write(chunk(usage=_usage(req), choices=False))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


def _response_id(req: Request, chat: bool) -> str:
    """OpenAI's id prefixes: ``chatcmpl-`` for a chat completion, ``cmpl-`` for a completion."""
    return "chat" + req.id if chat else req.id


def _usage(req: Request) -> dict:
    """OpenAI's usage; ``prompt_tokens_details.cached_tokens`` is 0: ssm-server keeps no prefix
    cache (a recurrent state is kept per sequence, not per prefix), so every prompt token is
    computed."""
    n = len(req.generated)
    return {"prompt_tokens": req.prompt_len, "completion_tokens": n, "total_tokens": req.prompt_len + n,
            "prompt_tokens_details": {"cached_tokens": 0}}


#: Temperatures below this sample greedily (vLLM's _SAMPLING_EPS).
SAMPLING_EPS = 1e-5


async def _profile_prefix(request):
    """The optional ``profile_prefix`` of a profiling call's body (vLLM's); any other body,
    an empty or a non-JSON one included, is ignored."""
    try:
        body = json.loads(await request.read() or b"{}")
    except (ValueError, RecursionError, web.RequestPayloadError, zlib.error, OSError, EOFError):
        return None
    return body.get("profile_prefix") if isinstance(body, dict) else None


async def _json(request):
    """The request's JSON body; every way a client's body can be wrong is a 400."""
    try:
        raw = await request.read()
    except web.HTTPException:  # aiohttp's own answer (a body over its size limit)
        raise
    except (web.RequestPayloadError, zlib.error, OSError, EOFError, ValueError) as e:
        # a body its Content-Encoding (gzip, deflate, br) cannot undo
        raise P.APIError(400, f"request body could not be decoded ({type(e).__name__}: "
                              f"{request.headers.get('Content-Encoding', 'no encoding')})") from None
    try:
        text = raw.decode(request.charset or "utf-8")
    except (LookupError, UnicodeDecodeError):
        raise P.APIError(400, f"request body is not text in charset {request.charset or 'utf-8'!r}") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise P.APIError(400, "request body nests too deeply") from None
    except ValueError:
        raise P.APIError(400, "request body is not valid JSON") from None
