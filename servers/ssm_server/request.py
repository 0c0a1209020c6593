"""One request's life in an engine: its prompt, sampling settings, output and timings."""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field

from servers.ssm_server.sampling import SamplingParams

_ids = itertools.count()


@dataclass
class Event:
    kind: str  # "token" (the last one carries finish_reason) | "error"
    text: str = ""
    token_id: int | None = None
    finish_reason: str | None = None
    status: int = 500


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    id: str = field(default_factory=lambda: f"cmpl-{next(_ids)}-{time.time_ns() % 10**9}")
    created: float = field(default_factory=time.perf_counter)
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    slot: int | None = None
    pos: int = 0
    """Prompt tokens already prefilled."""
    generated: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0
    """Characters of ``text`` already streamed (held back while a stop string may be forming)."""
    cancelled: bool = False
    finished: str | None = None
    generator: object = None
    detok: object = None
    t_scheduled: float | None = None
    t_first: float | None = None
    t_last: float | None = None
    internal: bool = False
    """The server's own (its warm-up): kept out of every metric."""

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def prefilled(self) -> bool:
        return self.pos >= self.prompt_len

    def releasable_text(self) -> str:
        """New text that no stop string can still claim."""
        hold = max((len(s) for s in self.params.stop), default=1) - 1
        end = len(self.text) if self.finished else max(self.sent, len(self.text) - hold)
        chunk = self.text[self.sent:end]
        self.sent = end
        return chunk

    def check_stop_strings(self) -> bool:
        for s in self.params.stop:
            i = self.text.find(s, max(0, self.sent - len(s)))
            if i >= 0:
                self.text = self.text[:i]
                return True
        return False
