"""A tokenizer built locally, with no hub: byte-level BPE trained on a fixed synthetic corpus.

Byte-level BPE encodes any text (every byte has a token), so prompts of any content work.
Training is deterministic for a given vocabulary size and takes well under a second.  The
result is saved in the ``tokenizer.json`` + ``tokenizer_config.json`` form that
``transformers.AutoTokenizer`` and vLLM load offline.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

EOS = "<|endoftext|>"

#: Plain English words the training corpus is made of; prompts built from the same words
#: tokenize into whole-word tokens, which keeps prompt synthesis fast and exact.
WORDS = (
    "the of and to in is was that for it with as his on be at by he this had not are but from or"
    " have an they which one you were her all she there would their we him been has when who will"
    " more no if out so said what up its about into than them can only other new some could time"
    " these two may then do first any my now such like our over man me even most made after also"
    " did many before must through back years where much your way well down should because each"
    " just those people how too little state good very make world still own see men work long get"
    " here between both life being under never day same another know while last might us great old"
    " year off come since against go came right used take three states himself few house use during"
    " without again place american around however home small found thought went say part once"
    " general high upon school every don does got united left number course war until always away"
    " something fact though water less public put think almost hand enough far took head yet"
    " government system better set told nothing night end why called didn eyes find going look asked"
    " later point knew city next program business give group toward young days let room president"
    " side social given present several order national possible rather second face per among form"
    " important often things looked early white case john become large big need four within felt"
    " along children saw best church ever least power development light thing seemed family"
    " interest want members mind country area others done turned although open god service certain"
    " kind problem began different door thus help sense means whole matter perhaps itself york times"
    " law human line above name example action company hands local show whether five history gave"
    " today either act feet across taken past quite anything seen having death week experience body"
    " word half really field am car words already themselves information tell together college shall"
    " money period held keep sure free seems political real behind cannot miss air question making"
    " office brought whose special heard major problems ago became federal moment study available"
    " known result street economic boy position reason change south board individual job areas"
    " society west close turn love community true court force full seem wife future age voice center"
    " woman control common policy necessary following front sometimes six girl clear further land"
    " run students provide feel party able mother music education university child effect level"
    " stood military town short morning total outside rate figure class art century washington north"
    " usually leave therefore evidence percent black million basis england space model memory state"
    " context token prompt length serve load test measure latency throughput stream"
).split()


def corpus(n_sentences: int = 20000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n_sentences):
        k = rng.randint(4, 18)
        s = " ".join(rng.choice(WORDS) for _ in range(k))
        out.append(s.capitalize() + rng.choice([".", ".", ".", "?", "!", ","]))
    return out


def build_tokenizer(vocab_size: int):
    """Train a byte-level BPE tokenizer of at most ``vocab_size`` tokens (EOS included)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    return tok


#: A plain chat template (role headers, then the assistant turn) for models that ship none.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def save_tokenizer(out_dir: Path, vocab_size: int, model_max_length: int) -> int:
    """Build and save the tokenizer into ``out_dir``; returns the number of tokens it has."""
    tok = build_tokenizer(min(vocab_size, 8192))
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    eos_id = tok.token_to_id(EOS)
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": EOS,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": EOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}, indent=2)
    )
    assert eos_id == 0, eos_id
    return tok.get_vocab_size()
