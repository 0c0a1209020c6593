"""`placement: by_gpu`: two targets on GPUs of their own run at the same time — a tiny Llama
"on GPU 0" and a tiny Mamba2 "on GPU 1" (on a CPU, `gpus` only sets CUDA_VISIBLE_DEVICES),
both real ssm-servers that `ctxload run` starts — while a GPU exporter (its real collector over
a stand-in of NVML: no GPU here) is scraped beside them. Every record and scrape goes to its
own target's stage, and the analysis gives each target its own figures."""

from __future__ import annotations

import json
import os
import time

import pytest

from analysis import memory
from analysis.analyze import analyze
from analysis.records import load_run
from servers import gpu_exporter as gx
from tests.conftest import MODEL_CACHE, ctxload_cli, run_scenario
from tests.unit.test_multi_gpu import MIB, ThreeGpus

USED_MIB = [1_000, 3_000, 5_000]


class Ticking(ThreeGpus):
    """Each GPU's energy counter rises with the clock: 100 W on GPU 0, 200 W on GPU 1."""

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        return int(time.time() * 100_000 * (h + 1))


@pytest.fixture
def gpu_exporter():
    from servers.process import free_port

    port = free_port()
    server, _thread = gx.serve(port, registry=gx.make_registry(gx.NvmlCollector(Ticking([0.0] * 3, USED_MIB),
                                                                                hostname="h")))
    yield f"http://127.0.0.1:{port}/metrics"
    server.shutdown()


def _read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_targets_on_their_own_gpus_run_at_once_and_keep_their_own_figures(tmp_path, gpu_exporter, tiny_models):
    scen = {"name": "waves", "placement": "by_gpu",
            "targets": [{"name": "llama", "serve": {"engine": "ssm-server", "preset": "tiny-llama", "gpus": [0]}},
                        {"name": "mamba2", "serve": {"engine": "ssm-server", "preset": "tiny-mamba2", "gpus": [1]}}],
            "output": {"max_tokens": 4},
            "load": {"kind": "context_sweep", "prompt_tokens": [32, 64], "duration_s": 2, "warmup_requests": 1},
            "metrics": {"scrape_interval_s": 0.5, "extra_urls": {"gpu": gpu_exporter}}}
    env_vars = {**os.environ, "CTXLOAD_MODELS": str(MODEL_CACHE)}
    run_dir = run_scenario(scen, tmp_path, "r", timeout_s=300, env=env_vars)
    env = json.loads((run_dir / "env.json").read_text())
    assert [(t["name"], t["wave"], t["gpus"], t["completed"]) for t in env["targets"]] == [
        ("llama", 0, [0], True), ("mamba2", 0, [1], True)]

    recs = _read(run_dir / "requests.jsonl")
    assert recs and all(r["status"] == "ok" for r in recs), [r["error_message"] for r in recs][:3]
    stages: dict[str, dict[int, str]] = {"llama": {}, "mamba2": {}}
    for r in recs:
        assert stages[r["target"]].setdefault(r["stage_index"], r["stage"]) == r["stage"]
    assert not set(stages["llama"]) & set(stages["mamba2"])  # indices unique across the run
    for t in stages:
        assert sorted(stages[t].values()) == ["prompt=32", "prompt=64", "warmup"]
    # the two sweeps ran at the same time: each one's stages of 2 s overlap the other's
    span = {t: (min(r["start_time"] for r in recs if r["target"] == t and r["stage"] != "warmup"),
                max(r["start_time"] + r["e2e_s"] for r in recs if r["target"] == t)) for t in stages}
    assert span["llama"][0] < span["mamba2"][1] and span["mamba2"][0] < span["llama"][1], span

    scrapes = _read(run_dir / "metrics.jsonl")
    both = [s for s in scrapes if "stages" in s]
    assert both, "no scrape while both ran"
    for s in scrapes:
        for t, own in (s.get("stages") or {}).items():
            assert stages[t][own["stage_index"]] == own["stage"]
        if s["source"] == "server" and s.get("stage_index") is not None:
            # a server's scrape names its own target's stage while several run
            if "stages" in s:
                assert s["stage_target"] == s["target"]
            assert stages[s["stage_target"]][s["stage_index"]] == s["stage"]
        if s["source"] == "gpu" and "stages" in s:
            assert s["stage_target"] is None and set(s["stages"]) == {"llama", "mamba2"}

    run = load_run(run_dir)
    a = analyze(run)
    assert any("llama, mamba2 ran at once" in n for n in a.notes)
    counted = {(s.target, s.stage): s.requests for s in a.stages}
    assert counted == {(r["target"], r["stage"]): sum(x["target"] == r["target"] and x["stage"] == r["stage"]
                                                      for x in recs) for r in recs if r["stage"] != "warmup"}
    gpu = [rd for rd in memory.readings(run) if rd.source == "gpu"]
    mine = {"llama": USED_MIB[0] * MIB, "mamba2": USED_MIB[1] * MIB}
    for rd in gpu:  # each target's device memory is its own GPU's, at its own stage
        assert rd.bytes == mine[rd.target] and (rd.stage_index is None or rd.stage_index in stages[rd.target])
    for t in stages:
        assert any(rd.target == t and rd.stage_index is not None and stages[t][rd.stage_index] != "warmup"
                   for rd in gpu), t
    energy = {(e.target, e.stage): e for e in a.energy}
    for t, g in (("llama", "0"), ("mamba2", "1")):
        for label in ("prompt=32", "prompt=64"):
            assert set(energy[t, label].by_gpu) == {g} and energy[t, label].joules > 0

    # as if the run had stopped before mamba2's stages: --resume runs the wave's unfinished target
    (run_dir / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs if r["target"] == "llama"))
    env["targets"][1]["completed"], env["finished_at"] = False, None
    (run_dir / "env.json").write_text(json.dumps(env))
    log = ctxload_cli("run", "--resume", str(run_dir), env=env_vars, timeout_s=300)
    assert "llama: completed earlier in this run; skipped" in log and "at the same time" not in log
    again = [r for r in _read(run_dir / "requests.jsonl") if r["target"] == "mamba2"]
    assert sorted({r["stage"] for r in again}) == ["prompt=32", "prompt=64", "warmup"]
    assert min(r["stage_index"] for r in again) > max(stages["llama"])
    env = json.loads((run_dir / "env.json").read_text())
    assert [(t["wave"], t["completed"]) for t in env["targets"]] == [(0, True), (0, True)]
