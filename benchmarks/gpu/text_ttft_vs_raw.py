"""Batch-1 TTFT of text prompts through ctxload against the raw forward of the same tokens.

usage (GPU machine, repo root, after the run's servers have stopped):
  python3 benchmarks/gpu/text_ttft_vs_raw.py RUN_DIR [TARGET]
For every context_sweep stage of the run (``prompt=N``: one request at a time, text prompts
made by ctxload's load generator, through ssm-server's HTTP API): the median TTFT and the prompt
tokens the server counted (its ``usage``). Then, in this process, on the same GPU: mamba_ssm's
own one-shot forward (``MambaLMHeadModel``, the served preset's architecture, random weights,
bf16; last-token logits) of that many tokens, the fastest of 2 after a warm-up — the reference
the issue sets (TTFT ≤ 1.15× it); not run where one GEMM of it would pass 2^31 elements
(cuBLAS fails there: 1M tokens of Mamba2-780m): there the reference is n / c forwards of the
largest power-of-two c that fits, each timed the same way (a recurrent model's forward of n tokens
in pieces costs their sum, plus a state of a few MB handed between them), marked "≈". A short
prompt's raw forward is mostly its ~700 kernel launches; the server replays a CUDA graph there.
Prints a table last.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def served(run_dir: Path, target: str | None) -> dict[int, tuple[float, int, int]]:
    """{requested length: (TTFT p50 s, prompt tokens counted, requests)}."""
    by: dict[int, list[dict]] = defaultdict(list)
    for line in (run_dir / "requests.jsonl").read_text().splitlines():
        r = json.loads(line) if line.strip() else None
        if r and r.get("status") == "ok" and str(r.get("stage", "")).startswith("prompt=") \
                and (target is None or r["target"] == target) and r.get("ttft_s") is not None:
            by[int(r["stage"].split("=", 1)[1])].append(r)
    return {n: (statistics.median(r["ttft_s"] for r in rs),
                int(statistics.median(r.get("prompt_tokens") or n for r in rs)), len(rs))
            for n, rs in sorted(by.items())}


def first_after_ready(run_dir: Path, target: str | None, got: dict) -> str:
    """The run's warm-up request (the first after the server said ready) against the steady
    TTFT p50 at its length (the issue: ≤ 1.2×)."""
    for line in (run_dir / "requests.jsonl").read_text().splitlines():
        r = json.loads(line) if line.strip() else None
        if r and r.get("stage") == "warmup" and (target is None or r["target"] == target) and r.get("ttft_s"):
            steady = got.get(r.get("prompt_tokens_requested") or r.get("prompt_tokens"))
            if steady:
                return (f"first request after ready: TTFT {r['ttft_s'] * 1e3:.1f} ms against {steady[0] * 1e3:.1f} ms "
                        f"steady at {r.get('prompt_tokens'):,} tokens ({r['ttft_s'] / steady[0]:.2f}×)")
    return "first request after ready: no warm-up request at a swept length in this run"


def one_shot_limit(width: int) -> int:
    """The longest power-of-two prompt whose in_proj output (tokens × width) stays under 2^31."""
    n = 1
    while 2 * n * width < 1 << 31:
        n *= 2
    return n


def raw_forward_s(lengths: list[int]) -> dict[int, tuple[float, int]]:
    """{tokens: (seconds, pieces)}: pieces > 1 where one forward would pass cuBLAS's limit."""
    import torch

    from bench_ssm_server_gpu import VOCAB, _model_pair

    model = _model_pair()
    limit = one_shot_limit(model.backbone.layers[0].mixer.in_proj.out_features)
    out = {}
    for n in lengths:
        pieces = -(-n // limit)
        m = -(-n // pieces)
        ids = torch.randint(1, VOCAB, (1, m), device="cuda")
        ts = []
        with torch.inference_mode():
            for _ in range(3):
                t = time.perf_counter()
                model(ids, num_last_tokens=1)
                torch.cuda.synchronize()
                ts.append(time.perf_counter() - t)
        out[n] = (min(ts[1:]) * pieces, pieces)
        print(f"raw forward {n} tokens: {out[n][0] * 1e3:.1f} ms"
              + (f" ({pieces} × {m:,} tokens)" if pieces > 1 else ""), flush=True)
        del ids
        torch.cuda.empty_cache()
    return out


def main() -> int:
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__.split("\n\n")[1].splitlines()[1].strip())
    run_dir, target = Path(sys.argv[1]), (sys.argv[2] if len(sys.argv) == 3 else None)
    got = served(run_dir, target)
    if not got:
        print(f"{run_dir}: no context_sweep request{' of ' + target if target else ''}")
        return 1
    print(first_after_ready(run_dir, target, got), flush=True)
    from bench_ssm_server_gpu import setup_mamba_ssm

    setup_mamba_ssm()
    raw = raw_forward_s([tokens for _, tokens, _ in got.values()])
    import torch

    print(f"\nbatch-1 TTFT, text prompts through ctxload ({target or 'every target'}) against mamba_ssm's one-shot "
          f"forward, {torch.cuda.get_device_name()}, {time.strftime('%Y-%m-%d')}")
    print("| prompt | tokens | requests | TTFT p50 | raw forward | TTFT / raw |")
    print("|---|---|---|---|---|---|")
    for n, (ttft, tokens, k) in got.items():
        ref, pieces = raw[tokens]
        mark = f"≈ {pieces} × " if pieces > 1 else ""
        print(f"| {n:,} | {tokens:,} | {k} | {ttft * 1e3:.1f} ms | {mark}{ref / pieces * 1e3:.1f} ms | {ttft / ref:.2f}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
