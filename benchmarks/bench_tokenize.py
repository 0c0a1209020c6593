"""How long ssm-server takes to tokenize a long text prompt: the tokenizer's one encode against
``HFText.encode`` (the text cut at spaces into pieces that the Rust tokenizer encodes at once on
every core), on the load generator's own prompts of 256K, 1M and 4M tokens. Ids must be equal.

    .venv/bin/python benchmarks/bench_tokenize.py [--preset mamba2-780m] [--max-tokens 4194304]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def best(fn, repeat: int) -> tuple[float, object]:
    out, times = None, []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="mamba2-780m")
    ap.add_argument("--max-tokens", type=int, default=1 << 22)
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args(argv)
    from loadgen.prompts import LocalTokenizer, PromptBuilder
    from servers import modeldir
    from servers.ssm_server.textio import HFText

    d = modeldir.build(a.preset, REPO / ".cache" / "bench-tokenizers" / a.preset, weights=False, log=None)
    text = HFText(str(d))
    b = PromptBuilder(LocalTokenizer(d))
    print(f"{a.preset}'s tokenizer, {os.cpu_count()} CPUs, pieces {text.pieces}, cut in pieces: {text.parallel}")
    print("| prompt tokens | characters | one encode | in pieces (HFText.encode) | ratio | ids equal |")
    print("| ---: | ---: | ---: | ---: | ---: | --- |")
    n = 1 << 18
    while n <= a.max_tokens:
        prompt = b.build(n, 1)
        whole_s, whole = best(lambda: text.tok.encode(prompt), a.repeat)
        cut_s, cut = best(lambda: text.encode(prompt), a.repeat)
        print(f"| {n:,} | {len(prompt):,} | {whole_s:.3f} s | {cut_s:.3f} s | {cut_s / whole_s:.2f}x | {cut == whole} |",
              flush=True)
        if cut != whole:
            return 1
        n *= 4
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
