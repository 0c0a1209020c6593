"""The transformers backend's CUDA-graph decode (GPU): a graph step of pooled SSM states gives
the eager step's logits and leaves the same states in the pool, padding rows included, and
every bucket's graph is captured into the one memory pool the decoder shares. Skips without
CUDA. Each model runs in a process of its own, as ssm-server serves one: a process that
loaded the native backend stubs mamba_ssm's CUDA scan, which transformers' Mamba (v1) would
then take (ssm-server refuses that mix with a message; checked here too)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("preset", ["tiny-mamba", "tiny-mamba2"])
def test_graph_step_equals_the_eager_step_in_a_process_of_its_own(preset):
    r = subprocess.run([sys.executable, "-c", f"from tests.gpu.test_graph_decode import check; check({preset!r})"],
                       cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])})
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


def test_mamba_v1_after_the_native_backend_is_refused_plainly():
    from servers.ssm_server.backend_hf import HFBackend, ModelLoadError
    from servers.ssm_server.config import ServerConfig
    from servers.ssm_server.mamba_kernels import import_mamba_ssm, scan_stubbed

    if import_mamba_ssm() is not None or not scan_stubbed():
        pytest.skip("mamba_ssm's CUDA scan is built here: nothing is stubbed")
    with pytest.raises(ModelLoadError, match="in a process of its own"):
        HFBackend(ServerConfig(model="tiny-mamba", device="cuda", dtype="float32", random_weights=True))


def check(preset: str) -> None:
    from servers.ssm_server.backend_hf import HFBackend
    from servers.ssm_server.config import ServerConfig

    b = HFBackend(ServerConfig(model=preset, device="cuda", dtype="float32", random_weights=True, max_num_seqs=8))
    assert b.graphs is not None and b.conv_pool[0].shape[0] == b.num_slots + 1  # the scratch row
    g = torch.Generator().manual_seed(0)
    for slot in range(3):
        b.prefill_chunk(slot, torch.randint(0, b.vocab_size, (17 + slot,), generator=g).tolist(), 0)
    before = [t.clone() for t in b.conv_pool + [r for r in b.rec_pool if r is not None]]
    slots, tokens = [2, 0, 1], [5, 7, 11]  # bucket 4: one padding row on the scratch slot

    graph = b.decode(slots, tokens, [0, 0, 0]).clone()
    after_graph = [t[:b.num_slots].clone() for t in b.conv_pool + [r for r in b.rec_pool if r is not None]]
    for t, saved in zip(b.conv_pool + [r for r in b.rec_pool if r is not None], before):
        t.copy_(saved)
    eager = b.decode_eager(slots, tokens)
    after_eager = [t[:b.num_slots] for t in b.conv_pool + [r for r in b.rec_pool if r is not None]]

    assert graph.shape == eager.shape == (3, b.vocab_size)
    torch.testing.assert_close(graph, eager, rtol=1e-4, atol=1e-4)
    for x, y in zip(after_graph, after_eager):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)

    # a second bucket, captured into the same pool, and a replay of the first
    b.decode([0], [3], [0])
    b.decode([1, 2, 0], [4, 4, 4], [0, 0, 0])
    gs = b.graphs.set
    assert set(gs.graphs) == {1, 4} and gs.pool is not None and not gs.failed
    print("ok")
