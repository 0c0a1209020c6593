"""A job: what one request needs, handed from the controller to a user (in this process, or
to a worker as JSON through Locust's messages) and back with its record. Its keys, defined once;
the runner fills the target's part (``runner._job_base``), the controller the request's
(``Controller._job``), a load kind its own (a trace's blocks, a conversation's history)."""

from __future__ import annotations

from typing import Any, TypedDict


class Job(TypedDict, total=False):
    # ---- the target's (the same for every request of a target) ----
    target: str
    url: str
    model: str
    """The model name the target is sent."""
    family: str | None
    engine: str | None
    api: str
    """``completions`` or ``chat``."""
    max_tokens: int
    ignore_eos: bool
    api_key_env: str | None
    """An environment variable holding the bearer token, if the server asks one."""
    timeout_s: float
    tokenizer: dict[str, Any]
    """``{"kind": "local", "path"}`` or ``{"kind": "remote", "url", "model"}``: how prompts are counted."""
    prompt_path: str | None
    unique_prefix: bool
    shared_prefix: dict | None
    """A ``shared_prefix`` prompt source's ``{question_tokens, group_size}``."""
    # ---- the request's ----
    stage: str
    stage_index: int
    prompt_tokens: int
    """The prompt's exact length (a conversation's turn: its new message's)."""
    concurrency: int
    request_id: str
    seq: int
    """The request's number in the run: what makes its prompt its own."""
    stage_seq: int
    """Its number in its stage: which shared-prefix group it belongs to."""
    _stage: int
    """The stage's identity, to tell its records from a later stage's."""
    # ---- a load kind's ----
    hash_ids: list[int]
    """A trace's request: its blocks (with ``block_tokens`` and ``shared_tokens``)."""
    block_tokens: int
    shared_tokens: int | None
    conversation: int
    """A conversation's turn: which conversation, which turn, and every message to send."""
    turn: int
    messages: list[dict[str, str]]
