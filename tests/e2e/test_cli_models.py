"""`ctxload models` as a user runs it."""

import json
import subprocess
import sys


def ctxload(*args, **kw):
    return subprocess.run([sys.executable, "-m", "ctxload", *args], capture_output=True, text=True,
                          timeout=300, **kw)


def test_help_lists_every_command():
    r = ctxload("--help")
    assert r.returncode == 0
    for cmd in ("models", "serve", "run", "report", "compare", "demo"):
        assert cmd in r.stdout


def test_models_lists_presets():
    r = ctxload("models", "--json")
    assert r.returncode == 0, r.stderr
    names = {p["name"]: p for p in json.loads(r.stdout)}
    assert names["mamba2-780m"]["family"] == "ssm"
    assert names["tiny-falcon-h1"]["tiny"] is True
    plain = ctxload("models")
    assert "zamba2-1.2b" in plain.stdout


def test_models_build_writes_a_model_dir(tmp_path):
    r = ctxload("models", "build", "tiny-llama", "--out", str(tmp_path / "m"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "m" / "model.safetensors").exists()
    assert "built tiny-llama" in r.stdout


def test_unknown_preset_is_a_clear_error(tmp_path):
    r = ctxload("models", "build", "gpt-17", "--out", str(tmp_path / "m"))
    assert r.returncode == 2
    assert "unknown preset 'gpt-17'" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "m").exists()


def test_unknown_command_is_a_clear_error():
    r = ctxload("frobnicate")
    assert r.returncode == 2 and "unknown command" in r.stderr
