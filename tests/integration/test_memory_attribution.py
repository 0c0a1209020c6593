"""Memory belongs to the target that used it: two servers of different size up together.

`keep_targets_resident: true` keeps a tiny Llama and a Mamba2-130m (random weights, bf16) both
serving for the whole run, each with its own sweep. Every scrape says which target's stage was
running, so each target's memory curve is made of its own server's readings taken during its
own stages only — recomputed here from metrics.jsonl and compared with the analysis.
"""

from __future__ import annotations

import json

import pytest

from analysis import memory
from analysis.records import load_run
from conftest import run_scenario

LENGTHS = [64, 128]


@pytest.mark.slow
def test_co_resident_targets_each_get_their_own_memory(tmp_path, tiny_models):
    scenario = {
        "name": "two-resident", "keep_targets_resident": True,
        "targets": [{"name": "small", "serve": {"engine": "ssm-server", "preset": "tiny-llama"}},
                    {"name": "large", "serve": {"engine": "ssm-server", "preset": "mamba2-130m"}}],
        "output": {"max_tokens": 4},
        "load": {"kind": "context_sweep", "prompt_tokens": LENGTHS, "requests": 2, "warmup_requests": 1},
        "metrics": {"scrape_interval_s": 0.5}, "request_timeout_s": 120}
    run_dir = run_scenario(scenario, tmp_path, "resident")
    scrapes = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    requests = [json.loads(x) for x in (run_dir / "requests.jsonl").read_text().splitlines()]

    # both servers were up together: each was scraped while the other one's stages ran
    for t, other in (("small", "large"), ("large", "small")):
        assert any(s["target"] == t and s["ok"] and s["stage_target"] == other for s in scrapes), t
        assert all(s["resident"] == ["large", "small"] for s in scrapes if s["stage_target"]), t

    curves = {c.target: c for c in memory.memory_curves(load_run(run_dir))}
    assert set(curves) == {"small", "large"}
    def value(s, name):
        return next(smp["value"] for smp in s["samples"] if smp["name"] == name)

    for t, c in curves.items():
        # on a CPU: the server's own count, weights + the most KV and state held at once
        assert c.source == "cache" and c.lengths == LENGTHS
        for n, peak in zip(c.lengths, c.peak_bytes):
            stages = {r["stage_index"] for r in requests if r["target"] == t
                      and r["prompt_tokens_requested"] == n and r["stage"] != "warmup"}
            own = [value(s, memory.WEIGHT_BYTES) + value(s, memory.CACHE_PEAK) for s in scrapes
                   if s["ok"] and s["target"] == t and s["stage_target"] == t and s["stage_index"] in stages]
            assert own and peak == max(own), (t, n)
    # and neither carries the other's: 130M parameters against a tiny Llama's ~0.4M
    assert min(curves["large"].peak_bytes) > 100 * max(curves["small"].peak_bytes)
    # 124M parameters in bf16 against a few hundred thousand: the curves are far apart
    assert min(curves["large"].peak_bytes) > max(curves["small"].peak_bytes) + 150e6
