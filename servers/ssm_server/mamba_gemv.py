"""The projections of a small decode batch, with the RMSNorm before each fused in: one Triton
kernel per projection instead of a norm kernel and a cuBLAS GEMM.

At batch 1 a decode step is ~100 tiny matrix-vector products and norms: on an H200 the step
took 1.26 ms of device time against 0.42 ms of bytes to read, and cuBLAS's kernels for
``in_proj`` (1,536 → 6,448) and ``out_proj`` (3,072 → 1,536, split-K plus a reduce kernel) were
55% of it, at about half the memory bandwidth; the norms before them, 97 more launches of ~2 µs
(``benchmarks/gpu/bench_decode_step.py``). Here each projection is one kernel over rows of the
weight, streaming it once: a program loads its block of weight rows whole (all of K at once, so
every load is in flight together), and the norm before it is its prologue: every program reads
the whole (short) input rows and normalizes them in registers (a few KB from L2).

``project(x, weight, mode=...)`` computes ``norm(x) @ weight.T`` for up to ``MAX_ROWS`` rows:
- ``PLAIN``: x as is;
- ``GATED``: Mamba2's gated RMSNorm (``norm_before_gate=False``, one group): x * silu(z), then
  RMS-normalized and scaled by ``norm_weight``;
- ``ADD_NORM``: the pre-mixer fused add + RMSNorm (``residual_in_fp32``): r = x + residual in
  float32 is written to ``residual_out`` (by the first program only) and normalized;
- ``NORM``: the first layer's: r = x (no residual yet), as ``ADD_NORM``.
The normalized input is rounded to the weight's dtype before the product, as the separate norm
kernel's output is, so the result matches norm-then-GEMM within bf16 rounding of the sums.
Blocks (weight rows per program, warps) are timed once per shape and row count (``pick``),
never inside a capture.
"""

from __future__ import annotations

import functools

import torch

PLAIN, GATED, ADD_NORM, NORM = 0, 1, 2, 3
MAX_ROWS = 8
"""Rows (decode batch) the kernel takes; each row costs a pass over the weight tile in registers."""

CONFIGS = ((2, 4), (4, 4), (4, 8), (8, 8), (16, 8))
"""(weight rows per program, warps) tried by ``pick``."""


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def project(x_ptr, z_ptr, r_ptr, nw_ptr, w_ptr, out_ptr, rout_ptr, B, N, K, eps,
                sx, sz, sr, sw, so, sro, MODE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """out[b, n] = sum_k norm(x)[b, k] * w[n, k] for BLOCK_N weight rows n, every one of the
        B input rows b: the weight tile is loaded once, whole (all of K: every load in flight at
        once), and each input row, read whole, is normalized in registers."""
        pid = tl.program_id(0)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        mn = rn < N
        mk = rk < K
        w = tl.load(w_ptr + rn[:, None] * sw + rk[None, :], mask=mn[:, None] & mk[None, :], other=0.0)
        if MODE != 0:
            nw = tl.load(nw_ptr + rk, mask=mk, other=0.0).to(tl.float32)
        b = 0
        while b < B:  # a runtime bound: one compile for every batch size
            v = tl.load(x_ptr + b * sx + rk, mask=mk, other=0.0).to(tl.float32)
            if MODE == 1:
                z = tl.load(z_ptr + b * sz + rk, mask=mk, other=0.0).to(tl.float32)
                v = v * z * tl.sigmoid(z)
            if MODE == 2:
                v += tl.load(r_ptr + b * sr + rk, mask=mk, other=0.0).to(tl.float32)
            if MODE >= 2:
                if pid == 0:
                    tl.store(rout_ptr + b * sro + rk, v, mask=mk)
            if MODE != 0:
                v = v / tl.sqrt(tl.sum(v * v, axis=0) / K + eps) * nw
            v = v.to(w.dtype).to(tl.float32)  # rounded as the separate norm's output is
            acc = tl.sum(w.to(tl.float32) * v[None, :], axis=1)
            tl.store(out_ptr + b * so + rn, acc.to(out_ptr.dtype.element_ty), mask=mn)
            b += 1

    return project


def project(x: torch.Tensor, weight: torch.Tensor, mode: int = PLAIN, *, z: torch.Tensor | None = None,
            residual: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None, eps: float = 1e-5,
            config: tuple[int, int] = CONFIGS[1]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(norm(x) @ weight.T [B, N] in x's dtype, residual_out [B, K] float32 or None).

    x [B, K] (unit inner stride), weight [N, K] (unit inner stride), B <= MAX_ROWS; ``z`` [B, K]
    for GATED, ``residual`` [B, K] for ADD_NORM, ``norm_weight`` [K] for every mode but PLAIN."""
    import triton

    bsz, k = x.shape
    n = weight.shape[0]
    assert bsz <= MAX_ROWS and weight.shape[1] == k and x.stride(-1) == 1 and weight.stride(-1) == 1
    assert mode == PLAIN or norm_weight is not None
    out = torch.empty((bsz, n), dtype=x.dtype, device=x.device)
    rout = torch.empty((bsz, k), dtype=torch.float32, device=x.device) if mode >= ADD_NORM else out
    zz = z if z is not None else x
    rr = residual if residual is not None else x
    assert zz.stride(-1) == 1 and rr.stride(-1) == 1
    block_n, warps = config
    _kernel()[((n + block_n - 1) // block_n,)](
        x, zz, rr, norm_weight if norm_weight is not None else weight, weight, out, rout, bsz, n, k, eps,
        x.stride(0), zz.stride(0), rr.stride(0), weight.stride(0), out.stride(0), rout.stride(0),
        MODE=mode, BLOCK_N=block_n, BLOCK_K=triton.next_power_of_2(k), num_warps=warps)
    return out, (rout if mode >= ADD_NORM else None)


def project_ref(x, weight, mode=PLAIN, *, z=None, residual=None, norm_weight=None, eps=1e-5):
    """PyTorch reference of ``project`` (norm in float32, rounded to the weight's dtype, then
    the product), for tests."""
    v = x.float()
    if mode == GATED:
        v = v * torch.nn.functional.silu(z.float())
    if mode == ADD_NORM:
        v = v + residual.float()
    rout = v.clone() if mode >= ADD_NORM else None
    if mode != PLAIN:
        v = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.float()
    return (v.to(weight.dtype) @ weight.T).to(x.dtype), rout


def pick(rows: int, weight: torch.Tensor, mode: int) -> tuple[int, int]:
    """The fastest ``CONFIGS`` entry for ``rows`` input rows against ``weight`` in ``mode``, timed
    in a CUDA graph on scratch inputs (the first config where timing fails)."""
    from servers.ssm_server.mamba_kernels import graph_time_us

    k = weight.shape[1]
    dev = weight.device
    try:
        x = torch.randn((rows, k), dtype=weight.dtype, device=dev)
        z = torch.randn((rows, k), dtype=weight.dtype, device=dev)
        r = torch.randn((rows, k), dtype=torch.float32, device=dev)
        nw = torch.ones(k, dtype=weight.dtype, device=dev)
        times = {c: graph_time_us(lambda c=c: project(x, weight, mode, z=z, residual=r, norm_weight=nw, config=c))
                 for c in CONFIGS}
    except Exception:  # noqa: BLE001 - out of memory, or a kernel that does not build here: the first config
        return CONFIGS[0]
    return min(times, key=times.get)
