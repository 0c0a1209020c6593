"""The preset registry, the local tokenizer and model directories."""

import json

import pytest

from servers import modeldir, presets
from servers.tokenizer import EOS, build_tokenizer


def test_paper_models_present_at_real_size():
    want = {"qwen2.5-0.5b", "llama-3.2-1b", "mamba-790m", "mamba2-780m", "falcon-h1-0.5b", "zamba2-1.2b"}
    assert want <= {p.name for p in presets.PRESETS.values() if p.in_paper}
    # real sizes: hidden width and depth as published
    assert presets.get("mamba2-780m").config["hidden_size"] == 1536
    assert presets.get("mamba2-780m").config["num_hidden_layers"] == 48
    assert presets.get("qwen2.5-0.5b").config["num_key_value_heads"] == 2


def test_every_family_has_a_tiny_preset():
    for family, name in presets.TINY_BY_FAMILY.items():
        p = presets.get(name)
        assert p.tiny and p.family == family


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(presets.UnknownPreset) as e:
        presets.get("mamba3-9000b")
    assert "mamba3-9000b" in str(e.value) and "tiny-mamba2" in str(e.value)


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_every_preset_config_instantiates(name):
    cfg = presets.get(name).hf_config()
    assert cfg.model_type == presets.get(name).model_type
    assert cfg.vocab_size == presets.get(name).vocab_size


def test_tokenizer_is_deterministic_and_byte_level():
    a, b = build_tokenizer(512), build_tokenizer(512)
    text = "the context length of the model ünïcødé 🙂 42"
    assert a.encode(text).ids == b.encode(text).ids
    assert a.decode(a.encode(text).ids) == text  # any text round-trips
    assert a.token_to_id(EOS) == 0
    assert a.get_vocab_size() <= 512


def test_build_model_dir_loads_offline(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = modeldir.build("tiny-mamba2", tmp_path / "m", log=None)
    meta = json.loads((out / "ctxload.json").read_text())
    assert meta["family"] == "ssm" and meta["preset"] == "tiny-mamba2"
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tok("the state of the world", return_tensors="pt").input_ids
    assert ids.shape[1] > 0 and int(ids.max()) < model.config.vocab_size
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
    info = modeldir.info(out)
    assert (info.family, info.preset, info.model_type) == ("ssm", "tiny-mamba2", "mamba2")
    # same preset again is a no-op (the file is not rewritten)
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    modeldir.build("tiny-mamba2", out, log=None)
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime


def test_no_weights_dir_has_config_and_tokenizer_only(tmp_path):
    out = modeldir.build("mamba2-780m", tmp_path / "big", weights=False, log=None)
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    assert not list(out.glob("*.safetensors"))
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 1536


def test_info_of_a_foreign_model_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "falcon_h1"}))
    assert modeldir.info(tmp_path).family == "hybrid"
    with pytest.raises(FileNotFoundError):
        modeldir.info(tmp_path / "nope")
