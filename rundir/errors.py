"""Why a request failed, defined once: loadgen writes ``error_kind`` from these, the exporter
opens a counter for each, analysis groups failures by them (docs/contracts.md §4)."""

from __future__ import annotations

from enum import Enum


class ErrorKind(str, Enum):
    """A failed request's ``error_kind`` (its value is what requests.jsonl holds)."""

    REJECTED = "rejected"
    """The server answered 4xx: the request was refused (too long, a bad field, a full queue)."""
    OOM = "oom"
    """The server said it ran out of memory (any status, or a message mid-stream)."""
    TIMEOUT = "timeout"
    """No end of stream within the scenario's ``request_timeout_s``."""
    CONNECTION = "connection"
    """Refused or lost: the server is down or crashed mid-stream."""
    SERVER_ERROR = "server_error"
    """A 5xx that is not out of memory, an error in the stream, or a stream with no token."""
    CANCELLED = "cancelled"
    """The load generator stopped the request (the run ended, Ctrl-C)."""
    TRUNCATED = "truncated"
    """Asked for exactly ``max_tokens`` (``ignore_eos``), the server's usage says fewer."""


#: Every kind, in the order above.
ERROR_KINDS = tuple(k.value for k in ErrorKind)
