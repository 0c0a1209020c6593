"""Hostile input against an OpenAI-compatible server: what each case gets, and whether it harms
the streams running beside it. One table row per case; a server-side error (5xx) for a client's
mistake, a hang or a broken healthy stream is a failure.

    python benchmarks/reliability.py URL [--model NAME] [--vocab 2048] [--max-model-len 1024]

For each case: sent alone (its status, or "hang" after 60 s), then three times while three
healthy 200-token streams run; a healthy stream that ends without its 200 tokens, or with an
error event, counts as collateral. Run it against ssm-server and vLLM serving the same tiny
model for the docs' reliability table (docs/ssm-server.md); the test suite sends the same
cases (tests/integration/test_ssm_server_bad_input.py).
"""

from __future__ import annotations

import argparse
import gzip
import json
import socket
import threading
import urllib.error
import urllib.request
import zlib

HEALTHY_TOKENS = 200


def j(obj) -> bytes:
    return json.dumps(obj).encode()


def bad_inputs(vocab: int) -> list[tuple[str, str, bytes, dict | None, str | None]]:
    """(name, path, body, headers, the param a 400 should name) of client mistakes a server must
    answer with a 400 — each once answered 500 by ssm-server, or failed its engine step."""
    return [
        ("id past the vocabulary", "/v1/completions", j({"prompt": [5, vocab], "max_tokens": 4}), None, "prompt"),
        ("negative id", "/v1/completions", j({"prompt": [5, -1], "max_tokens": 4}), None, "prompt"),
        ("id of 2^63", "/v1/completions", j({"prompt": [5, 1 << 63], "max_tokens": 4}), None, "prompt"),
        ("stop id past the vocabulary", "/v1/completions",
         j({"prompt": "hello", "max_tokens": 4, "stop_token_ids": [vocab + 5]}), None, "stop_token_ids"),
        ("seed past int64", "/v1/completions", j({"prompt": "hi", "max_tokens": 4, "seed": 1 << 64}), None, "seed"),
        ("lone surrogate in a prompt", "/v1/completions", b'{"prompt": "a\\ud800b", "max_tokens": 4}', None,
         "prompt"),
        ("lone surrogate in a chat message", "/v1/chat/completions",
         b'{"messages": [{"role": "user", "content": "a\\udfffb"}], "max_tokens": 4}', None, "messages.0.content"),
        ("lone surrogate to /tokenize", "/tokenize", b'{"prompt": "\\ud800"}', None, "prompt"),
        ("a text part that is not text", "/v1/chat/completions",
         j({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}], "max_tokens": 4}), None,
         "messages.0.content"),
        ("negative id to /detokenize", "/detokenize", j({"tokens": [1, -3]}), None, "tokens"),
        ("huge id to /detokenize", "/detokenize", j({"tokens": [1 << 40]}), None, "tokens"),
        ("unknown charset", "/v1/completions", j({"prompt": "hi"}),
         {"Content-Type": "application/json; charset=bogus"}, None),
        ("not gzip", "/v1/completions", b"this is not gzip", {"Content-Encoding": "gzip"}, None),
        ("deeply nested JSON", "/v1/completions", b"[" * 100_000 + b"]" * 100_000, None, None),
    ]


def more_cases(vocab: int, max_model_len: int) -> list[tuple[str, str, bytes, dict | None]]:
    """Cases beyond the 400s above, for the table: where servers may differ in what they answer."""
    big = b'{"prompt": "' + b"a " * (64 << 20) + b'", "max_tokens": 4}'  # 128 MiB inflated
    return [
        ("temperature 1e-45", "/v1/completions", j({"prompt": [5, 6], "max_tokens": 4, "temperature": 1e-45}), None),
        ("logprobs", "/v1/completions", j({"prompt": "hi", "max_tokens": 2, "logprobs": 2}), None),
        ("echo", "/v1/completions", j({"prompt": "hi", "max_tokens": 2, "echo": True}), None),
        ("best_of 3", "/v1/completions", j({"prompt": "hi", "max_tokens": 2, "best_of": 3}), None),
        ("prompt past max_model_len", "/v1/completions",
         j({"prompt": [5] * (max_model_len + 10), "max_tokens": 4}), None),
        ("4,000,000-character prompt", "/v1/completions", j({"prompt": "word " * 800_000, "max_tokens": 4}), None),
        ("unknown model", "/v1/completions", j({"model": "no-such-model", "prompt": "hi", "max_tokens": 2}), None),
        ("max_tokens 0", "/v1/completions", j({"prompt": "hi", "max_tokens": 0}), None),
        ("no prompt", "/v1/completions", j({"max_tokens": 2}), None),
        ("not JSON", "/v1/completions", b"{not json", None),
        ("gzip bomb (1 MB -> 128 MiB)", "/v1/completions", gzip.compress(big, 9), {"Content-Encoding": "gzip"}),
        ("deflate body", "/v1/completions", zlib.compress(j({"prompt": [5, 6], "max_tokens": 2})),
         {"Content-Encoding": "deflate"}),
    ]


RAW = [  # malformed HTTP, sent on a socket
    ("a bad request line", b"GARBAGE\r\n\r\n"),
    ("a header over 8 KB", b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n"),
    ("a bad Content-Length", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: banana\r\n\r\n{}"),
]


def send(url: str, path: str, body: bytes | None, headers: dict | None, model: str | None,
         timeout: float = 60) -> tuple[str, bytes]:
    """(status, body); status "hang" when nothing came back within ``timeout``."""
    if model and body and body[:1] == b"{" and b'"model"' not in body:
        try:
            body = j({"model": model, **json.loads(body)})
        except ValueError:
            pass
    req = urllib.request.Request(url + path, body, {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return str(r.status), r.read()
    except urllib.error.HTTPError as e:
        return str(e.code), e.read()
    except (TimeoutError, socket.timeout):
        return "hang", b""
    except (urllib.error.URLError, ConnectionError) as e:
        return f"connection ({type(getattr(e, 'reason', e)).__name__})", b""


def send_raw(url: str, data: bytes, timeout: float = 30) -> tuple[str, bytes]:
    host, port = url.split("//")[1].rstrip("/").split(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as s:
            s.sendall(data)
            out = b""
            while chunk := s.recv(65536):
                out += chunk
    except (TimeoutError, socket.timeout):
        return "hang", b""
    head, _, body = out.partition(b"\r\n\r\n")
    status = head.split(b"\r\n")[0].split()[1].decode() if head else "closed"
    ctype = next((line.split(b":", 1)[1].strip().decode() for line in head.split(b"\r\n")[1:]
                  if line.lower().startswith(b"content-type:")), "")
    return f"{status} ({'JSON' if 'json' in ctype else ctype or 'no body'})", body


def healthy_stream(url: str, model: str | None, out: list) -> None:
    body = {"prompt": [1, 2, 3, 4], "max_tokens": HEALTHY_TOKENS, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}, **({"model": model} if model else {})}
    req = urllib.request.Request(url + "/v1/completions", j(body), {"Content-Type": "application/json"})
    try:
        events = []
        with urllib.request.urlopen(req, timeout=120) as r:
            for line in r:
                if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
                    events.append(json.loads(line[6:]))
        usage = next((e["usage"] for e in reversed(events) if e.get("usage")), {})
        out.append(not any("error" in e for e in events) and usage.get("completion_tokens") == HEALTHY_TOKENS)
    except Exception:  # noqa: BLE001 - a broken stream is what this counts
        out.append(False)


def collateral(url: str, model: str | None, fire) -> int:
    """Healthy streams broken while ``fire()`` runs three times beside three of them."""
    done: list[bool] = []
    threads = [threading.Thread(target=healthy_stream, args=(url, model, done)) for _ in range(3)]
    for t in threads:
        t.start()
    for _ in range(3):
        fire()
    for t in threads:
        t.join(180)
    return 3 - sum(done)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("url")
    ap.add_argument("--model", default=None, help="the model name to send (vLLM needs it)")
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--max-model-len", type=int, default=1024)
    a = ap.parse_args(argv)
    url = a.url.rstrip("/")
    rows = []
    cases = [(n, p, b, h) for n, p, b, h, _ in bad_inputs(a.vocab)] + more_cases(a.vocab, a.max_model_len)
    for name, path, body, headers in cases:
        status, _ = send(url, path, body, headers, a.model)
        broken = collateral(url, a.model, lambda: send(url, path, body, headers, a.model))
        rows.append((name, status, broken))
        print(f"  {name}: {status}, {broken} broken", flush=True)
    for name, data in RAW:
        status, _ = send_raw(url, data)
        broken = collateral(url, a.model, lambda: send_raw(url, data))
        rows.append((name, status, broken))
        print(f"  {name}: {status}, {broken} broken", flush=True)
    ok = send(url, "/v1/completions", j({"prompt": [1, 2], "max_tokens": 2}), None, a.model)[0]
    print("\n| case | answer | healthy streams broken (of 3) |\n|---|---|---|")
    for name, status, broken in rows:
        print(f"| {name} | {status} | {broken} |")
    fives = sum(s.startswith("5") for _, s, _ in rows)
    hangs = sum(s == "hang" for _, s, _ in rows)
    print(f"\n{len(rows)} cases: {fives} answered 5xx, {hangs} hung, "
          f"{sum(b for _, _, b in rows)} healthy streams broken; a request after them: {ok}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
