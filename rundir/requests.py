"""One line of ``requests.jsonl``, defined once: loadgen builds it from a request's stamps,
analysis reads it back leniently (docs/contracts.md §4). Every field is the contract's; the
properties are what every figure derives the same way."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

SCHEMA_VERSION = 1


@dataclass(kw_only=True)
class RequestRecord:
    schema_version: int = SCHEMA_VERSION
    request_id: str = ""
    target: str
    model: str = ""
    family: str | None = None
    """``transformer``, ``ssm`` or ``hybrid`` (read back as "" when the run does not say)."""
    engine: str | None = None
    stage: str
    stage_index: int = 0
    api: str = "completions"
    prompt_tokens_requested: int | None = None
    """The length asked for (a conversation's turn: its new message's)."""
    prompt_tokens: int | None = None
    """The server's count (usage), chat template included."""
    completion_tokens: int | None = None
    max_tokens: int | None = None
    token_count_source: str | None = None
    """``usage`` (the server's count) or ``events`` (token events counted)."""
    concurrency: int | None = None
    start_time: float | None = None
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    tpot_s: float | None = None
    e2e_s: float | None = None
    status: str
    """``ok`` or ``error``."""
    http_status: int | None = None
    error_kind: str | None = None
    """A value of :class:`rundir.errors.ErrorKind` (None when ok)."""
    error_message: str | None = None
    worker: str | None = None
    """``host:pid`` of the load generator process that sent it."""
    response_id: str | None = None
    stamp_clock: str | None = None
    """``kernel``, ``user`` or ``mixed``: which clock stamped its token events."""
    shared_tokens: int | None = None
    """Of its prompt, the tokens it shares with earlier requests (a shared prefix, a trace's
    blocks, a conversation's history)."""
    cached_tokens: int | None = None
    """Prompt tokens the server took from its prefix cache, where its usage says."""
    conversation: int | None = None
    """A conversation load's request: its conversation (from 0 in its stage) and turn (from 0)."""
    turn: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def prompt_length(self) -> int | None:
        """The length under test: the requested one (server-reported counts add a template);
        for a conversation's turn, the whole prompt the server counted (its history resent with
        the new message, whose length is the one requested)."""
        if self.turn is not None and self.prompt_tokens is not None:
            return self.prompt_tokens
        if self.prompt_tokens_requested is not None:
            return self.prompt_tokens_requested
        return self.prompt_tokens

    @property
    def end_time(self) -> float | None:
        if self.start_time is None:
            return None
        return self.start_time + (self.e2e_s or 0.0)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
