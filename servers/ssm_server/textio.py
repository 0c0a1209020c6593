"""Tokenizers and streaming detokenization.

``HFText`` wraps a transformers tokenizer (the model directory's own); ``WordText`` is the
synthetic engine's cheap tokenizer: one token per whitespace-separated word, ids assigned on
first sight, so counting a 1M-token prompt costs one ``split``.
"""

from __future__ import annotations

import os
import threading
import zlib

#: A text at least this long is cut into pieces that the Rust tokenizer encodes at once, on
#: every core (``HFText.encode``); a shorter one is encoded whole. At 16K characters (~4K tokens)
#: the pieces already pay: a 16K-token prompt (94K characters) took 26.6 ms whole and 10.9 ms
#: in 4 pieces on 2 cores (and 50 ms of a 135 ms TTFT on an H200's host at 2^17 here before).
PARALLEL_CHARS = 1 << 14

#: Characters per piece at most, however many cores: each piece's ids come back to Python in one
#: call that holds the GIL (~1 ms for 128K characters), and the streams decoding beside the
#: tokenizer's thread wait on the GIL that long.
PIECE_CHARS = 1 << 17


def cut_points(text: str, pieces: int) -> list[int]:
    """Where to cut ``text`` into about ``pieces`` pieces that tokenize as it does whole: each
    cut is at a single space between two characters that are not whitespace, where a byte-level
    BPE's pre-tokenizer (GPT-2's pattern) starts a word anyway and no pattern spans the cut. A
    piece with no such space is not cut."""
    n, step = len(text), max(1, len(text) // max(1, pieces))
    out, i = [], step
    while i < n - 1:
        end = min(n - 1, i + 4096)  # no such space within 4K characters: not cut here
        j = text.find(" ", i, end)
        while j > 0 and (text[j - 1].isspace() or text[j + 1].isspace()):
            j = text.find(" ", j + 1, end)
        if j > 0:
            out.append(j)
            i = j + step
        else:
            i += step
    return out


class HFText:
    def __init__(self, path: str):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path)
        # the server checks lengths itself (max_model_len): no "longer than the maximum" warning
        self.tok.model_max_length = 1 << 62
        self.eos_token_id = self.tok.eos_token_id
        # the Rust tokenizer behind a fast one: transformers' decode first walks every id in
        # Python (to_py_obj), which costs more than the decode itself on the per-token path
        self._fast = getattr(self.tok, "backend_tokenizer", None)
        self._cleanup = bool(getattr(self.tok, "clean_up_tokenization_spaces", False))
        vocab = self.tok.get_vocab()
        self.max_token_chars = max((len(t) for t in vocab), default=0) + 1
        """No token spans more characters than this: a text longer than this × the context
        limit is too long before it is tokenized."""

        self.pieces = max(1, 2 * (os.cpu_count() or 1))
        self._around = self._special_around() if self._fast is not None else None
        self.parallel = self._around is not None and self._pieces_agree()
        """Whether a long text is tokenized in pieces at once (``cut_points``): only when this
        tokenizer gives a probe text's ids cut so equal to its ids whole."""

    def _special_around(self) -> tuple[list[int], list[int]] | None:
        """The special tokens this tokenizer puts before and after a text's ids (BOS, …), or
        None when its template does more than surround them."""
        bare = self._fast.encode("state", add_special_tokens=False).ids
        full = self._fast.encode("state", add_special_tokens=True).ids
        for k in range(len(full) - len(bare) + 1):
            if full[k:k + len(bare)] == bare:
                return full[:k], full[k + len(bare):]
        return None

    def _pieces_agree(self) -> bool:
        probe = ("The state space model's scan carries 1,024 tokens; it isn't attention. "
                 "Ünïcödé wörds, 数字 123 and\n\nnew lines\tand  two  spaces, ...ellipses!? ") * 40
        cuts = cut_points(probe, len(probe))  # at every space it may cut at
        return bool(cuts) and all(self._encode_cut(probe, cuts, s) == self.tok.encode(probe, add_special_tokens=s)
                                  for s in (False, True))

    def _encode_cut(self, text: str, cuts: list[int], add_special_tokens: bool) -> list[int]:
        bounds = [0, *cuts, len(text)]
        pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
        # encode_batch_fast (tokenizers >= 0.20) computes no character offsets: 4x faster, and
        # its encodings free at once — encode_batch's took ~0.3 s to free 2.3M tokens' worth
        # with the GIL held, a stall of every stream decoding meanwhile
        batch = getattr(self._fast, "encode_batch_fast", None) or self._fast.encode_batch
        # the tokenizer's own special tokens (BOS and the like) around the whole; the list grown
        # piece by piece, never copied whole in one call: the GIL may pass between pieces
        before, after = self._around if add_special_tokens else ([], [])
        ids = list(before)
        for e in batch(pieces, add_special_tokens=False):
            ids += e.ids
        ids += after
        return ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The text's ids; a long one (``PARALLEL_CHARS``) is tokenized in pieces on every core
        at once where this tokenizer allows it (``parallel``), with the same ids."""
        if self.parallel and len(text) >= PARALLEL_CHARS:
            cuts = cut_points(text, max(self.pieces, len(text) // PIECE_CHARS))
            if cuts:
                return self._encode_cut(text, cuts, add_special_tokens)
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
