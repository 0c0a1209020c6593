"""ssm-server's fused norm + projection of a small decode batch (servers/ssm_server/mamba_gemv),
run by Triton's interpreter on the CPU against its PyTorch reference: each mode (plain, gated
RMSNorm, add + RMSNorm writing the float32 residual, the first layer's RMSNorm), 1 to 3 rows,
strided inputs, a weight whose rows and columns do not fill the blocks. (Its speed is a GPU
benchmark: benchmarks/gpu/bench_decode_step.py; the model-shape check is tests/gpu.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")  # a CI dependency (pyproject's test extra): this never skips there

CODE = r'''
import torch
from servers.ssm_server import mamba_gemv as g
from servers.ssm_server.mamba_check import gemv_cases
worst = 0.0
for rows in (1, 3):
    gen = torch.Generator().manual_seed(rows)
    N, K = 37, 96  # BLOCK_K 128: a partial tile of columns; 37 rows: a partial block of rows
    w = (torch.randn(N, K, generator=gen) / K ** 0.5).to(torch.bfloat16)
    x = torch.randn(rows, K, generator=gen).to(torch.bfloat16)
    z = torch.randn(rows, K + 20, generator=gen).to(torch.bfloat16)[:, :K]  # strided rows
    r = torch.randn(rows, K, generator=gen)
    nw = (1 + 0.1 * torch.randn(K, generator=gen)).to(torch.bfloat16)
    for mode, cfg, got, ref, got_r, ref_r in gemv_cases(x, w, z, r, nw):
        assert got.shape == (rows, N) and got.dtype == torch.bfloat16
        worst = max(worst, ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item())
        if mode in (g.ADD_NORM, g.NORM):
            assert torch.allclose(got_r, ref_r, atol=1e-6), (mode, cfg)
        else:
            assert got_r is None
assert worst <= 2 ** -6, worst  # two bf16 roundings (the normalized input, the output) apart
print("agree", worst)
'''


def test_fused_projection_equals_norm_then_matmul_in_tritons_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    p = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0 and "agree" in p.stdout, p.stdout + p.stderr[-3000:]
