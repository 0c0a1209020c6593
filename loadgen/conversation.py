"""Multi-turn conversations (a scenario's ``kind: conversation`` load): which turn goes next,
and the history each turn resends.

A conversation's turn ``k`` is one request to ``/v1/chat/completions`` whose messages are every
earlier user message with the reply the server streamed to it, and a new user message: the
first of ``first_tokens`` (a document), the later ones of ``turn_tokens``. Its record's
``shared_tokens`` is what the server counted of that history (the last turn's prompt and reply
tokens, from its usage): what a prefix cache could reuse. A turn that fails ends its
conversation (there is no reply to resend) and the next one starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from loadgen.job import Job

if TYPE_CHECKING:
    from loadgen import scenario as sc


@dataclass(frozen=True)
class Turn:
    """One request of a conversation: the stage's queue holds these."""

    conversation: int
    turn: int


@dataclass
class _State:
    messages: list[dict] = field(default_factory=list)
    """The history to resend: user and assistant messages, alternating."""
    counted: int | None = None
    """Prompt + completion tokens of the last turn, as the server's usage counted them."""


class Conversations:
    """The conversations of one stage: started ``users`` at a time, each ended after its
    ``turns`` or its first failed turn."""

    def __init__(self, spec: sc.Conversation):
        self.spec = spec
        self.started = 0
        self.ended = 0
        self._state: dict[int, _State] = {}

    @property
    def finished(self) -> bool:
        return self.ended >= self.spec.conversations

    def first_turns(self) -> list[Turn]:
        """The opening turns of the first ``users`` conversations."""
        return [t for t in (self._start() for _ in range(self.spec.users)) if t is not None]

    def _start(self) -> Turn | None:
        if self.started >= self.spec.conversations:
            return None
        c = self.started
        self.started += 1
        self._state[c] = _State()
        return Turn(c, 0)

    def job_fields(self, t: Turn) -> Job:
        """What a turn's job carries besides the stage's: the new message's length, the history
        to resend (the new message is appended once built) and how much of it the server has
        counted before. Always the chat API: a conversation is its messages."""
        st = self._state[t.conversation]
        return {"api": "chat", "conversation": t.conversation, "turn": t.turn,
                "prompt_tokens": self.spec.first_tokens if t.turn == 0 else self.spec.turn_tokens,
                "messages": list(st.messages), "shared_tokens": st.counted if t.turn else None,
                "shared_prefix": None}

    def done(self, job: dict, rec: dict, reply: str | None) -> tuple[Turn | None, float]:
        """A turn ended: the turn to queue next (this conversation's after ``think_time_s``, or
        a new conversation's at once) and its delay; None when nothing is left to start."""
        c = job["conversation"]
        st = self._state.get(c)
        if st is not None and rec["status"] == "ok" and reply is not None and job["turn"] + 1 < self.spec.turns:
            st.messages = [*job["messages"], {"role": "assistant", "content": reply}]
            prompt, completion = rec.get("prompt_tokens"), rec.get("completion_tokens")
            st.counted = prompt + completion if isinstance(prompt, int) and isinstance(completion, int) else None
            return Turn(c, job["turn"] + 1), self.spec.think_time_s
        self._state.pop(c, None)
        self.ended += 1
        return self._start(), 0.0

    def abandon(self, t: Turn) -> None:
        """A turn that will not be sent (its stage closed): its conversation ends."""
        if self._state.pop(t.conversation, None) is not None:
            self.ended += 1
