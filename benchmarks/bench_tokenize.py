"""How long ssm-server takes to tokenize a long text prompt, and how long it stalls the streams
decoding beside it: the tokenizer's one encode against ``HFText.encode`` (the text cut at spaces
into pieces that the Rust tokenizer encodes at once on every core), and against the pieces as
they were until 2026-12-03 (2 per CPU, ``encode_batch``), on the load generator's own prompts of
4K to 4M tokens (a text under 16K characters, ~4K tokens, is encoded whole: ``PARALLEL_CHARS``).
The stall: the largest gap of a Python thread that wakes every 1 ms while the text is tokenized
on another thread (how long the tokenizing thread held the GIL at once: a decode step, or the
event loop, waits that long). Ids must be equal.

    .venv/bin/python benchmarks/bench_tokenize.py [--preset mamba2-780m] [--min-tokens 4096]
        [--max-tokens 4194304]
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def best(fn, repeat: int) -> tuple[float, float, object]:
    """(fastest time, largest GIL stall of a 1 ms ticker thread over the runs, the result)."""
    out, times, stall = None, [], 0.0
    for _ in range(repeat):
        gaps, stop = [0.0], threading.Event()

        def tick():
            last = time.perf_counter()
            while not stop.is_set():
                time.sleep(0.001)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        th = threading.Thread(target=tick)
        th.start()
        time.sleep(0.05)
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        stop.set()
        th.join()
        stall = max(stall, max(gaps))
    return min(times), stall, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="mamba2-780m")
    ap.add_argument("--min-tokens", type=int, default=1 << 12)
    ap.add_argument("--max-tokens", type=int, default=1 << 22)
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args(argv)
    from loadgen.prompts import LocalTokenizer, PromptBuilder
    from servers import modeldir
    from servers.ssm_server.textio import HFText, cut_points

    d = modeldir.build(a.preset, REPO / ".cache" / "bench-tokenizers" / a.preset, weights=False, log=None)
    text = HFText(str(d))
    b = PromptBuilder(LocalTokenizer(d))

    def before(prompt):  # the pieces until 2026-12-03: 2 per CPU, encode_batch (offsets and all)
        bounds = [0, *cut_points(prompt, text.pieces), len(prompt)]
        pieces = [prompt[x:y] for x, y in zip(bounds, bounds[1:])]
        before_, after_ = text._around
        return before_ + [i for e in text._fast.encode_batch(pieces, add_special_tokens=False) for i in e.ids] + after_

    print(f"{a.preset}'s tokenizer, {os.cpu_count()} CPUs, cut in pieces: {text.parallel}, "
          f"{time.strftime('%Y-%m-%d')}")
    print("| prompt tokens | characters | one encode (stall) | pieces before (stall) | HFText.encode (stall) "
          "| time / before | ids equal |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    n = a.min_tokens
    while n <= a.max_tokens:
        prompt = b.build(n, 1)
        whole_s, whole_stall, whole = best(lambda: text.tok.encode(prompt), a.repeat)
        old_s, old_stall, old = best(lambda: before(prompt), a.repeat)
        cut_s, cut_stall, cut = best(lambda: text.encode(prompt), a.repeat)
        same = cut == whole == old
        print(f"| {n:,} | {len(prompt):,} | {whole_s:.3f} s ({whole_stall * 1e3:.0f} ms) | {old_s:.3f} s "
              f"({old_stall * 1e3:.0f} ms) | {cut_s:.3f} s ({cut_stall * 1e3:.0f} ms) | {cut_s / old_s:.2f}x | {same} |",
              flush=True)
        if not same:
            return 1
        n *= 4
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
