"""Streaming detokenization with the locally built tokenizer of a tiny model."""

from __future__ import annotations

import random

from servers.ssm_server.textio import Detokenizer, HFText
from tests.conftest import build_tiny

TEXT = "Héllo wörld — naïve café, 日本語のテキスト 🎉🚀 done.\n" * 6


def _text():
    return HFText(str(build_tiny("tiny-mamba2")))


def test_decode_matches_transformers():
    t = _text()
    rnd = random.Random(0)
    for ids in (t.encode(TEXT, add_special_tokens=False), [rnd.randrange(t.tok.vocab_size) for _ in range(300)]):
        assert t.decode(ids) == t.tok.decode(ids, skip_special_tokens=True)


def test_streamed_text_equals_one_decode():
    t = _text()
    ids = t.encode(TEXT, add_special_tokens=False)
    d = Detokenizer(t)
    assert "".join(d.add(i) for i in ids) == t.decode(ids) == TEXT


def test_window_stays_bounded_on_ids_that_are_not_text():
    """Random ids (byte pieces that never form UTF-8, as a random-weight model samples) must not
    grow the decode window: each token's cost would grow with the output."""
    t = _text()
    rnd = random.Random(1)
    broken = [i for i in range(t.tok.vocab_size) if t.decode([i]) == "\ufffd"]  # lone bytes >= 0x80
    assert len(broken) >= 64
    d = Detokenizer(t)
    widest = 0
    for _ in range(3000):
        d.add(rnd.choice(broken) if rnd.random() < 0.9 else rnd.randrange(t.tok.vocab_size))
        widest = max(widest, len(d.ids) - d.prefix)
    assert widest <= 16, widest
    # valid text after the garbage still comes out whole
    tail = t.encode(" and then plain words.", add_special_tokens=False)
    out = "".join(d.add(i) for i in tail)
    assert out.endswith("plain words."), out
