"""The transformers backend's CUDA-graph decode (GPU): a graph step of pooled SSM states gives
the eager step's logits and leaves the same states in the pool, padding rows included, and
every bucket's graph is captured into the one memory pool the decoder shares. Skips without
CUDA."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("preset", ["tiny-mamba", "tiny-mamba2"])
def test_graph_step_equals_the_eager_step(preset):
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
