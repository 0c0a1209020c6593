"""Where a decode step's time goes, against its memory floor, measured in the same run.

usage (GPU machine, repo root, mamba_ssm's Python importable):
  python3 benchmarks/gpu/bench_decode_step.py
ssm-server's native backend (Mamba2-780m, random weights, bf16). For each batch size in SIZES
(default 1,8,64): the decode graph's device time per step (replays back to back, CUDA events),
and the pipelined loop the engine runs (launch step N+1, then collect step N; host wall time per
step) — the ITL a stream sees at that batch. Against them the floor: the bytes a step must read
(weights, and each row's conv window and SSM state read and written) over the copy bandwidth
measured here. Each three times in the same run: the decoder the server runs, one that fuses
each norm into the projection after it at batches up to 8 (``mamba_gemv``; the server does
where its timing finds that faster) and the reference, norm kernels and cuBLAS
(``CTXLOAD_GEMV=cublas``). Then one profiled batch-1 replay of each: every kernel's
device time, with its share of the step and the idle time between kernels (the launch gaps a
graph leaves). Prints the tables last.
"""

from __future__ import annotations

import os
import statistics
import time

import torch

SIZES = [int(x) for x in os.environ.get("SIZES", "1,8,64").split(",")]
REPS = int(os.environ.get("REPS", "200"))


def copy_bandwidth(nbytes: int = 1 << 31) -> float:
    """Bytes per second of a device-to-device copy (read + write counted)."""
    a = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(20):
        b.copy_(a)
    e.record()
    e.synchronize()
    return nbytes * 20 / (s.elapsed_time(e) / 1e3)


def replay_us(graph, reps: int = REPS) -> float:
    graph.replay()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(reps):
        graph.replay()
    e.record()
    e.synchronize()
    return s.elapsed_time(e) / reps * 1e3


def pipelined_us(b, n: int, reps: int = REPS) -> float:
    """The engine's loop: launch step N+1 (input tokens fed on the device), collect step N."""
    from servers.ssm_server.sampling import SamplingParams

    slots = list(range(n))
    g, ban = [SamplingParams(temperature=0.0)] * n, [[]] * n
    h = b.decode_launch(slots, [1] * n, g, ban)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        nxt = b.decode_launch(slots, [-1] * n, g, ban)
        b.decode_collect(h)
        h = nxt
        times.append(time.perf_counter() - t)
    b.decode_collect(h)
    return statistics.median(times) * 1e6


def kernel_profile(graph) -> tuple[list[tuple[str, int, float]], float, float]:
    """[(kernel, calls, device µs)] of one replay, its span (first start to last end) in µs and
    the device time of its kernels, from torch.profiler (CUPTI traces a graph's kernels)."""
    from torch.profiler import ProfilerActivity, profile

    graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA" and e.device_time > 0
               and "Memcpy" not in e.name and "Memset" not in e.name]
    by: dict[str, list[float]] = {}
    for e in kernels:
        by.setdefault(e.name, []).append(e.device_time)
    rows = sorted(((k, len(v), sum(v)) for k, v in by.items()), key=lambda r: -r[2])
    if not kernels:
        return rows, 0.0, 0.0
    span = max(e.time_range.end for e in kernels) - min(e.time_range.start for e in kernels)
    return rows, float(span), sum(r[2] for r in rows)


def short(name: str) -> str:
    name = name.split("(")[0]
    return name if len(name) <= 60 else name[:57] + "..."


def main() -> None:
    from servers.ssm_server.backend_mamba import MambaBackend
    from servers.ssm_server.config import ServerConfig
    from servers.ssm_server.mamba_decode import NativeDecoder

    b = MambaBackend(ServerConfig(model="mamba2-780m", device="cuda", dtype="bfloat16", random_weights=True,
                                  max_num_seqs=max(SIZES), prefill_chunk_size=256))
    bw = copy_bandwidth()
    weights = sum(p.numel() * p.element_size() for p in b.model.parameters())
    state = b.state_bytes
    served = b.decoder
    forced = NativeDecoder(b, b.num_slots, fused=True)
    plain = NativeDecoder(b, b.num_slots, fused=False)
    for dec in (forced, plain):
        dec.capture_all()
    decoders = {"served": served, "norms fused (up to 8 rows)": forced, "norm kernels + cuBLAS": plain}
    print("served: fuses at batch sizes", [n for n in served.set.sizes if served.fuses(n)],
          "; (in_proj, out_proj) blocks of the forced one:", forced.gemv_config, flush=True)
    for n in (1, 3):  # the same step from the same (zero) states, fused and not
        a, c = forced.logits(list(range(n)), [5] * n), plain.logits(list(range(n, 2 * n)), [5] * n)
        print(f"batch {n}: fused vs norm kernels + cuBLAS, max |logit diff| / logit scale "
              f"{((a - c).abs().max() / c.abs().max()).item():.4f}", flush=True)
    print(f"# {torch.cuda.get_device_name()}, copy bandwidth {bw / 1e12:.2f} TB/s, weights {weights / 1e9:.2f} GB, "
          f"state {state / 1e6:.2f} MB a sequence", flush=True)
    rows = []
    for n in SIZES:
        floor = (weights + 2 * n * state) / bw * 1e6
        for name, dec in decoders.items():
            graph, _ = dec.set.graphs[(dec.set.bucket(n), True)]
            b.decoder = dec
            g_us, p_us = replay_us(graph), pipelined_us(b, n)
            rows.append((n, name, g_us, p_us, floor))
            print(f"batch {n}, {name}: graph {g_us:.1f} µs, pipelined {p_us:.1f} µs, floor {floor:.1f} µs", flush=True)
    b.decoder = served
    profiles = {name: kernel_profile(dec.set.graphs[(dec.set.bucket(1), True)][0]) for name, dec in decoders.items()}
    print(f"\ndecode step, Mamba2-780m bf16 random weights, {torch.cuda.get_device_name()}, {time.strftime('%Y-%m-%d')}")
    print("| batch | decoder | graph replay (device) | pipelined loop (host, = ITL) | floor: bytes / copy bandwidth "
          "| graph / floor | pipelined / reference's |")
    print("|---|---|---|---|---|---|---|")
    ref = {n: p_us for n, name, _, p_us, _ in rows if name == "norm kernels + cuBLAS"}
    for n, name, g_us, p_us, floor in rows:
        print(f"| {n} | {name} | {g_us:.0f} µs | {p_us:.0f} µs | {floor:.0f} µs | {g_us / floor:.2f}× "
              f"| {p_us / ref[n]:.2f}× |")
    for name, (kernels, span, busy) in profiles.items():
        if not kernels:
            print(f"\n{name}: the profiler saw no kernel inside the graph replay")
            continue
        print(f"\n{name}, batch 1, one replay: span {span:.0f} µs, kernels {busy:.0f} µs, idle between them "
              f"{span - busy:.0f} µs ({(span - busy) / span:.0%}), {sum(k[1] for k in kernels)} kernels\n")
        print("| kernel | calls | µs | µs each | share of kernel time |")
        print("|---|---|---|---|---|")
        for kname, calls, us in kernels[:10]:
            print(f"| {short(kname)} | {calls} | {us:.0f} | {us / calls:.1f} | {us / busy:.0%} |")


if __name__ == "__main__":
    main()
