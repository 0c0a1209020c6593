"""Tokenizers and streaming detokenization.

``HFText`` wraps a transformers tokenizer (the model directory's own); ``WordText`` is the
synthetic engine's cheap tokenizer: one token per whitespace-separated word, ids assigned on
first sight, so counting a 1M-token prompt costs one ``split``.
"""

from __future__ import annotations

import threading
import zlib


class HFText:
    def __init__(self, path: str):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path)
        self.eos_token_id = self.tok.eos_token_id
        # the Rust tokenizer behind a fast one: transformers' decode first walks every id in
        # Python (to_py_obj), which costs more than the decode itself on the per-token path
        self._fast = getattr(self.tok, "backend_tokenizer", None)
        self._cleanup = bool(getattr(self.tok, "clean_up_tokenization_spaces", False))
        vocab = self.tok.get_vocab()
        self.max_token_chars = max((len(t) for t in vocab), default=0) + 1
        """No token spans more characters than this: a text longer than this × the context
        limit is too long before it is tokenized."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int]) -> str:
        if self._fast is None:
            return self.tok.decode(ids, skip_special_tokens=True)
        text = self._fast.decode(ids, skip_special_tokens=True)
        return self.tok.clean_up_tokenization(text) if self._cleanup else text

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if getattr(self.tok, "chat_template", None):
            return self.tok.apply_chat_template(messages, tokenize=False,
                                                add_generation_prompt=add_generation_prompt)
        return plain_chat_prompt(messages, add_generation_prompt)


def plain_chat_prompt(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The default template when the tokenizer has none: ``role: text`` lines."""
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    if add_generation_prompt:
        lines.append("assistant:")
    return "\n".join(lines)


class WordText:
    """Whitespace words as tokens; ids are stable within the process (first seen, first id)."""

    eos_token_id = None
    max_token_chars = None  # a word may be any length

    def __init__(self, vocab_limit: int = 1 << 20):
        self._ids: dict[str, int] = {}
        self._words: list[str] = []
        self._lock = threading.Lock()
        self.vocab_limit = vocab_limit

    def count(self, text: str) -> int:
        return len(text.split())

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        out = []
        with self._lock:
            for w in text.split():
                i = self._ids.get(w)
                if i is None:
                    if len(self._words) >= self.vocab_limit:  # stay bounded: hash the rest
                        i = self.vocab_limit + zlib.crc32(w.encode()) % self.vocab_limit
                    else:
                        i = self._ids[w] = len(self._words)
                        self._words.append(w)
                out.append(i)
        return out

    def word(self, i: int) -> str:
        return self._words[i] if 0 <= i < len(self._words) else f"w{i}"

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.word(i) for i in ids)

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return plain_chat_prompt(messages, add_generation_prompt)


class Detokenizer:
    """Turns a growing list of ids into text deltas without re-decoding everything.

    Like vLLM's: decode a short window before the new ids and emit only what is new, holding
    back a trailing replacement character (an incomplete UTF-8 sequence) — for at most
    ``HOLD`` ids: no UTF-8 character is longer than 4 bytes, so past that the replacement
    character is final (ids that are not text, as a random-weight model samples them) and the
    window moves on. Without that bound the window, and the cost of each token, would grow
    with the output.
    """

    HOLD = 4

    def __init__(self, text):
        self.text = text
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0
        self._before = ""  # decode(ids[prefix:read]), kept so each token costs one decode

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._before
        after = self.text.decode(self.ids[self.prefix:])
        if (after.endswith("\ufffd") or len(after) <= len(before)) and len(self.ids) - self.read < self.HOLD:
            return ""
        delta = after[len(before):]
        prefix = max(self.read - 4, self.prefix) if self.read - self.prefix > 8 else self.prefix
        self.read = len(self.ids)
        if prefix != self.prefix:
            self.prefix = prefix
            self._before = self.text.decode(self.ids[prefix:self.read])
        else:
            self._before = after
        return delta
