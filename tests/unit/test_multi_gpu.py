"""Targets on several GPUs: what a served target's process may see, and whose device readings
are whose when two targets run at once on GPUs of their own — with the GPU exporter's real
collector over a stand-in of NVML for three GPUs (no GPU here)."""

from __future__ import annotations

import json
import textwrap
from types import SimpleNamespace

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from analysis import memory, tables
from analysis.analyze import analyze
from analysis.records import load_run
from loadgen import scenario as sc
from loadgen import targets
from servers import gpu_exporter as gx

MIB = 1 << 20


def _target(serve: str) -> sc.Target:
    return sc.parse(textwrap.dedent(f"""\
        name: t
        targets:
          - name: a
            serve: {serve}
        load: {{kind: context_sweep, prompt_tokens: [64]}}
        """)).targets[0]


def test_a_target_sees_only_its_gpus_and_vllm_spreads_over_them(tmp_path, monkeypatch):
    ssm = _target("{engine: ssm-server, preset: mamba2-780m, gpus: [3]}")
    assert targets.environment(ssm, "m") == {"CUDA_VISIBLE_DEVICES": "3"}
    assert targets.environment(_target("{engine: ssm-server, preset: mamba2-780m}"), "m") == {}
    monkeypatch.setenv("CTXLOAD_MODELS", str(tmp_path))
    tp = _target("{engine: vllm, preset: qwen2.5-0.5b, gpus: [1, 2], args: [--seed, '3']}")
    assert targets.environment(tp, "qwen2.5-0.5b") == {"CUDA_VISIBLE_DEVICES": "1,2"}
    model, _ = targets._model_dir(tp.serve, lambda *_: None)
    cmd = targets.command(tp, model, 8000)
    at = cmd.index("--tensor-parallel-size")
    assert cmd[at + 1] == "2" and "--data-parallel-size" not in cmd and cmd[-2:] == ["--seed", "3"]
    dp = _target("{engine: vllm, preset: qwen2.5-0.5b, gpus: [0, 1], parallel: data}")
    cmd = targets.command(dp, model, 8000)
    assert cmd[cmd.index("--data-parallel-size") + 1] == "2" and "--tensor-parallel-size" not in cmd


class ThreeGpus:
    """pynvml's surface for three cards: each GPU's energy counter and memory as set; target
    `tp`'s two processes on GPUs 0 and 1, `solo`'s one on GPU 2."""

    class NVMLError(Exception):
        pass

    nvmlMemory_v2, NVML_TEMPERATURE_GPU, NVML_CLOCK_SM = 2, 0, 1

    def __init__(self, energy_mj: list[float], used_mib: list[int]):
        self.energy, self.used = energy_mj, used_mib

    def nvmlDeviceGetCount(self):
        return 3

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetUUID(self, h):
        return f"GPU-{h}"

    def nvmlDeviceGetName(self, h):
        return b"NVIDIA H200"

    def nvmlDeviceGetPciInfo(self, h):
        return SimpleNamespace(busId=f"00000000:{h:02x}:00.0".encode())

    def nvmlDeviceGetMemoryInfo(self, h, version=None):
        return SimpleNamespace(total=143771 * MIB, free=(143771 - self.used[h]) * MIB, used=self.used[h] * MIB,
                               reserved=0)

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=50, memory=5)

    def nvmlDeviceGetPowerUsage(self, h):
        return 300_000

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        return int(self.energy[h])

    def nvmlDeviceGetTemperature(self, h, kind):
        return 40

    def nvmlDeviceGetClockInfo(self, h, kind):
        return 1980

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return {0: [SimpleNamespace(pid=20, usedGpuMemory=10 << 30)],
                1: [SimpleNamespace(pid=21, usedGpuMemory=9 << 30)],
                2: [SimpleNamespace(pid=30, usedGpuMemory=4 << 30)]}[h]


def _scrape(t: float, nvml: ThreeGpus) -> dict:
    text = generate_latest(gx.make_registry(gx.NvmlCollector(nvml, hostname="h"))).decode()
    samples = [dict(name=s.name, labels=s.labels, value=s.value)
               for f in text_string_to_metric_families(text) for s in f.samples]
    return dict(schema_version=1, time=t, target="gpu", source="gpu", url="u", stage=None, ok=True,
                samples=samples, resident=["tp", "solo"], pids={"tp": [20, 21], "solo": [30]})


def _req(target: str, start: float) -> dict:
    return dict(schema_version=1, request_id=f"{target}{start}", target=target, family="transformer",
                stage="prompt=1024", stage_index=0, status="ok", prompt_tokens_requested=1024,
                completion_tokens=4, concurrency=1, start_time=start, ttft_s=0.1, itl_s=[0.1] * 3, e2e_s=2.0)


def test_two_targets_at_once_on_their_own_gpus_are_each_read_alone(tmp_path):
    # both run 100 → 104 s; GPU 0 and 1 (tp) use 1.2 and 1.0 kJ, GPU 2 (solo) 0.5 kJ
    scrapes = [_scrape(100.0, ThreeGpus([1e6, 2e6, 3e6], [20_000, 19_000, 8_000])),
               _scrape(104.0, ThreeGpus([1e6 + 1.2e6, 2e6 + 1.0e6, 3e6 + 0.5e6], [21_000, 19_500, 8_200]))]
    reqs = [_req("tp", 100.0), _req("tp", 102.0), _req("solo", 100.0), _req("solo", 102.0)]
    (tmp_path / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reqs))
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(s) + "\n" for s in scrapes))
    env = {"run_id": "g", "finished_at": "x", "targets": [
        {"name": "tp", "family": "transformer", "engine": "vllm", "gpus": [0, 1]},
        {"name": "solo", "family": "transformer", "engine": "vllm", "gpus": [2]}]}
    (tmp_path / "env.json").write_text(json.dumps(env))
    run = load_run(tmp_path)

    env["targets"][0]["launch_args"] = ["-m", "vllm", "--tensor-parallel-size", "2"]
    (tmp_path / "env.json").write_text(json.dumps(env))
    run = load_run(tmp_path)
    rows = {r[0]: r for r in tables.engines(analyze(run)).rows}
    assert rows["tp"][4] == "0, 1 (tensor parallel)" and rows["solo"][4] == "2"

    e = {x.target: x for x in memory.energy_per_request(run)}
    assert e["tp"].by_gpu == pytest.approx({"0": 1200.0, "1": 1000.0}) and e["tp"].joules == pytest.approx(2200)
    assert e["solo"].by_gpu == pytest.approx({"2": 500.0}) and e["solo"].per_request_j == pytest.approx(250)

    held = {(r.target, r.source, r.time): r.bytes for r in memory.readings(run)}
    assert held["tp", "gpu process", 100.0] == 19 << 30  # its two processes, one per GPU
    assert held["solo", "gpu process", 100.0] == 4 << 30
    assert held["tp", "gpu", 104.0] == (21_000 + 19_500) * MIB  # device-wide: its own GPUs only
    assert held["solo", "gpu", 104.0] == 8_200 * MIB

    assert "GPUs" in tables.energy(analyze(run)).headers
    # unplaced, the same two targets share the device: neither window can be split
    for t in env["targets"]:
        t.pop("gpus")
    (tmp_path / "env.json").write_text(json.dumps(env))
    run = load_run(tmp_path)
    assert memory.energy_per_request(run) == []
    assert not [r for r in memory.readings(run) if r.source == "gpu"]
    assert "GPUs" not in tables.engines(analyze(run)).headers


def test_a_scrape_while_targets_run_at_once_goes_to_each_ones_own_stage(tmp_path):
    """`placement: by_gpu`: `tp` (GPUs 0, 1) runs its stage 4 while `solo` (GPU 2) runs its stage 5.
    The real scraper, over HTTP, scrapes the GPU exporter (its collector over the stand-in
    NVML) and solo's server; each target's device readings go to its own stage."""
    from prometheus_client import CollectorRegistry, Gauge

    from loadgen.scrape import Scraper
    from servers.metrics_http import serve_registry
    from servers.process import free_port

    gpu_port, solo_port = free_port(), free_port()
    gpu, _ = gx.serve(gpu_port, registry=gx.make_registry(gx.NvmlCollector(
        ThreeGpus([1e6, 2e6, 3e6], [20_000, 19_000, 8_000]), hostname="h")))
    reg = CollectorRegistry()
    Gauge("ssm:num_requests_running", "", registry=reg).set(1)
    solo, _ = serve_registry(reg, "127.0.0.1", solo_port)
    try:
        state = {"stages": {"tp": {"stage": "prompt=1024", "stage_index": 4},
                            "solo": {"stage": "prompt=2048", "stage_index": 5}},
                 "resident": {"tp": {"url": None, "pid": None},
                              "solo": {"url": f"http://127.0.0.1:{solo_port}", "pid": None}}}
        one = Scraper(tmp_path / "metrics.jsonl", [("gpu", "gpu", f"http://127.0.0.1:{gpu_port}/metrics")],
                      stage=lambda: state)
        one.once()
        state["stages"].pop("tp")  # tp is done: one stage runs, written as before waves
        one.once()
        one.close()
    finally:
        gpu.shutdown()
        solo.shutdown()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(x["target"], x["stage"], x["stage_target"], x["stage_index"], "stages" in x) for x in lines] == [
        ("gpu", None, None, None, True), ("solo", "prompt=2048", "solo", 5, True),
        ("gpu", "prompt=2048", "solo", 5, False), ("solo", "prompt=2048", "solo", 5, False)]
    assert all(x["ok"] for x in lines) and lines[0]["stages"]["tp"] == {"stage": "prompt=1024", "stage_index": 4}

    reqs = [dict(_req("tp", 100.0), stage_index=4), dict(_req("solo", 100.0), stage="prompt=2048", stage_index=5)]
    (tmp_path / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reqs))
    (tmp_path / "env.json").write_text(json.dumps({"run_id": "w", "finished_at": "x", "targets": [
        {"name": "tp", "family": "transformer", "engine": "vllm", "gpus": [0, 1], "wave": 0},
        {"name": "solo", "family": "transformer", "engine": "vllm", "gpus": [2], "wave": 0}]}))
    run = load_run(tmp_path)
    assert run.waves() == [["tp", "solo"]]
    first, last = (s for s in run.scrapes if s.source == "gpu")
    assert first.stage_of("tp") == (4, "prompt=1024") and first.stage_of("solo") == (5, "prompt=2048")
    assert last.stage_of("tp") is None and last.stage_of("solo") == (5, "prompt=2048")
    got = [(r.target, r.stage_index, r.stage, r.bytes / MIB) for r in memory.readings(run) if r.source == "gpu"]
    assert got == [("solo", 5, "prompt=2048", 8_000), ("tp", 4, "prompt=1024", 39_000),  # its own GPUs
                   ("solo", 5, "prompt=2048", 8_000), ("tp", None, None, 39_000)]  # tp between stages
    assert any("tp, solo ran at once" in n for n in analyze(run).notes)
