"""Check the GPU exporter's readings against nvidia-smi on a real GPU (under 60 s).

Run from the repository root on a GPU host (python3, torch, nvidia-ml-py, prometheus-client;
no network):  ``python3 benchmarks/gpu/gpu_exporter_check.py [--gib 4]``

It starts ``python3 -m servers.gpu_exporter`` on loopback, then for GPU 0:
1. idle: memory used/free/total against ``nvidia-smi --query-gpu``;
2. after allocating ``--gib`` GiB with torch: the same, plus the growth of used memory (both
   sides should grow by the allocation) and this process's row in the per-process memory;
3. under a matmul loop: utilisation, power, and energy growth against power × time.
It prints one table (exporter, nvidia-smi, difference, tolerance, verdict) and exits 1 if a
check fails, 0 otherwise.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SMI_FIELDS = ["memory.used", "memory.free", "memory.total", "utilization.gpu", "power.draw"]
_LINE = re.compile(r'^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)$')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(url: str) -> list[tuple[str, dict, float]]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if m and not line.startswith("#"):
            out.append((m.group(1), dict(_LABEL.findall(m.group(2) or "")), float(m.group(3))))
    return out


def gpu0(samples, name):
    vals = [v for n, lab, v in samples if n == name and lab.get("gpu") == "0"]
    return vals[0] if vals else None


def smi(gpu: int = 0) -> dict[str, float | None]:
    out = subprocess.run(["nvidia-smi", f"--id={gpu}", "--query-gpu=" + ",".join(SMI_FIELDS),
                          "--format=csv,noheader,nounits"], capture_output=True, text=True,
                         timeout=20, check=True).stdout.strip().splitlines()[0]
    vals = {}
    for k, v in zip(SMI_FIELDS, out.split(",")):
        try:
            vals[k] = float(v)
        except ValueError:  # "[N/A]"
            vals[k] = None
    return vals


def smi_process_mib(pid: int) -> float | None:
    r = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                        "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20)
    for line in r.stdout.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0] == str(pid):
            return float(parts[1])
    return None


class Table:
    def __init__(self):
        self.rows, self.failed = [], 0

    def check(self, what, ours, theirs, tol, *, rel=False, note=""):
        if ours is None or theirs is None:
            verdict = "n/a" if theirs is None else "FAIL"
            diff = None
        else:
            diff = ours - theirs
            limit = tol * abs(theirs) if rel else tol
            verdict = "ok" if abs(diff) <= limit else "FAIL"
        self.failed += verdict == "FAIL"
        tol_s = f"{tol:.0%}" if rel else f"±{tol:g}"
        self.rows.append((what, ours, theirs, diff, tol_s, verdict, note))

    def print(self):
        f = lambda v: "-" if v is None else f"{v:,.1f}"  # noqa: E731
        print(f"| {'check':<34} | {'exporter':>11} | {'nvidia-smi':>11} | {'diff':>9} | tol   | verdict | note")
        print("|" + "-" * 36 + "|" + "-" * 13 + "|" + "-" * 13 + "|" + "-" * 11 + "|-------|---------|-----")
        for what, a, b, d, tol, verdict, note in self.rows:
            print(f"| {what:<34} | {f(a):>11} | {f(b):>11} | {f(d):>9} | {tol:<5} | {verdict:<7} | {note}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=4.0, help="GiB to allocate (default 4)")
    ap.add_argument("--load-s", type=float, default=5.0, help="seconds of matmul load")
    a = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu_exporter_check: no CUDA GPU visible to torch; run it on a GPU host", file=sys.stderr)
        return 2
    t_start = time.monotonic()
    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    exporter = subprocess.Popen([sys.executable, "-m", "servers.gpu_exporter", "--port", str(port)],
                                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    url = f"http://127.0.0.1:{port}/metrics"
    t = Table()
    try:
        for _ in range(100):
            try:
                scrape(url)
                break
            except OSError:
                if exporter.poll() is not None:
                    print(exporter.stdout.read())
                    return 1
                time.sleep(0.1)
        s = scrape(url)
        up = [v for n, _, v in s if n == "ctxload:gpu_exporter_up"]
        print(f"exporter up={up} gpus={[v for n, _, v in s if n == 'ctxload:gpu_exporter_gpus']}")
        labels = next((lab for n, lab, _ in s if n == "DCGM_FI_DEV_FB_USED" and lab.get("gpu") == "0"), {})
        print(f"labels of GPU 0: {labels}")
        t.check("exporter up", up[0] if up else None, 1.0, 0)

        def memory_rows(stage, ours, theirs):
            for name, field in [("FB_USED", "memory.used"), ("FB_FREE", "memory.free"),
                                ("FB_TOTAL", "memory.total")]:
                # both sides read at slightly different instants: allow 64 MiB of drift
                t.check(f"{stage}: {name} MiB", gpu0(ours, f"DCGM_FI_DEV_{name}"), theirs[field], 64)

        idle_smi, idle = smi(), scrape(url)
        memory_rows("idle", idle, idle_smi)

        torch.cuda.init()
        block = torch.empty(int(a.gib * (1 << 30)), dtype=torch.uint8, device="cuda:0")
        block.fill_(1)
        torch.cuda.synchronize()
        time.sleep(0.5)
        alloc_smi, alloc = smi(), scrape(url)
        memory_rows(f"+{a.gib:g} GiB", alloc, alloc_smi)
        ours_growth = (gpu0(alloc, "DCGM_FI_DEV_FB_USED") or 0) - (gpu0(idle, "DCGM_FI_DEV_FB_USED") or 0)
        t.check("FB_USED growth MiB", ours_growth, alloc_smi["memory.used"] - idle_smi["memory.used"], 64,
                note="CUDA context + allocation")
        t.check("FB_USED growth ≥ allocation MiB", min(ours_growth, a.gib * 1024), a.gib * 1024, 1)
        mine = [v for n, lab, v in alloc if n == "ctxload:gpu_process_memory_used_bytes"
                and lab.get("pid") == str(os.getpid())]
        smi_mine = smi_process_mib(os.getpid())
        t.check("this process MiB", mine[0] / (1 << 20) if mine else None, smi_mine, 64,
                note="n/a: nvidia-smi lists no processes (container PID namespace)" if smi_mine is None else "")

        x = torch.randn(8192, 8192, device="cuda:0", dtype=torch.bfloat16)
        e0, t0 = gpu0(scrape(url), "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"), time.monotonic()
        powers, utils, smi_powers, smi_utils = [], [], [], []
        while time.monotonic() - t0 < a.load_s:
            for _ in range(20):
                x = (x @ x).clamp_(-1, 1)
            torch.cuda.synchronize()
            s, sm = scrape(url), smi()
            powers.append(gpu0(s, "DCGM_FI_DEV_POWER_USAGE"))
            utils.append(gpu0(s, "DCGM_FI_DEV_GPU_UTIL"))
            smi_powers.append(sm["power.draw"])
            smi_utils.append(sm["utilization.gpu"])
        e1, t1 = gpu0(scrape(url), "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"), time.monotonic()
        mean = lambda xs: sum(xs) / len(xs) if xs and None not in xs else None  # noqa: E731
        t.check("load: GPU_UTIL % (mean)", mean(utils), mean(smi_utils), 15)
        t.check("load: POWER_USAGE W (mean)", mean(powers), mean(smi_powers), 0.15, rel=True)
        if e0 is not None and e1 is not None:
            t.check("load: energy/time W", (e1 - e0) / 1000 / (t1 - t0), mean(smi_powers), 0.25,
                    rel=True, note="energy counter growth ÷ wall time")
        else:
            t.check("load: energy/time W", None, mean(smi_powers), 0.25, rel=True)
        del block, x
    finally:
        exporter.terminate()
        exporter.wait(10)
    print(f"\nGPU: {labels.get('modelName')}  date: {time.strftime('%Y-%m-%d %H:%M %Z')}  "
          f"took {time.monotonic() - t_start:.1f} s\n")
    t.print()
    print(f"\n{t.failed} check(s) failed" if t.failed else "\nall checks passed")
    return 1 if t.failed else 0


if __name__ == "__main__":
    sys.exit(main())
