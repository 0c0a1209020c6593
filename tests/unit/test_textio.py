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


def _long_texts():
    from pathlib import Path

    corpus = (Path(__file__).resolve().parents[2] / "loadgen" / "data" / "long_text.txt").read_text()
    rnd = random.Random(2)
    alphabet = "ab cd  é日\n\t 🎉.,'s 1 22  ‐\u00a0\u3000x"
    noisy = "".join(rnd.choice(alphabet) for _ in range(300_000))
    return {"corpus": (corpus * (1 + 600_000 // len(corpus)))[:600_000], "noisy": noisy,
            "no spaces": "wörd" * 40_000, "short": TEXT,
            "just past PARALLEL_CHARS": (corpus * (1 + 20_000 // len(corpus)))[:20_000]}


def test_a_long_text_tokenized_in_pieces_gives_the_ids_of_one_encode():
    """HFText.encode cuts a long text (PARALLEL_CHARS and up) at single spaces between
    non-space characters and encodes the pieces at once on every core: the ids, with and
    without special tokens, are those of the tokenizer's one encode."""
    from servers.ssm_server import textio

    t = _text()
    assert t.parallel
    for name, text in _long_texts().items():
        cuts = textio.cut_points(text, t.pieces)
        if name in ("corpus", "noisy"):
            assert len(text) >= textio.PARALLEL_CHARS and len(cuts) >= t.pieces // 2, (name, len(cuts))
        for special in (False, True):
            assert t.encode(text, add_special_tokens=special) == t.tok.encode(text, add_special_tokens=special), name


def test_a_tokenizer_whose_pieces_differ_is_never_cut(tmp_path):
    """A BPE without a pre-tokenizer merges across spaces ("e s"), so a piece cut at a space
    tokenizes unlike the same words inside the text: HFText finds that on its probe and
    encodes every text whole."""
    from tokenizers import Tokenizer, models, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.train_from_iterator([TEXT, "state space models scan long context"] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(tmp_path)
    t = HFText(str(tmp_path))
    assert not t.parallel
    text = "state space " * 20_000
    assert t.encode(text) == t.tok.encode(text)


def test_a_tokenizer_that_adds_bos_and_eos_keeps_them_around_the_pieces(tmp_path):
    """A template that puts special tokens around a text (here BOS … EOS) puts them once
    around the whole, never around each piece."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([TEXT, "state space models scan long context"] * 20,
                            trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(tmp_path)
    t = HFText(str(tmp_path))
    assert t.parallel and t._around == ([0], [1])
    text = _long_texts()["corpus"]
    ids = t.encode(text)
    assert ids == t.tok.encode(text) and ids[0] == 0 and ids[-1] == 1 and ids.count(0) == 1


def test_a_long_text_is_cut_into_pieces_of_at_most_piece_chars(monkeypatch):
    """Each piece's ids come back to Python in one call that holds the GIL: however few the
    cores, a long text is cut into pieces of at most PIECE_CHARS characters (more pieces than
    2 per CPU), and the ids are still those of one encode."""
    from servers.ssm_server import textio

    t = _text()
    text = _long_texts()["corpus"]
    asked = []
    real = textio.cut_points
    monkeypatch.setattr(textio, "cut_points", lambda s, n: asked.append(n) or real(s, n))
    assert t.encode(text) == t.tok.encode(text)
    assert asked == [max(t.pieces, len(text) // textio.PIECE_CHARS)] and asked[0] >= 4
