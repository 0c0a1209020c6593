"""`ctxload plan`: the arithmetic against hand-computed values, and against the H200 run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from analysis import plan_check
from analysis.records import load_run
from analysis.scaling import context_limits
from servers import plan as pl
from servers import presets
from tests.conftest import REPO

GiB = 2**30
# Hand-computed, bf16: KV = 2 × attention layers × KV heads × head dim × 2 B; state = Mamba
# layers × (heads·head_dim·d_state + conv channels × taps) × 2 B (vLLM keeps kernel − 1 taps)
KV = {"qwen2.5-0.5b": 2 * 24 * 2 * 64 * 2, "qwen2.5-1.5b": 2 * 28 * 2 * 128 * 2,
      "llama-3.2-1b": 2 * 16 * 8 * 64 * 2, "falcon-h1-0.5b": 2 * 36 * 2 * 64 * 2,
      "zamba2-1.2b": 2 * 6 * 32 * 128 * 2}
VLLM_STATE = {"mamba2-780m": 48 * (48 * 64 * 128 + (3072 + 2 * 128) * 3) * 2,
              "mamba2-130m": 24 * (24 * 64 * 128 + (1536 + 2 * 128) * 3) * 2,
              "mamba-790m": 48 * 3072 * (16 + 3) * 2,
              "falcon-h1-0.5b": 36 * (24 * 64 * 128 + (1536 + 2 * 128) * 3) * 2,
              "zamba2-1.2b": 38 * (64 * 64 * 64 + (4096 + 2 * 64) * 3) * 2}


@pytest.mark.parametrize("name", [n for n, p in presets.PRESETS.items() if not p.tiny])
def test_every_real_size_preset_on_vllm_by_hand(name):
    p = plan_of = pl.plan(name, 24 * GiB, engine="vllm")
    assert p.kv_bytes_per_token == KV.get(name, 0)
    assert p.state_bytes_per_sequence == VLLM_STATE.get(name, 0)
    assert p.cache_bytes == 24 * GiB - p.weights_bytes - p.runtime_bytes
    family = presets.get(name).family
    if family == "transformer":
        tokens = (p.cache_bytes - 0) // KV[name]
        assert plan_of.kv_cache_tokens == tokens
        assert p.max_context_tokens == min(tokens, 1 << 20)
        assert p.limit == ("position limit" if tokens >= 1 << 20 else "kv cache")
    elif family == "ssm":
        assert (p.max_context_tokens, p.limit) == (None, "none")
    else:
        assert p.page_rule and p.max_context_tokens


def test_weights_from_the_parameter_count():
    assert pl.plan("qwen2.5-0.5b", 24 * GiB).weights_bytes == 494_032_768 * 2  # Qwen's published count
    assert pl.plan("llama-3.2-1b", 24 * GiB).weights_bytes == 1_235_814_400 * 2
    assert pl.plan("llama-3.2-1b", 24 * GiB, dtype="fp32").weights_bytes == 1_235_814_400 * 4


def test_vllm_hybrid_page_rule():
    f = pl.plan("falcon-h1-0.5b", 24 * GiB, engine="vllm")
    # a Mamba layer: 24·64·128·2 + (1536 + 256)·3·2 = 403,968 B; attention 2·2·64·2 = 512 B a token:
    # block 16·⌈403,968 / (16·512)⌉ = 800 tokens, page 409,600 B
    assert "attention block 800 tokens; page 409,600 B" in f.page_rule and "padded 1.4%" in f.page_rule
    blocks = f.cache_bytes // 409_600 // 36
    assert f.kv_cache_tokens == blocks * 800
    z = pl.plan("zamba2-1.2b", 24 * GiB, engine="vllm")
    # 64·64·64·2 + (4096 + 128)·3·2 = 549,632 B; attention 2·32·128·2 = 16,384 B: block 48, page 786,432
    assert "attention block 48 tokens; page 786,432 B" in z.page_rule and "7 Mamba + 1 attention" in z.page_rule
    assert z.max_context_tokens == (z.cache_bytes // 786_432 // 6 - 7) * 48


def test_concurrency_divides_the_cache_and_ssm_server_bounds_no_length():
    one, many = (pl.plan("llama-3.2-1b", 24 * GiB, engine="vllm", concurrency=c) for c in (1, 64))
    assert many.max_context_tokens == one.cache_bytes // (64 * KV["llama-3.2-1b"])
    m = pl.plan("mamba2-780m", 24 * GiB)  # its own engine: ssm-server
    assert m.engine == "ssm-server" and m.limit == "none" and m.slots_bytes == 64 * m.state_bytes_per_sequence


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "ctxload", "plan", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def test_cli_table_json_and_errors():
    r = _cli("llama-3.2-1b", "falcon-h1-0.5b", "--budget", "24GiB", "--concurrency", "1,8", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [(x["model"], x["concurrency"]) for x in rows] == [
        ("llama-3.2-1b", 1), ("llama-3.2-1b", 8), ("falcon-h1-0.5b", 1), ("falcon-h1-0.5b", 8)]
    r = _cli("mamba2-780m", "--budget", "24GiB")
    assert r.returncode == 0 and "| mamba2-780m | ssm-server | 1 |" in r.stdout and "unbounded" in r.stdout
    for args, says in ((["nope", "--budget", "24GiB"], "unknown preset 'nope'"),
                       (["llama-3.2-1b", "--budget", "1GiB"], "smaller than llama-3.2-1b's weights"),
                       (["llama-3.2-1b", "--budget", "lots"], "--budget: not a memory size"),
                       (["llama-3.2-1b", "--budget", "24GiB", "--concurrency", "0"], "--concurrency")):
        r = _cli(*args)
        assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1


def test_the_plan_against_the_h200_run():
    """The committed GPU run: vLLM's own KV capacity and the limits it served within 10% of the
    plan (all within 2%), the memory each vLLM held within 10% of its budget."""
    run = load_run(REPO / "tests" / "fixtures" / "runs" / "h200-paper")
    got = {(c.target, c.figure): c for c in plan_check.checks(run, context_limits(run))}
    for t in ("qwen2.5-0.5b-vllm", "falcon-h1-0.5b-vllm", "llama-3.2-1b-vllm"):
        assert abs(got[(t, "KV cache capacity")].miss) < 0.02, got[(t, "KV cache capacity")]
        assert not got[(t, "memory held (per process)")].flagged
    for t in ("qwen2.5-0.5b-vllm", "falcon-h1-0.5b-vllm"):
        assert got[(t, "longest context")].miss == 0  # 1,048,544 planned and served
    # ssm-server keeps more working memory in reserve than it used: the report flags it
    assert got[("mamba2-780m-ssm", "memory held (per process)")].flagged
    # a target spread over two GPUs is set beside the plan over two (one GPU's figures: its KV
    # capacity, not its memory held); replicas (data parallel) are not planned
    for t in run.env["targets"]:
        if t["name"] == "qwen2.5-0.5b-vllm":
            t["launch_args"] = t["launch_args"] + ["--tensor-parallel-size", "2"]
        if t["name"] == "llama-3.2-1b-vllm":
            t["launch_args"] = t["launch_args"] + ["--data-parallel-size", "2"]
    got = {(c.target, c.figure): c for c in plan_check.checks(run, context_limits(run))}
    q = "qwen2.5-0.5b-vllm"
    assert got[(q, "KV cache capacity")].planned == pl.plan("qwen2.5-0.5b", 24 * GiB, tensor_parallel=2).kv_cache_tokens
    assert (q, "memory held (per process)") not in got
    assert not any(t == "llama-3.2-1b-vllm" for t, _ in got) and ("falcon-h1-0.5b-vllm", "KV cache capacity") in got


def test_tensor_parallel_splits_weights_states_and_kv_heads():
    """Over N GPUs each holds 1/N of the weights and of a Mamba state, and its share of the KV
    heads, whole: Qwen2.5-0.5B's 2 KV heads are one a GPU over 2 GPUs, and over 4 (vLLM keeps a
    head on each GPU that shares it); ssm-server refuses."""
    one = pl.plan("qwen2.5-0.5b", 24 * GiB)
    two, four = (pl.plan("qwen2.5-0.5b", 24 * GiB, tensor_parallel=n) for n in (2, 4))
    assert two.weights_bytes == one.weights_bytes // 2 and four.weights_bytes == one.weights_bytes // 4
    assert two.kv_bytes_per_token == four.kv_bytes_per_token == KV["qwen2.5-0.5b"] // 2
    assert two.kv_cache_tokens == two.cache_bytes // (KV["qwen2.5-0.5b"] // 2)
    assert two.tensor_parallel == 2
    z = pl.plan("zamba2-1.2b", 24 * GiB, tensor_parallel=2)
    assert z.state_bytes_per_sequence == VLLM_STATE["zamba2-1.2b"] // 2 and z.kv_bytes_per_token == KV["zamba2-1.2b"] // 2
    # one GPU's page: a Mamba layer's half state 274,816 B over attention's 8,192 B a token: block 48
    assert "attention block 48 tokens; page 393,216 B" in z.page_rule
    with pytest.raises(pl.PlanError, match="ssm-server serves a model on one GPU"):
        pl.plan("mamba2-780m", 24 * GiB, engine="ssm-server", tensor_parallel=2)
    r = _cli("qwen2.5-1.5b", "--budget", "24GiB", "--tensor-parallel-size", "2")
    assert r.returncode == 0 and "on each of 2 GPUs (tensor parallel)" in r.stdout, r.stderr
    for args, says in ((["qwen2.5-0.5b", "--budget", "24GiB", "--tensor-parallel-size", "0"], "at least 1"),
                       (["mamba2-780m", "--budget", "24GiB", "--tensor-parallel-size", "2"], "one GPU")):
        r = _cli(*args)
        assert r.returncode == 2 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_model_directory_is_planned_as_its_preset(tmp_path):
    from tests.conftest import build_tiny

    d = build_tiny("tiny-llama")
    a, b = pl.plan(str(d), 1 * GiB, engine="vllm"), pl.plan("tiny-llama", 1 * GiB, engine="vllm")
    assert (a.model, a.weights_bytes, a.max_context_tokens) == ("tiny-llama", b.weights_bytes, b.max_context_tokens)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(pl.PlanError, match="not built from a preset"):
        pl.plan(str(tmp_path), 1 * GiB)
