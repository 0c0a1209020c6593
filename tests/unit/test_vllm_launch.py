"""vLLM launch profiles: the rules every profile keeps, and vLLM's own parser accepting them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from servers import presets
from servers import vllm_launch as vl
from tests.conftest import REPO, build_tiny, need_vllm


def test_hybrids_and_ssms_run_without_prefix_caching_transformers_with_it():
    for name, p in presets.PRESETS.items():
        prof = vl.profile_for(name)
        assert prof.enable_prefix_caching is (p.family == "transformer"), name
        assert prof.cpu is p.tiny, name
        assert prof.enable_chunked_prefill


def test_real_size_preset_is_served_with_dummy_weights_under_its_own_name(tmp_path):
    cmd = vl.command("falcon-h1-0.5b", 8123, python="PY", cache_dir=tmp_path)
    assert cmd[:5] == ["PY", "-m", "vllm.entrypoints.openai.api_server", "--model",
                       str(tmp_path / "falcon-h1-0.5b")]
    assert (tmp_path / "falcon-h1-0.5b" / "config.json").exists()
    assert not list((tmp_path / "falcon-h1-0.5b").glob("*.safetensors"))  # nothing multi-GB
    s = " ".join(cmd)
    for piece in ("--served-model-name falcon-h1-0.5b", "--load-format dummy", "--port 8123",
                  "--host 127.0.0.1", "--no-enable-prefix-caching", "--enable-chunked-prefill",
                  "--gpu-memory-utilization 0.900", "--max-model-len auto"):
        assert piece in s
    assert "--enforce-eager" not in cmd


def test_tiny_model_directory_gets_the_cpu_profile_and_its_weights():
    d = build_tiny("tiny-llama")
    cmd = vl.command(d, 9000, python="PY", extra=["--seed", "3"])
    s = " ".join(cmd)
    assert "--enforce-eager" in cmd and "--kv-cache-memory-bytes 134217728" in s
    assert "--load-format" not in cmd  # the directory holds real (random) weights
    assert "--enable-prefix-caching" in cmd and "--served-model-name tiny-llama" in s
    assert cmd[-2:] == ["--seed", "3"]


def test_overrides_and_hub_weights(tmp_path):
    cmd = vl.command("qwen2.5-0.5b", 1, python="PY", weights="hub", max_model_len=4096,
                     gpu_memory_utilization=0.3)
    assert cmd[3:5] == ["--model", "Qwen/Qwen2.5-0.5B-Instruct"] and "--load-format" not in cmd
    assert "--max-model-len 4096" in " ".join(cmd) and "--gpu-memory-utilization 0.300" in " ".join(cmd)
    with pytest.raises(ValueError, match="no hub checkpoint"):
        vl.command("tiny-llama", 1, weights="hub")


H200 = 143771 << 20  # what NVML says of an H200


def _flags(args: list[str]) -> dict:
    """``--flag value`` pairs and lone boolean ``--flag``s (True)."""
    out, i = {}, 0
    while i < len(args):
        if i + 1 < len(args) and not args[i + 1].startswith("--"):
            out[args[i]], i = args[i + 1], i + 2
        else:
            out[args[i]], i = True, i + 1
    return out


def test_every_real_size_preset_under_a_24gib_budget_on_an_h200(tmp_path):
    """The launch command of every real-size preset under `memory_budget: 24GiB`: the share of
    the card, the length rule of its family, and a max_num_seqs whose state fits."""
    for name, p in presets.PRESETS.items():
        if p.tiny:
            continue
        cmd = vl.command(name, 1, python="PY", cache_dir=tmp_path, memory_budget_bytes=24 << 30,
                         card_bytes=H200, served_name=f"{name}-vllm")
        args = _flags(cmd[3:])
        assert args["--served-model-name"] == f"{name}-vllm"
        assert args["--enable-prompt-tokens-details"] is True  # usage says the cached tokens
        assert args["--gpu-memory-utilization"] == "0.171"  # 24 GiB of 140.4 GiB
        assert args["--max-model-len"] == ("1049600" if p.family == "ssm" else "auto")
        assert vl.environment(name) == ({"VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"} if p.family == "ssm" else {})
        assert int(args["--max-num-seqs"]) == 64, name  # 24 GiB holds 64 states of each


def test_a_small_budget_caps_max_num_seqs_by_vllms_mamba_blocks(tmp_path):
    # Mamba2-780m in vLLM: 48 layers × (48·64·128 SSM + (3072 + 2·128)·3 conv) × 2 bytes
    per_seq = 48 * (48 * 64 * 128 + (3072 + 2 * 128) * 3) * 2
    assert per_seq == 38_707_200 == vl.vllm_state_bytes(vl.resolve("mamba2-780m", cache_dir=tmp_path))
    budget = 6 << 30
    weights = presets.get("mamba2-780m").weight_bytes()
    cmd = vl.command("mamba2-780m", 1, python="PY", cache_dir=tmp_path, memory_budget_bytes=budget, card_bytes=H200)
    seqs = int(cmd[cmd.index("--max-num-seqs") + 1])
    assert seqs == int((budget - weights - vl.GPU_RUNTIME_BYTES) * vl.STATE_HEADROOM // per_seq) - 1 == 30
    with pytest.raises(ValueError, match="does not hold the weights"):
        vl.command("llama-3.2-1b", 1, python="PY", cache_dir=tmp_path, memory_budget_bytes=1 << 30, card_bytes=H200)
    with pytest.raises(ValueError, match="no room for one"):
        vl.command("mamba2-780m", 1, python="PY", cache_dir=tmp_path, memory_budget_bytes=4 << 30, card_bytes=H200)


def test_a_budget_on_cpu_sizes_the_kv_cache_in_bytes(tmp_path):
    d = build_tiny("tiny-llama")
    weights = presets.get("tiny-llama").weight_bytes()
    cmd = vl.command(d, 1, python="PY", memory_budget_bytes=weights + (32 << 20))
    assert cmd[cmd.index("--kv-cache-memory-bytes") + 1] == str(32 << 20)


def test_several_gpus_split_the_model_or_replicate_it(tmp_path):
    """A target's `gpus`: tensor parallelism halves each GPU's share of the weights and of a
    Mamba state, so the same per-GPU budget holds more sequences; data parallelism keeps
    whole replicas; the process sees only its GPUs."""
    weights = presets.get("mamba2-780m").weight_bytes()
    per_seq = vl.vllm_state_bytes(vl.resolve("mamba2-780m", cache_dir=tmp_path))
    budget = 6 << 30
    seqs = {}
    for gpus, parallel in (([3], "tensor"), ([0, 1], "tensor"), ([0, 1], "data")):
        cmd = vl.command("mamba2-780m", 1, python="PY", cache_dir=tmp_path, memory_budget_bytes=budget,
                         card_bytes=H200, gpus=gpus, parallel=parallel)
        args = _flags(cmd[3:])
        assert args.get("--tensor-parallel-size") == ("2" if len(gpus) == 2 and parallel == "tensor" else None)
        assert args.get("--data-parallel-size") == ("2" if parallel == "data" else None)
        seqs[len(gpus), parallel] = int(args["--max-num-seqs"])
    assert seqs[1, "tensor"] == seqs[2, "data"] == 30
    assert seqs[2, "tensor"] == min(64, int((budget - weights // 2 - vl.GPU_RUNTIME_BYTES)
                                            * vl.STATE_HEADROOM // (per_seq // 2)) - 1) == 64
    assert vl.visible_devices([2, 5]) == {"CUDA_VISIBLE_DEVICES": "2,5"} and vl.visible_devices(None) == {}
    with pytest.raises(ValueError, match="parallel must be tensor or data"):
        vl.command("mamba2-780m", 1, python="PY", cache_dir=tmp_path, gpus=[0, 1], parallel="pipeline")


def test_memory_budget_becomes_a_fraction_of_the_card():
    assert vl.parse_bytes("24GiB") == 24 << 30
    assert vl.parse_bytes("512MB") == 512_000_000
    assert vl.parse_bytes("1024") == 1024
    assert vl.budget_fraction(24 << 30, 80 << 30) == 0.3
    assert vl.budget_fraction(100 << 30, 80 << 30) == 0.95
    with pytest.raises(ValueError):
        vl.parse_bytes("lots")


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "ctxload.cli", "serve", "vllm", *args],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, **(env or {})},
                          timeout=120)


def test_ctxload_serve_vllm_print_and_errors(tmp_path):
    r = _cli("tiny-mamba2", "--print", "--port", "9", "--model-cache", str(tmp_path),
             "--python", "PY", "--vllm-args", "--seed 3")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("PY -m vllm.entrypoints.openai.api_server --model ")
    assert "--no-enable-prefix-caching" in r.stdout and r.stdout.rstrip().endswith("--seed 3")
    r = _cli("no-such-preset", "--print")
    assert r.returncode == 2 and "unknown preset 'no-such-preset'" in r.stderr
    r = _cli("tiny-llama", "--print", "--gpu-memory-utilization", "1.5", "--model-cache", str(tmp_path))
    assert r.returncode == 2 and "--gpu-memory-utilization" in r.stderr


_PARSE_IN_VLLM = r"""
import json, sys
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
from servers import presets, vllm_launch as vl
p = make_arg_parser(FlexibleArgumentParser())
out = {}
for name, pre in presets.PRESETS.items():
    m = vl.Model("/m/" + name, name, pre.family, pre.tiny, pre.tiny, name)
    a = vl.vllm_args(m, vl.profile_for(name), port=8000, host="0.0.0.0")
    ns = p.parse_args(a)
    validate_parsed_serve_args(ns)
    out[name] = dict(max_model_len=ns.max_model_len, prefix=ns.enable_prefix_caching,
                     load_format=ns.load_format, name=ns.served_model_name,
                     eager=ns.enforce_eager, chunked=ns.enable_chunked_prefill)
from dataclasses import replace
m = vl.Model("/m/qwen2.5-0.5b", "qwen2.5-0.5b", "transformer", False, False, "qwen2.5-0.5b")
for key in ("tensor_parallel_size", "data_parallel_size"):
    ns = p.parse_args(vl.vllm_args(m, replace(vl.profile_for("qwen2.5-0.5b"), **{key: 2})))
    validate_parsed_serve_args(ns)
    out[key] = [ns.tensor_parallel_size, ns.data_parallel_size]
print(json.dumps(out))
"""


@pytest.mark.vllm
def test_every_profile_is_accepted_by_vllms_own_argument_parser():
    """The profiles parse under vLLM 0.32's serve parser, meaning what we mean.

    This runs servers.vllm_launch under the vLLM venv's interpreter with the repository on
    PYTHONPATH, as the Docker stack runs it inside the official vLLM image.
    """
    python = need_vllm()
    r = subprocess.run([str(python), "-c", _PARSE_IN_VLLM], capture_output=True, text=True,
                       cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    # a target on two GPUs: tensor or data parallelism, as vLLM reads them
    assert got.pop("tensor_parallel_size") == [2, 1] and got.pop("data_parallel_size") == [1, 2]
    assert set(got) == set(presets.PRESETS)
    for name, ns in got.items():
        p = presets.PRESETS[name]
        assert ns["name"] == [name]
        assert ns["prefix"] is (p.family == "transformer")
        assert ns["load_format"] == ("auto" if p.tiny else "dummy")
        assert ns["eager"] is p.tiny and ns["chunked"] is True
        # vLLM reads `auto` as -1: fit to the KV cache at start-up
        assert ns["max_model_len"] == (2048 if p.tiny else (1 << 20) + 1024 if p.family == "ssm" else -1)


@pytest.mark.vllm
def test_the_launcher_builds_model_directories_under_the_vllm_interpreter(tmp_path):
    """What each vLLM container does first: build the preset's directory with the image's own
    transformers (here: the vLLM venv's), then hand over to vLLM."""
    python = need_vllm()
    for preset, weights in [("falcon-h1-0.5b", False), ("tiny-mamba2", True)]:
        r = subprocess.run([str(python), "-m", "servers.vllm_launch", preset, "--print", "--host", "0.0.0.0",
                            "--model-cache", str(tmp_path)], capture_output=True, text=True, cwd=REPO,
                           env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        d = tmp_path / preset
        assert f"--model {d} --served-model-name {preset} --host 0.0.0.0" in r.stdout
        assert (d / "config.json").exists() and (d / "tokenizer.json").exists()
        assert bool(list(d.glob("*.safetensors"))) is weights
        assert ("--load-format dummy" in r.stdout) is (not weights)
