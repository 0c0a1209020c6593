"""Errors aiohttp answers before any handler runs — a malformed request line, a header over its
8 KB limit, a bad Content-Length — as OpenAI error bodies (JSON), like every other error of
ssm-server, instead of aiohttp's plain text.

aiohttp builds those responses in ``RequestHandler.handle_error``, a class its ``Server``
creates per connection with no hook to swap it, so ``install()`` wraps that method in this
process (ssm-server's own; nothing else runs there).
"""

from __future__ import annotations

import json

from aiohttp import web, web_protocol

from servers.ssm_server.protocol import APIError

_original = web_protocol.RequestHandler.handle_error


def _openai_error(self, request, status: int = 500, exc: BaseException | None = None,
                  message: str | None = None) -> web.StreamResponse:
    _original(self, request, status, exc, message)  # logs it, and raises if bytes already went out
    text = (message or getattr(exc, "message", None) or str(exc or "") or "bad request").strip()
    if status >= 500:
        text = "internal server error"
    body = APIError(status, text.splitlines()[0][:500] if text else "bad request").body()
    out = web.Response(status=status, text=json.dumps(body), content_type="application/json")
    out.force_close()
    return out


def install() -> None:
    if web_protocol.RequestHandler.handle_error is not _openai_error:
        web_protocol.RequestHandler.handle_error = _openai_error
