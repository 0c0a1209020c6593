"""Issue 3's table on one GPU: ssm-server (Mamba2-780m, random weights, bf16) against the raw
forward of the same model measured in the same run.

usage (on the GPU machine, repo root, sdists in .whl/):  python3 benchmarks/gpu/bench_ssm_server_gpu.py
Prints JSON lines as it goes and a table last. Logs of the servers go to $OUT (or /tmp).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUT = Path(os.environ.get("OUT", "/tmp"))
SITE = Path("/tmp/site")
LENS = [int(x) for x in os.environ.get("LENS", "32768,131072,262144").split(",")]
LONG = [int(x) for x in os.environ.get("LONG", "65536,262144,524288,1048576").split(",")]
CHUNK = int(os.environ.get("CHUNK", "16384"))
VOCAB = 50288


def emit(**rec):
    print(json.dumps(rec), flush=True)
    with open(OUT / "bench.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")


def setup_mamba_ssm() -> bool:
    """Pure-Python mamba_ssm (its Triton kernels) from the sdist in .whl/, if present."""
    if not (SITE / "mamba_ssm").exists():
        sd = sorted((REPO / ".whl").glob("mamba_ssm-*.tar.gz"))
        if not sd:
            return False
        SITE.mkdir(parents=True, exist_ok=True)
        with tarfile.open(sd[0]) as t:
            members = [m for m in t.getmembers() if "/mamba_ssm/" in m.name]
            for m in members:
                m.name = m.name.split("/", 1)[1]
            t.extractall(SITE, members=members)
    sys.path.insert(0, str(SITE))
    sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
    return True


def raw_reference(lens):
    import torch

    out = {}
    try:
        from mamba_ssm.models.config_mamba import MambaConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

        cfg = MambaConfig(d_model=1536, n_layer=48, vocab_size=VOCAB, rms_norm=True, residual_in_fp32=True,
                          ssm_cfg={"layer": "Mamba2", "use_mem_eff_path": False}, fused_add_norm=True,
                          pad_vocab_size_multiple=16)
        model = MambaLMHeadModel(cfg, device="cuda", dtype=torch.bfloat16).eval()
        for n in lens:
            ids = torch.randint(0, VOCAB, (1, n), device="cuda")
            with torch.inference_mode():
                model(ids, num_last_tokens=1)
                torch.cuda.synchronize()
                ts = []
                for _ in range(2):
                    t = time.perf_counter()
                    model(ids, num_last_tokens=1)
                    torch.cuda.synchronize()
                    ts.append(time.perf_counter() - t)
            out[n] = min(ts)
            emit(what="raw_mamba_ssm_forward", len=n, s=round(out[n], 4))
        del model
    except Exception as e:
        emit(what="raw_mamba_ssm_forward", error=f"{type(e).__name__}: {str(e)[:300]}")
    torch.cuda.empty_cache()
    return out


def correctness():
    """Graph decode and chunked prefill against one full forward of the served model."""
    import torch
    from servers.ssm_server.backend_hf import HFBackend
    from servers.ssm_server.config import ServerConfig

    b = HFBackend(ServerConfig(model="mamba2-780m", device="cuda", dtype="bfloat16", random_weights=True,
                               max_num_seqs=8))
    ids = torch.randint(0, VOCAB, (1, 4096 + 8), device="cuda")
    with torch.inference_mode():
        full = b.model(input_ids=ids, use_cache=False).logits[0].float()
    for s in range(0, 4096, 1000):
        last = b.prefill_chunk(3, ids[0, s:min(s + 1000, 4096)].tolist(), s).float()
    d_pre = (last - full[4095]).abs().max().item()
    one = b.prefill_chunk(4, ids[0, :4096].tolist(), 0).float()  # single shot, same backend
    d_one = (last - one).abs().max().item()
    for t in b.conv_pool + [r for r in b.rec_pool if r is not None]:
        t[5].copy_(t[3])  # slot 5 = copy of slot 3: graph decode on 3, eager on 5
    d_dec = d_ge = 0.0
    for t in range(8):
        p = 4096 + t
        step = b.decode([3], [int(ids[0, p])], [p])[0].float()
        eager = b.decode_eager([5], [int(ids[0, p])])[0].float()
        d_dec = max(d_dec, (step - full[p]).abs().max().item())
        d_ge = max(d_ge, (step - eager).abs().max().item())
    scale = full.abs().max().item()
    emit(what="correctness", chunked_vs_full_forward=d_pre, chunked_vs_single_shot=d_one,
         graph_decode_vs_full=d_dec, graph_vs_eager_decode=d_ge,
         logit_scale=scale, graphs=b.graphs is not None and not b.graphs.failed)
    del b
    torch.cuda.empty_cache()
    return d_one, d_ge, scale


async def stream(session, url, ids, max_tokens):
    body = {"prompt": ids, "max_tokens": max_tokens, "ignore_eos": True, "stream": True, "temperature": 0}
    t0 = time.perf_counter()
    stamps = []
    async with session.post(url + "/v1/completions", json=body) as r:
        assert r.status == 200, await r.text()
        async for line in r.content:
            if line.startswith(b'data: {"error"'):
                raise RuntimeError(line.decode()[:300])
            if line.startswith(b"data: {") and b'"text":""' not in line:
                stamps.append(time.perf_counter())
    return t0, stamps


def start_server(port, *extra):
    from servers.process import ManagedServer

    env = {"PYTHONPATH": ":".join(x for x in (str(SITE), str(REPO), os.environ.get("PYTHONPATH", "")) if x), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-c", "import sys,types;sys.modules.setdefault('selective_scan_cuda',"
           "types.ModuleType('selective_scan_cuda'));from servers.ssm_server.cli import run_from_argv;"
           "sys.exit(run_from_argv(sys.argv[1:]))",
           "--model", "mamba2-780m", "--random-weights", "--device", "cuda", "--dtype", "bfloat16",
           "--port", str(port), "--prefill-chunk-size", str(CHUNK), *extra]
    return ManagedServer(f"ssm-gpu-{port}", cmd, port, log_path=OUT / f"server-{port}.log",
                         env=env, startup_timeout_s=300)


def mem(url):
    import urllib.request

    text = urllib.request.urlopen(url + "/metrics").read().decode()
    for line in text.splitlines():
        if line.startswith("ssm:device_memory_reserved_bytes"):
            return float(line.split()[-1])
    return None


async def served(url):
    import aiohttp
    import random

    res = {}
    rnd = random.Random(0)
    toks = lambda n: [rnd.randrange(1, VOCAB) for _ in range(n)]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
        await stream(s, url, toks(1000), 4)  # warm up
        await asyncio.gather(*(stream(s, url, toks(200), 4) for _ in range(64)))  # captures
        for n in LENS:
            t0, st = await stream(s, url, toks(n), 2)
            res[("ttft", n)] = st[0] - t0
            emit(what="served_ttft", len=n, s=round(st[0] - t0, 4))
        t0, st = await stream(s, url, toks(512), 300)
        gaps = [b - a for a, b in zip(st, st[1:])]
        res["itl1"] = statistics.median(gaps)
        emit(what="decode_b1", median_itl_ms=round(res["itl1"] * 1e3, 3), p90_ms=round(sorted(gaps)[int(.9 * len(gaps))] * 1e3, 3))
        t = time.perf_counter()
        outs = await asyncio.gather(*(stream(s, url, toks(512), 512) for _ in range(64)))
        first = max(o[1][0] for o in outs)
        last = max(o[1][-1] for o in outs)
        n_after = sum(sum(1 for x in o[1] if x > first) for o in outs)
        res["tps64"] = n_after / (last - first)
        res["tps64_e2e"] = sum(len(o[1]) for o in outs) / (last - t)
        emit(what="decode_b64", steady_tok_s=round(res["tps64"]), e2e_tok_s=round(res["tps64_e2e"]))
    return res


async def longest(url):
    import aiohttp
    import random

    rnd = random.Random(1)
    peaks = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as s:
        for n in LONG:
            try:
                t0, st = await stream(s, url, [rnd.randrange(1, VOCAB) for _ in range(n)], 2)
                peaks[n] = mem(url)
                emit(what="long_prompt", len=n, ttft_s=round(st[0] - t0, 3), peak_bytes=peaks[n])
            except Exception as e:
                emit(what="long_prompt", len=n, error=f"{type(e).__name__}: {str(e)[:300]}")
                break
    return peaks


def main():
    from servers.process import free_port

    have = setup_mamba_ssm()
    import torch

    emit(what="env", gpu=torch.cuda.get_device_name(), torch=torch.__version__, mamba_ssm_triton=have)
    d_pre, d_dec, scale = correctness()
    raw = raw_reference(LENS)
    port = free_port()
    with start_server(port, "--max-num-seqs", "64") as srv:
        res = asyncio.run(served(srv.url))
    port = free_port()
    with start_server(port, "--max-num-seqs", "4", "--gpu-memory-budget", "24GiB") as srv:
        peaks = asyncio.run(longest(srv.url))
    rows = [("figure", "measured", "reference (same run)", "ratio", "target")]
    for n in LENS:
        r = raw.get(n)
        rows.append((f"served TTFT {n // 1024}K", f"{res[('ttft', n)]:.3f} s",
                     f"{r:.3f} s raw mamba_ssm forward" if r else "n/a",
                     f"{res[('ttft', n)] / r:.2f}x" if r else "n/a", "<= 1.10x"))
    rows.append(("batch-1 decode median ITL", f"{res['itl1'] * 1e3:.2f} ms", "3.9 ms (PAPER, mamba_ssm generate+graphs)",
                 f"{res['itl1'] * 1e3 / 3.9:.2f}x", "<= 1.5 ms"))
    rows.append(("64 streams output tok/s", f"{res['tps64']:.0f} (e2e {res['tps64_e2e']:.0f})",
                 "8,900 (PAPER, generate+graphs b64)", f"{res['tps64'] / 8900:.2f}x", ">= 20,000"))
    ok = [n for n, p in peaks.items() if p]
    if ok:
        base = peaks[ok[0]]
        flat = max(abs(peaks[n] / base - 1) for n in ok)
        rows.append(("longest prompt @24GiB", f"{max(ok):,} tokens", f"peak {base / 2**30:.2f} GiB at {ok[0]:,}",
                     f"peak drift {flat * 100:.1f}%", ">= 1,048,576, flat +-10%"))
    rows.append(("max |logit diff| bf16", f"chunked vs one-shot prefill {d_pre:.3g}; graph vs eager decode {d_dec:.3g}", f"max |logit| {scale:.3g}", "", "close"))
    print("\n| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]))
    for r in rows[1:]:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
