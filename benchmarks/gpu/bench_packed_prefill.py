"""Several short prompts prefilled in one packed forward against one forward each, same run.

usage (GPU machine, repo root, mamba_ssm's Python importable):
  python3 benchmarks/gpu/bench_packed_prefill.py
ssm-server's native backend (Mamba2-780m, random weights, bf16): N fresh prompts of LEN tokens
(a burst of arrivals), prefilled (a) one eager ``prefill_chunk`` each — what the engine did
before — (b) by eager ``prefill_packed``, as many whole prompts per call as fit in the engine's
budget (``--prefill-chunk-size``, 32768 here), and (c) the same packs replayed from the prefill
graphs where one holds them (up to 64 prompts, 8,192 tokens; eager beyond) — the server's
graphs, whose rows come in buckets of 1, 8 and 64 prompts, and (d) graphs that each hold 64
prompts (what the server captured before: every row costs its final state). Host wall time
until the device is done (the launches are part of a short prompt's cost), median of 5 after a
warm-up. Then a long prompt's later chunks (CONTINUED lengths, from a slot's state): eager
against a replay of a continuation graph (padded to its bucket). Prints the tables last.
"""

from __future__ import annotations

import os
import statistics
import time

import torch

BUDGET = int(os.environ.get("BUDGET", "32768"))
CASES = [tuple(map(int, c.split("x"))) for c in os.environ["CASES"].split(",")] if os.environ.get("CASES") \
    else [(n, length) for length in (256, 1024, 4096) for n in (1, 4, 16, 64)]
"""(prompts, tokens each) of every case; ``CASES=1x256,4x1024`` picks some."""
CONTINUED = [int(x) for x in os.environ.get("CONTINUED", "1000,4096,8192").split(",") if x]
"""Lengths of a long prompt's later chunk (a continuation of its slot's state), eager against
the continuation graphs; ``CONTINUED=`` skips them."""


def timed(fn, reps: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def packs(prompts: list[list[int]]) -> list[list[int]]:
    """Indices of the prompts each call takes: whole prompts while they fit in BUDGET."""
    out, cur, total = [], [], 0
    for i, p in enumerate(prompts):
        if cur and total + len(p) > BUDGET:
            out.append(cur)
            cur, total = [], 0
        cur.append(i)
        total += len(p)
    return out + [cur]


def main() -> None:
    from servers.ssm_server.backend_mamba import MambaBackend
    from servers.ssm_server.config import ServerConfig

    b = MambaBackend(ServerConfig(model="mamba2-780m", device="cuda", dtype="bfloat16", random_weights=True,
                                  max_num_seqs=64, prefill_chunk_size=BUDGET))
    from servers.ssm_server.mamba_prefill import PrefillGraphs

    graphs = b.prefill_graphs
    wide = PrefillGraphs(b, BUDGET, rows=(65,))
    wide.capture_all()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n, length in CASES:
        prompts = [torch.randint(1, b.vocab_size, (length,), generator=gen).tolist() for _ in range(n)]

        def each():
            for s, p in enumerate(prompts):
                b.prefill_chunk(s, p, 0)

        def packed():
            for idx in packs(prompts):
                b.prefill_packed(idx, [prompts[i] for i in idx])

        b.prefill_graphs = None
        t_each, t_packed = timed(each), timed(packed)
        b.prefill_graphs = graphs
        t_graph = timed(packed)
        b.prefill_graphs = wide
        t_wide = timed(packed)
        b.prefill_graphs = graphs
        rows.append((n, length, t_each, t_packed, t_graph, t_wide))
        print(f"{n} x {length}: each {t_each * 1e3:.1f} ms, packed {t_packed * 1e3:.1f} ms, "
              f"graphs {t_graph * 1e3:.1f} ms, 64-prompt graphs {t_wide * 1e3:.1f} ms", flush=True)
    cont = []
    if CONTINUED:
        b.prefill_chunk(0, torch.randint(1, b.vocab_size, (4096,), generator=gen).tolist(), 0)
    for length in CONTINUED:
        chunk = torch.randint(1, b.vocab_size, (length,), generator=gen).tolist()
        b.prefill_graphs = None
        t_eager = timed(lambda: b.prefill_chunk(0, chunk, 4096))
        b.prefill_graphs = graphs
        key = graphs.continued_bucket(length)
        t_graph = timed(lambda: b.prefill_chunk(0, chunk, 4096))
        cont.append((length, key[0] if key else None, t_eager, t_graph))
        print(f"continued {length}: eager {t_eager * 1e3:.1f} ms, graph {t_graph * 1e3:.1f} ms ({key})", flush=True)
    name = torch.cuda.get_device_name()
    print(f"\npacked prefill, Mamba2-780m bf16 random weights, {name}, budget {BUDGET} tokens per call, "
          f"{time.strftime('%Y-%m-%d')}")
    print("| prompts | tokens each | one forward each | packed | packed / each | packed, graphs | graphs / each "
          "| 64-prompt graphs | graphs / 64-prompt graphs |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, length, te, tp, tg, tw in rows:
        print(f"| {n} | {length} | {te * 1e3:.1f} ms | {tp * 1e3:.1f} ms | {tp / te:.2f}× "
              f"| {tg * 1e3:.1f} ms | {tg / te:.2f}× | {tw * 1e3:.1f} ms | {tg / tw:.2f}× |")
    if cont:
        print("\na long prompt's later chunk, from its slot's state")
        print("| chunk tokens | graph bucket | eager | graph | graph / eager |")
        print("|---|---|---|---|---|")
        for length, t, te, tg in cont:
            print(f"| {length} | {t or 'none (eager)'} | {te * 1e3:.1f} ms | {tg * 1e3:.1f} ms | {tg / te:.2f}× |")


if __name__ == "__main__":
    main()
