"""ssm-server's prefill conv1d on a GPU: our Triton ``conv_chunk`` against the PyTorch path it
replaces (``torch.cat`` of the carried window and the chunk, ``F.conv1d``, silu), both on a
slice of an in_proj-shaped output as the backend has it (Mamba2-780m: conv_dim 3,328, width 4,
bf16). Checks the two agree (outputs within bf16 rounding, the carried window exactly) for a
fresh sequence and a continued one, chunks shorter than the window included, then times both.

    PYTHONPATH=/tmp/site:. python benchmarks/gpu/bench_conv1d.py    # prints a table, the ratio last

Last, with mamba_ssm importable, the whole model: a 128K prefill of Mamba2-780m on the native
backend with each of the two (the PyTorch path timed before and after; the faster counts).

The H200 profile of a 128K prefill (docs/analysis.md, "Operators") spent 24.5% of ssm-server's
device time in ATen's generic depthwise convolution and 19% in copies and fills.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from servers.ssm_server.mamba_kernels import conv_chunk, conv_chunk_ref  # noqa: E402

D_SSM, CONV_DIM, HEADS, W = 3072, 3328, 48, 4


def _inputs(length: int, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    zxbcdt = torch.randn(length, D_SSM + CONV_DIM + HEADS, device="cuda", generator=g).to(torch.bfloat16)
    x = zxbcdt[:, D_SSM:D_SSM + CONV_DIM]  # strided, as the backend's split leaves it
    weight = (torch.randn(CONV_DIM, W, device="cuda", generator=g) * 0.5).to(torch.bfloat16).contiguous()
    bias = (torch.randn(CONV_DIM, device="cuda", generator=g) * 0.1).to(torch.bfloat16)
    state = torch.randn(CONV_DIM, W, device="cuda", generator=g).to(torch.bfloat16)
    return x, weight, bias, state


def check() -> list[str]:
    rows = []
    for length in (1, 2, 3, 4, 5, 63, 64, 65, 1000, 4096):
        for fresh in (True, False):
            x, w, b, st = _inputs(length, length)
            s1, s2 = st.clone(), st.clone()
            got, want = conv_chunk(x, s1, w, b, fresh), conv_chunk_ref(x, s2, w, b, fresh)
            err = (got.float() - want.float()).abs().max().item()
            scale = want.float().abs().max().item()
            ok = err <= 2e-2 * max(1.0, scale) and torch.equal(s1, s2)
            rows.append((length, fresh, err, torch.equal(s1, s2), ok))
    bad = [r for r in rows if not r[-1]]
    print(f"check: {len(rows) - len(bad)}/{len(rows)} agree (max |Δ| {max(r[2] for r in rows):.2e}; "
          f"windows equal: {all(r[3] for r in rows)})")
    for r in bad:
        print("  DIFFERS", r)
    return ["conv_chunk differs from the PyTorch path"] if bad else []


def _time(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps / 1e3


def bench() -> None:
    print(f"{'chunk':>7} | {'PyTorch path':>12} | {'conv_chunk':>10} | ratio | x48 layers saved")
    for length in (1024, 4096, 32768):
        x, w, b, st = _inputs(length, 7)
        s1, s2 = st.clone(), st.clone()
        ref = _time(lambda: conv_chunk_ref(x, s2, w, b, False), 20)
        ours = _time(lambda: conv_chunk(x, s1, w, b, False), 20)
        print(f"{length:>7} | {ref * 1e3:>9.3f} ms | {ours * 1e3:>7.3f} ms | {ours / ref:.2f}x | "
              f"{(ref - ours) * 48 * 1e3:.1f} ms")


def prefill(tokens: int = 131072, chunk: int = 32768) -> None:
    """The whole model: a ``tokens`` prefill of Mamba2-780m (random weights, bf16) in ``chunk``s
    on the native backend, with conv_chunk and with the PyTorch path swapped back in."""
    from servers.ssm_server import backend_mamba
    from servers.ssm_server.config import ServerConfig
    from servers.ssm_server.mamba_kernels import import_mamba_ssm

    why = import_mamba_ssm()
    if why:
        print(f"prefill: skipped ({why})")
        return
    b = backend_mamba.MambaBackend(ServerConfig(model="mamba2-780m", device="cuda", dtype="bfloat16",
                                                random_weights=True, max_num_seqs=2, prefill_chunk_size=chunk,
                                                cuda_graphs=False))
    ids = torch.randint(0, b.vocab_size, (tokens,)).tolist()

    def run() -> None:
        for s in range(0, tokens, chunk):
            b.prefill_chunk(0, ids[s:s + chunk], s)

    times, logits = {}, {}
    for name, fn in (("PyTorch path", conv_chunk_ref), ("conv_chunk", conv_chunk), ("PyTorch path ", conv_chunk_ref)):
        backend_mamba.conv_chunk = fn
        times[name] = _time(run, 3)
        logits[name.strip()] = b.prefill_chunk(1, ids[:chunk], 0)
    backend_mamba.conv_chunk = conv_chunk
    ref = min(times["PyTorch path"], times["PyTorch path "])
    d = (logits["conv_chunk"] - logits["PyTorch path"]).abs().max().item()
    print(f"prefill {tokens} tokens in {chunk}-token chunks (48 layers): PyTorch path {ref * 1e3:.1f} ms, "
          f"conv_chunk {times['conv_chunk'] * 1e3:.1f} ms, ratio {times['conv_chunk'] / ref:.2f}x "
          f"(last logits max |Δ| {d:.3f} of scale {logits['PyTorch path'].abs().max().item():.1f})")


if __name__ == "__main__":
    print(torch.cuda.get_device_name(0), "torch", torch.__version__)
    problems = check()
    bench()
    prefill()
    sys.exit(1 if problems else 0)
