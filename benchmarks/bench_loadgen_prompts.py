"""How long prompt synthesis takes, up to 1,048,576 tokens (the target: under 5 s).

    .venv/bin/python benchmarks/bench_loadgen_prompts.py [--preset tiny-llama] [--verify]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny-llama")
    ap.add_argument("--verify", action="store_true", help="also count each prompt's tokens (slow at 1M)")
    a = ap.parse_args(argv)
    from loadgen.prompts import LocalTokenizer, PromptBuilder
    from servers import modeldir

    d = modeldir.build(a.preset, REPO / ".cache" / "test-models" / a.preset, log=None)
    t0 = time.perf_counter()
    b = PromptBuilder(LocalTokenizer(d))
    print(f"tokenizer of {a.preset} loaded and checked in {time.perf_counter() - t0:.2f} s "
          f"({len(b.vocab)} single-token words, exact by construction: {b.exact})")
    print("| tokens | first build (s) | cached build (s) | verified |")
    print("| ---: | ---: | ---: | --- |")
    for n in (1024, 32768, 262144, 1 << 20):
        t0 = time.perf_counter()
        text = b.build(n, 1)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        b.build(n, 2)
        again = time.perf_counter() - t0
        ok = (b.tok.count(text) == n) if a.verify else "—"
        print(f"| {n:,} | {first:.3f} | {again:.4f} | {ok} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
