"""Trim a run directory's metrics.jsonl to the metrics the analysis reads, for a test fixture.

    python benchmarks/gpu/trim_run.py RUN_DIR OUT_DIR

Copies scenario.yaml, env.json, requests.jsonl, max_context.jsonl, operators.jsonl and the servers' logs as
they are; every scrape of metrics.jsonl is kept (with its time, target and stage tags), but
only its samples named below. A vLLM /metrics page is ~10 KB of histograms per scrape, and
the analysis reads a handful of gauges.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

KEEP = {
    "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_FREE", "DCGM_FI_DEV_POWER_USAGE",
    "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "ctxload:gpu_process_memory_used_bytes",
    "ssm:device_memory_allocated_bytes", "ssm:device_memory_peak_allocated_bytes",
    "ssm:state_slots_total", "ssm:state_slots_used", "ssm:state_bytes_per_sequence",
    "ssm:kv_cache_bytes_used", "ssm:num_requests_running", "ssm:engine_info",
    "ssm:cache_bytes_peak", "ssm:weight_bytes",
    "vllm:kv_cache_usage_perc", "vllm:cache_config_info", "vllm:num_requests_running",
    "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total",
    "process_resident_memory_bytes",
}


def trim(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("scenario.yaml", "env.json", "requests.jsonl", "max_context.jsonl", "operators.jsonl"):
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
    if (src / "servers").is_dir():
        shutil.copytree(src / "servers", dst / "servers", dirs_exist_ok=True)
    with open(src / "metrics.jsonl") as f, open(dst / "metrics.jsonl", "w") as out:
        for line in f:
            rec = json.loads(line)
            rec["samples"] = [s for s in rec.get("samples") or [] if s.get("name") in KEEP]
            out.write(json.dumps(rec, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    trim(Path(sys.argv[1]), Path(sys.argv[2]))
