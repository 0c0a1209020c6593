"""ssm-server's Triton conv of a prefill chunk (servers/ssm_server/mamba_kernels.conv_chunk),
run by Triton's interpreter on the CPU against the PyTorch path it replaces, in float32: the
output within one bf16 rounding, the carried window exactly — fresh and continued sequences,
chunks shorter than the window and chunks across tile edges; and several fresh sequences packed
end to end (``conv_packed``, ``last_windows``: one prefill of several short prompts) against
each sequence alone. (Its speed is a GPU benchmark: benchmarks/gpu/bench_conv1d.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")  # a CI dependency (pyproject's test extra): this never skips there

CODE = r'''
import torch
from servers.ssm_server.mamba_kernels import conv_chunk, conv_chunk_ref
D_SSM, CONV_DIM, HEADS, W = 64, 200, 4, 4   # 200: two channel tiles, the second partial
worst = 0.0
for L in (1, 2, 3, 4, 5, 63, 64, 65, 130):
    for fresh in (True, False):
        g = torch.Generator().manual_seed(L)
        z = torch.randn(L, D_SSM + CONV_DIM + HEADS, generator=g).to(torch.bfloat16)
        x = z[:, D_SSM:D_SSM + CONV_DIM]  # strided, as in_proj's split leaves it
        w = (torch.randn(CONV_DIM, W, generator=g) * 0.5).to(torch.bfloat16).contiguous()
        b = (torch.randn(CONV_DIM, generator=g) * 0.1).to(torch.bfloat16)
        st = torch.randn(CONV_DIM, W, generator=g).to(torch.bfloat16)
        s1, s2 = st.clone(), st.float()
        got = conv_chunk(x, s1, w, b, fresh)
        want = conv_chunk_ref(x.float(), s2, w.float(), b.float(), fresh)
        assert got.shape == (L, CONV_DIM) and got.dtype == torch.bfloat16 and got.is_contiguous()
        assert torch.equal(s1.float(), s2), (L, fresh)
        worst = max(worst, ((got.float() - want).abs() / (want.abs() + 1e-2)).max().item())
assert worst <= 2 ** -7, worst
print("agree", worst)
'''

PACKED = r'''
import torch
from servers.ssm_server.mamba_kernels import conv_chunk_ref, conv_packed, last_windows
CONV_DIM, W = 200, 4
worst = 0.0
# lengths shorter than the window, one position, across the 64-row tiles, a sequence ending
# exactly on a tile edge
for lens in ([5], [1, 1, 1], [2, 7, 3], [63, 1, 66], [64, 64], [3, 130, 2, 1]):
    g = torch.Generator().manual_seed(sum(lens))
    L = sum(lens)
    z = torch.randn(L, CONV_DIM + 7, generator=g).to(torch.bfloat16)
    x = z[:, 3:3 + CONV_DIM]  # strided, as in_proj's split leaves it
    w = (torch.randn(CONV_DIM, W, generator=g) * 0.5).to(torch.bfloat16).contiguous()
    b = (torch.randn(CONV_DIM, generator=g) * 0.1).to(torch.bfloat16)
    cu = torch.tensor([0] + lens).cumsum(0)
    seq = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    got = conv_packed(x, w, b, cu[seq].to(torch.int32), W)
    wins = last_windows(x, cu[:-1], cu[1:], W)
    assert got.shape == (L, CONV_DIM) and wins.shape == (len(lens), CONV_DIM, W)
    for j, n in enumerate(lens):
        st = torch.full((CONV_DIM, W), 9.0)  # a fresh sequence reads none of it
        want = conv_chunk_ref(x[cu[j]:cu[j + 1]].float(), st, w.float(), b.float(), True)
        assert torch.equal(wins[j].float(), st), (lens, j)
        part = got[cu[j]:cu[j + 1]].float()
        worst = max(worst, ((part - want).abs() / (want.abs() + 1e-2)).max().item())
assert worst <= 2 ** -7, worst
print("agree", worst)
'''


def _interpret(code: str) -> None:
    # a child process: TRITON_INTERPRET must be set before Triton is imported
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                       cwd=Path(__file__).resolve().parents[2])
    assert p.returncode == 0 and "agree" in p.stdout, p.stdout + p.stderr[-3000:]


def test_conv_chunk_equals_the_pytorch_path_in_tritons_interpreter():
    _interpret(CODE)


def test_packed_sequences_equal_each_alone_in_tritons_interpreter():
    _interpret(PACKED)
