"""Memory, state sizes and energy against hand-computed values."""

from __future__ import annotations

import json

import pytest

from analysis import memory, synthetic
from analysis.records import load_run
from servers import presets


def test_kv_bytes_per_token_from_the_paper_models():
    qwen = presets.get("qwen2.5-0.5b")
    # 2 × 24 layers × 2 KV heads × 64 head dim × 2 bytes
    assert memory.kv_bytes_per_token(dict(qwen.config), "qwen2", 2) == 2 * 24 * 2 * 64 * 2 == 12288
    llama = presets.get("llama-3.2-1b")
    assert memory.kv_bytes_per_token(dict(llama.config), "llama", 2) == 2 * 16 * 8 * 64 * 2
    zamba = presets.get("zamba2-1.2b")  # shared attention applied at 6 of its 38 layers
    # its shared attention sees hidden ++ embeddings: head dim 2 × 2048 / 32 = 128 (as vLLM sizes it)
    assert memory.kv_bytes_per_token(dict(zamba.config), "zamba2", 2) == 2 * 6 * 32 * 128 * 2
    assert memory.kv_bytes_per_token(dict(presets.get("mamba2-780m").config), "mamba2", 2) is None


def test_state_bytes_per_sequence_mamba2():
    cfg = dict(presets.get("mamba2-780m").config)
    # 48 layers × (48 heads·64·128 SSM state + (3072 + 2·128) conv channels × 4 taps) × 2 bytes
    expected = 48 * (48 * 64 * 128 + (48 * 64 + 2 * 128) * 4) * 2
    assert memory.state_bytes_per_sequence(cfg, "mamba2", 2) == expected
    assert memory.state_bytes_per_sequence({}, "llama", 2) is None


def _scrape(t, target, stage, samples, source="server"):
    return dict(schema_version=1, time=t, target=target, source=source, url="u", stage=stage,
                ok=True, error=None, samples=[dict(name=n, labels={}, value=v) for n, v in samples])


def _req(target, n, start, e2e=1.0, family="transformer", conc=1):
    return dict(schema_version=1, request_id=f"{target}{n}{start}", target=target, family=family,
                stage=f"prompt={n}", stage_index=0, status="ok", prompt_tokens_requested=n,
                completion_tokens=4, concurrency=conc, start_time=start, ttft_s=0.1,
                itl_s=[0.1] * 3, e2e_s=e2e)


def _write(tmp_path, reqs, scrapes, env=None):
    (tmp_path / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reqs))
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(s) + "\n" for s in scrapes))
    (tmp_path / "env.json").write_text(json.dumps(env or {"run_id": "m", "finished_at": "x",
                                                          "targets": [{"name": "a", "family": "transformer"}]}))
    return load_run(tmp_path)


def test_memory_curve_by_stage_label_and_by_time(tmp_path):
    reqs = [_req("a", 1024, 100.0), _req("a", 2048, 110.0)]
    scrapes = [_scrape(100.5, "a", "prompt=1024", [(memory.SERVER_MEMORY, 3e9)]),
               _scrape(100.7, "a", "prompt=1024", [(memory.SERVER_MEMORY, 3.5e9)]),  # the peak
               _scrape(110.5, "a", None, [(memory.SERVER_MEMORY, 4e9)]),  # placed by time
               _scrape(50.0, "a", None, [(memory.SERVER_MEMORY, 2e9)])]  # before any request
    run = _write(tmp_path, reqs, scrapes)
    (m,) = memory.memory_curves(run)
    assert m.lengths == [1024, 2048] and m.peak_bytes == [3.5e9, 4e9]
    assert m.baseline_bytes == 2e9 and m.source == "server"
    assert m.fit.coef[1] == pytest.approx(0.5e9 / 1024)


def test_gpu_exporter_memory_in_mib(tmp_path):
    run = _write(tmp_path, [_req("a", 1024, 100.0)],
                 [_scrape(100.5, "gpu", None, [(memory.GPU_MEMORY, 1000.0)], source="gpu")])
    (m,) = memory.memory_curves(run)
    assert m.peak_bytes == [1000.0 * 2**20] and m.source == "gpu"


def test_energy_from_counter_and_from_power(tmp_path):
    reqs = [_req("a", 1024, 100.0, e2e=2.0), _req("a", 1024, 102.0, e2e=2.0)]  # window 100 → 104
    counter = [_scrape(100.0, "gpu", None, [(memory.ENERGY, 5_000.0)], "gpu"),
               _scrape(104.0, "gpu", None, [(memory.ENERGY, 805_000.0)], "gpu")]
    (e,) = memory.energy_per_request(_write(tmp_path, reqs, counter))
    assert e.joules == pytest.approx(800.0) and e.per_request_j == pytest.approx(400.0)
    power = [_scrape(100.0, "gpu", None, [(memory.POWER, 100.0)], "gpu"),
             _scrape(102.0, "gpu", None, [(memory.POWER, 200.0)], "gpu"),
             _scrape(104.0, "gpu", None, [(memory.POWER, 200.0)], "gpu")]
    (e,) = memory.energy_per_request(_write(tmp_path, reqs, power))
    # trapezoids: 2·150 + 2·200 = 700 J over 2 requests
    assert e.joules == pytest.approx(700.0) and e.per_request_j == pytest.approx(350.0)
    assert e.source == memory.POWER


def test_budget_order(tmp_path):
    run = load_run(synthetic.write(tmp_path / "r"))
    assert memory.budget_bytes(run) == (24e9, "GPU NVIDIA GeForce RTX 4090")
    run.scenario["memory_budget_gb"] = 8
    assert memory.budget_bytes(run)[0] == 8e9
    run.scenario.pop("memory_budget_gb")
    run.env["gpus"] = []
    assert memory.budget_bytes(run)[0] == memory.PAPER_BUDGET_BYTES


def test_zero_state_gauge_falls_back_to_the_config(tmp_path):
    run = load_run(synthetic.write(tmp_path / "r", synthetic.SyntheticRun(gpu=False)))
    sizes = {s.target: s for s in memory.state_sizes(run)}
    assert sizes["tiny-mamba2"].state_bytes_per_sequence == 65536.0  # the synthetic gauge
    for s in run.scrapes:
        s.samples = [(n, lab, 0.0 if n == memory.STATE_BYTES else v) for n, lab, v in s.samples]
    sizes = {s.target: s for s in memory.state_sizes(run)}
    cfg = dict(presets.get("tiny-mamba2").config)
    assert sizes["tiny-mamba2"].state_bytes_per_sequence == memory.state_bytes_per_sequence(cfg, "mamba2", 4)
    assert "gauge" not in sizes["tiny-mamba2"].source


def test_stage_label_counts_only_while_the_target_ran_that_stage(tmp_path):
    # "b" is idle (but scraped, with the run's current stage label) while "a" runs prompt=1024
    reqs = [_req("a", 1024, 100.0), _req("b", 1024, 200.0, family="ssm")]
    scrapes = [_scrape(100.5, "b", "prompt=1024", [(memory.SERVER_MEMORY, 9e9)]),
               _scrape(200.5, "b", "prompt=1024", [(memory.SERVER_MEMORY, 3e9)])]
    env = {"run_id": "m", "finished_at": "x", "targets": [{"name": "a", "family": "transformer"},
                                                          {"name": "b", "family": "ssm"}]}
    (m,) = memory.memory_curves(_write(tmp_path, reqs, scrapes, env))
    assert m.target == "b" and m.peak_bytes == [3e9]


def _tagged(t, target, stage_target, index, value, source="server", resident=("a", "b"), **kw):
    s = _scrape(t, target, None, [(memory.SERVER_MEMORY, value)], source)
    return dict(s, stage_target=stage_target, stage_index=index, resident=list(resident), **kw)


def test_a_tagged_scrape_counts_only_in_its_own_targets_stage(tmp_path):
    # "a" ran its stage 0 at t=100; "b" ran stage 1 right after. A scrape of "a" at 101.2,
    # inside b's stage but within half a second of a's last request, is not a's prompt=1024
    reqs = [_req("a", 1024, 100.0), dict(_req("b", 1024, 101.0, family="ssm"), stage_index=1)]
    scrapes = [_tagged(100.5, "a", "a", 0, 3e9), _tagged(101.2, "a", "b", 1, 9e9),
               _tagged(101.5, "b", "b", 1, 4e9)]
    env = {"run_id": "m", "finished_at": "x", "targets": [{"name": "a", "family": "transformer"},
                                                          {"name": "b", "family": "ssm"}]}
    curves = {c.target: c for c in memory.memory_curves(_write(tmp_path, reqs, scrapes, env))}
    assert curves["a"].peak_bytes == [3e9] and curves["b"].peak_bytes == [4e9]


def test_device_wide_memory_counts_only_for_a_target_alone_on_the_device(tmp_path):
    reqs = [_req("a", 1024, 100.0), dict(_req("b", 1024, 110.0, family="ssm"), stage_index=1)]
    gpu = [dict(_tagged(100.5, "gpu", "a", 0, 0, source="gpu", resident=("a",)),
                samples=[dict(name=memory.GPU_MEMORY, labels={}, value=2000.0)]),
           dict(_tagged(110.5, "gpu", "b", 1, 0, source="gpu", resident=("a", "b")),  # both up
                samples=[dict(name=memory.GPU_MEMORY, labels={}, value=5000.0)])]
    env = {"run_id": "m", "finished_at": "x", "targets": [{"name": "a", "family": "transformer"},
                                                          {"name": "b", "family": "ssm"}]}
    (c,) = memory.memory_curves(_write(tmp_path, reqs, gpu, env))
    assert (c.target, c.source, c.peak_bytes) == ("a", "gpu", [2000.0 * 2**20])


def test_per_process_gpu_memory_goes_to_the_server_that_holds_the_process(tmp_path):
    reqs = [_req("a", 1024, 100.0), dict(_req("b", 1024, 110.0, family="ssm"), stage_index=1)]
    per_pid = [dict(name=memory.PROCESS_MEMORY, labels={"pid": "11"}, value=3e9),
               dict(name=memory.PROCESS_MEMORY, labels={"pid": "12"}, value=1e9),  # a's engine core
               dict(name=memory.PROCESS_MEMORY, labels={"pid": "21"}, value=7e9),
               dict(name=memory.GPU_MEMORY, labels={}, value=12000.0)]
    gpu = [dict(_tagged(t, "gpu", st, i, 0, source="gpu"), samples=per_pid, pids={"a": [11, 12], "b": [21]})
           for t, st, i in ((100.5, "a", 0), (110.5, "b", 1))]
    env = {"run_id": "m", "finished_at": "x", "targets": [{"name": "a", "family": "transformer"},
                                                          {"name": "b", "family": "ssm"}]}
    curves = {c.target: c for c in memory.memory_curves(_write(tmp_path, reqs, gpu, env))}
    assert curves["a"].source == curves["b"].source == "gpu process"
    assert curves["a"].peak_bytes == [4e9] and curves["b"].peak_bytes == [7e9]


def test_vllm_memory_is_weights_plus_the_kv_cache_in_use(tmp_path):
    reqs = [_req("q", 65536, 100.0)]
    info = {"num_gpu_blocks": "100000", "block_size": "16"}
    scrapes = [dict(_tagged(100.5, "q", "q", 0, 0, resident=("q",)),
                    samples=[dict(name=memory.VLLM_KV_USAGE, labels={}, value=0.05),
                             dict(name=memory.VLLM_CACHE_INFO, labels=info, value=1.0)])]
    env = {"run_id": "m", "finished_at": "x",
           "targets": [{"name": "q", "family": "transformer", "preset": "qwen2.5-0.5b", "engine": "vllm"}]}
    (c,) = memory.memory_curves(_write(tmp_path, reqs, scrapes, env))
    weights = presets.get("qwen2.5-0.5b").weight_bytes()
    assert c.source == "vllm"
    assert c.peak_bytes == [weights + 0.05 * 100000 * 16 * 12288]  # 80,000 tokens × 12 KiB
