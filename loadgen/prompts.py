"""Prompts of an exact token length.

A prompt of ``n`` tokens is ``n`` words, each of which the target's tokenizer encodes as one
token when it follows a space.  Byte-level BPE (and the other pre-tokenizers that split at
spaces) never merges across that space, so the count is exact by construction; each tokenizer
is checked once on a long sample, and a tokenizer that does not compose this way falls back to
encode-and-adjust.  The count includes the special tokens the server adds (a BOS), so the
server's ``usage.prompt_tokens`` equals the length asked.

Where the words come from: ``synthetic`` (plain English words, the paper's method made exact)
or ``file`` (a real long text, its words filtered to the single-token ones and repeated).
The tokenizer is the target's own, local when its model directory is at hand, else its
``POST /tokenize``.  Bodies are cached per (tokenizer, length); a few leading words differ per
request (``unique_prefix``) so a prefix cache cannot skip the prefill.
"""

from __future__ import annotations

import json
import re
import urllib.request
from functools import lru_cache
from pathlib import Path

SHIPPED_TEXT = Path(__file__).resolve().parent / "data" / "long_text.txt"
PREFIX_WORDS = 4
_SAMPLE = 4096


def _source_words(path: str | None) -> list[str]:
    if path is None:
        from servers.tokenizer import WORDS

        return list(WORDS)
    p = SHIPPED_TEXT if path == "shipped" else Path(path)
    return re.findall(r"[A-Za-z]+", p.read_text(errors="replace"))


class LocalTokenizer:
    """A tokenizer loaded from a model directory (offline)."""

    def __init__(self, path: str | Path):
        from transformers import AutoTokenizer

        self.key = f"local:{Path(path).resolve()}"
        self._tok = AutoTokenizer.from_pretrained(str(path))

    def count(self, text: str) -> int:
        return len(self._tok(text, add_special_tokens=True)["input_ids"])

    def counts_each(self, words: list[str]) -> list[int]:
        enc = self._tok([" " + w for w in words], add_special_tokens=False)["input_ids"]
        return [len(e) for e in enc]


class RemoteTokenizer:
    """A target's ``POST /tokenize`` (vLLM's shape: ``{"model", "prompt"}`` → ``{"count"}``)."""

    def __init__(self, base_url: str, model: str, headers: dict | None = None, timeout: float = 60):
        self.base_url, self.model, self.headers, self.timeout = base_url.rstrip("/"), model, headers or {}, timeout
        self.key = f"remote:{self.base_url}:{model}"

    def count(self, text: str) -> int:
        body = json.dumps({"model": self.model, "prompt": text}).encode()
        req = urllib.request.Request(self.base_url + "/tokenize", data=body, method="POST",
                                     headers={"Content-Type": "application/json", **self.headers})
        with urllib.request.urlopen(req, timeout=self.timeout) as r:
            out = json.loads(r.read())
        return int(out["count"] if "count" in out else len(out["tokens"]))

    def counts_each(self, words: list[str]) -> list[int]:
        base = self.count(" the")
        return [self.count(" " + w) - base + 1 for w in words]


class PromptBuilder:
    """Builds prompts of exact token counts for one tokenizer (one per target)."""

    def __init__(self, tokenizer, source_path: str | None = None, max_candidates: int = 400):
        self.tok = tokenizer
        cands = list(dict.fromkeys(w.lower() for w in _source_words(source_path)))[:max_candidates]
        counts = tokenizer.counts_each(cands)
        single = [w for w, c in zip(cands, counts) if c == 1]
        if len(single) < 16:
            raise ValueError(f"{tokenizer.key}: too few single-token words ({len(single)}) in the prompt source")
        self.vocab = single
        if source_path is None:
            self.stream = single
        else:  # the text's own order, kept to its single-token words
            ok = set(single)
            self.stream = [w.lower() for w in _source_words(source_path) if w.lower() in ok]
        self.special = tokenizer.count(" " + single[0]) - 1
        sample = self._words(_SAMPLE)
        self.exact = tokenizer.count(sample) == _SAMPLE + self.special
        self._cache: dict[int, str] = {}

    def _words(self, n: int, offset: int = 0) -> str:
        s = self.stream
        reps = (offset + n) // len(s) + 1
        return " " + " ".join((s * reps)[offset:offset + n]) if n > 0 else ""

    def _body(self, n: int) -> str:
        if n in self._cache:
            return self._cache[n]
        text = self._adjust(self._words(n, PREFIX_WORDS), n)
        self._cache[n] = text
        return text

    def _adjust(self, text: str, n: int) -> str:
        """``text`` trimmed or padded at its end until it encodes to ``n`` tokens (plus the
        special ones), for a tokenizer where words do not compose exactly."""
        if self.exact:
            return text
        for _ in range(8):
            diff = self.tok.count(text) - self.special - n
            if diff == 0:
                break
            words = text.split(" ")
            text = " ".join(words[:-diff]) if diff > 0 else text + self._words(-diff)
        return text

    def prefix(self, index: int, k: int) -> str:
        """``k`` words that encode ``index`` in base len(vocab): different for every request."""
        v, out = len(self.vocab), []
        for _ in range(k):
            out.append(self.vocab[index % v])
            index //= v
        return " " + " ".join(out) if k else ""

    def build(self, tokens: int, index: int = 0, unique: bool = True) -> str:
        """A prompt of exactly ``tokens`` tokens (special tokens included)."""
        n = tokens - self.special
        if n < 1:
            raise ValueError(f"a prompt needs at least {self.special + 1} tokens for this tokenizer")
        k = min(PREFIX_WORDS, n) if unique else 0
        return self.prefix(index, k) + self._body(n - k)


    def shared_tokens(self, tokens: int, question_tokens: int) -> int:
        """How many of a ``tokens``-token prompt's tokens its group shares (special tokens
        included): all but the question, which keeps at least one token."""
        return tokens - min(question_tokens, tokens - self.special - 1)

    def build_shared(self, tokens: int, index: int, question_tokens: int, group: int,
                     unique: bool = True) -> str:
        """A prompt of exactly ``tokens`` tokens whose first :meth:`shared_tokens` are the
        document of ``group`` (alike for every request of the group) and whose last are a
        question of request ``index``'s own. The document starts with a few words that name the
        group (``unique``), so groups share nothing; the question with a few naming the request."""
        n = tokens - self.special
        if n < 2:
            raise ValueError(f"a shared-prefix prompt needs at least {self.special + 2} tokens for this tokenizer")
        q = min(question_tokens, n - 1)
        d = n - q
        kd = min(PREFIX_WORDS, d) if unique else 0
        kq = min(PREFIX_WORDS, q)
        doc = self.prefix(group, kd) + self._body(d - kd)
        question = self.prefix(index, kq) + self._words(q - kq, PREFIX_WORDS + d)
        return self._adjust(doc + question, n)  # where the boundary merges: trim or pad the question


    def build_blocks(self, tokens: int, hash_ids: list[int], block_tokens: int) -> str:
        """A prompt of exactly ``tokens`` tokens in blocks of ``block_tokens`` (the first
        holding the special tokens, the last the rest), block ``j`` named by ``hash_ids[j]``:
        two prompts whose ids agree up to a block agree token for token up to its end (a
        trace's shared blocks, loadgen.trace)."""
        n = tokens - self.special
        if n < 1:
            raise ValueError(f"a prompt needs at least {self.special + 1} tokens for this tokenizer")
        parts, start = [], 0
        for j, h in enumerate(hash_ids):
            end = min(n, (j + 1) * block_tokens - self.special)
            w = end - start
            if w <= 0:
                break
            k = min(PREFIX_WORDS, w)
            parts.append(self.prefix(h, k) + self._words(w - k, PREFIX_WORDS))
            start = end
        if start < n:  # ids short of the length (the reader refuses such lines): pad
            parts.append(self._words(n - start, PREFIX_WORDS))
        return self._adjust("".join(parts), n)


@lru_cache(maxsize=32)
def local_builder(path: str, source_path: str | None = None) -> PromptBuilder:
    return PromptBuilder(LocalTokenizer(path), source_path)


@lru_cache(maxsize=32)
def remote_builder(base_url: str, model: str, source_path: str | None = None) -> PromptBuilder:
    return PromptBuilder(RemoteTokenizer(base_url, model), source_path)
