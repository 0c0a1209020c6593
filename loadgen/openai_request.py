"""The body of a streamed OpenAI request, defined once: the load generator's users and the
profile pass send the same fields (``/v1/completions`` with a prompt, ``/v1/chat/completions``
with messages)."""

from __future__ import annotations


def streamed_body(model: str, max_tokens: int, *, chat: bool, prompt: str | None = None,
             messages: list[dict] | None = None, ignore_eos: bool = False,
             continuous_usage: bool = False) -> dict:
    """A greedy (temperature 0), streamed request whose last event carries the usage;
    ``continuous_usage``: every event does (vLLM's and ssm-server's ``continuous_usage_stats``).
    ``messages`` (a conversation) go as they are; else a chat request is the prompt as one user
    message. ``ignore_eos``: generate exactly ``max_tokens`` (vLLM's extension)."""
    body = {"model": model, "max_tokens": max_tokens, "stream": True, "temperature": 0.0,
            "stream_options": {"include_usage": True, **({"continuous_usage_stats": True} if continuous_usage
                                                         else {})}}
    if ignore_eos:
        body["ignore_eos"] = True
    if messages:
        body["messages"] = messages
    elif chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body
