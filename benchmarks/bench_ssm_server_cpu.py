"""ssm-server's own overhead per output token on CPU, over a bare model step, same run.

usage: python benchmarks/bench_ssm_server_cpu.py [PRESET] [TOKENS] [ROUNDS]
Reference: the backend's decode step called directly (batch 1, the tiny model). Served: the
median gap between streamed tokens of one request to the real server on loopback. The three
alternate for ROUNDS rounds (default 3), and each column keeps its fastest round's median: on a
shared 2-core machine a single pair is mostly noise. The last column is a second server started
with ``--profile-dir`` and never told to profile: a profiler that is ready but idle must cost
nothing (a scenario's ``profile:`` starts servers so).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
import urllib.request

import torch

from servers.process import ManagedServer, free_port
from servers.ssm_server.backend_hf import HFBackend
from servers.ssm_server.config import ServerConfig
from tests.conftest import build_tiny


def bare_step_s(model_dir: str, n: int) -> float:
    b = HFBackend(ServerConfig(model=model_dir, max_num_seqs=1))
    b.prefill_chunk(0, list(range(1, 65)), 0)
    gaps = []
    with torch.inference_mode():
        for i in range(n):
            t = time.perf_counter()
            logits = b.decode([0], [i % 100 + 1], [64 + i])
            int(logits.argmax())
            gaps.append(time.perf_counter() - t)
    return statistics.median(gaps)


def served_itl_s(url: str, n: int) -> float:
    body = json.dumps({"prompt": list(range(1, 65)), "max_tokens": n, "ignore_eos": True,
                       "stream": True, "temperature": 0}).encode()
    stamps = []
    req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        for line in r:
            if line.startswith(b"data: {") and b'"finish_reason":null' in line:
                stamps.append(time.perf_counter())
    return statistics.median(b - a for a, b in zip(stamps, stamps[1:]))


def main():
    preset = sys.argv[1] if len(sys.argv) > 1 else "tiny-mamba2"
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    d = str(build_tiny(preset))
    port, port_p = free_port(), free_port()
    cmd = [sys.executable, "-m", "servers.ssm_server", "--model", d, "--port", str(port)]
    cmd_p = [sys.executable, "-m", "servers.ssm_server", "--model", d, "--port", str(port_p),
             "--profile-dir", tempfile.mkdtemp(prefix="bench-prof-")]
    bares, serveds, readies = [], [], []
    with ManagedServer("bench-cpu", cmd, port, startup_timeout_s=120) as srv, \
            ManagedServer("bench-cpu-prof", cmd_p, port_p, startup_timeout_s=120) as srv_p:
        served_itl_s(srv.url, 20)  # warm-up
        served_itl_s(srv_p.url, 20)
        for r in range(rounds):
            bares.append(bare_step_s(d, n))
            serveds.append(served_itl_s(srv.url, n))
            readies.append(served_itl_s(srv_p.url, n))
            print(f"round {r + 1}/{rounds}: bare {bares[-1] * 1e3:.2f} ms, served {serveds[-1] * 1e3:.2f} ms, "
                  f"profiler ready {readies[-1] * 1e3:.2f} ms", file=sys.stderr, flush=True)
    bare, served, ready = min(bares), min(serveds), min(readies)
    print("| model | bare step (median) | served ITL (median) | overhead per token | ratio "
          "| served, --profile-dir idle | vs served |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {preset} | {bare * 1e3:.2f} ms | {served * 1e3:.2f} ms | {(served - bare) * 1e3:.2f} ms "
          f"| {served / bare:.2f}x | {ready * 1e3:.2f} ms | {ready / served:.2f}x |")


if __name__ == "__main__":
    main()
