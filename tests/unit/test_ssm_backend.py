"""The backend's chunked prefill and batched decode match one full forward pass (CPU, float32)."""

from __future__ import annotations

import pytest
import torch

from servers.ssm_server.backend_hf import HFBackend
from servers.ssm_server.config import ServerConfig, parse_bytes
from tests.conftest import build_tiny

PROMPT = 150
STEPS = 6


def _backend(preset: str, **kw) -> HFBackend:
    return HFBackend(ServerConfig(model=str(build_tiny(preset)), max_num_seqs=4, **kw))


def _reference(b: HFBackend, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return b.model(input_ids=ids, use_cache=False).logits[0]


@pytest.mark.parametrize("preset", ["tiny-mamba2", "tiny-falcon-h1", "tiny-llama"])
def test_chunked_prefill_and_decode_match_full_forward(preset):
    b = _backend(preset)
    torch.manual_seed(1)
    ids = torch.randint(1, b.vocab_size, (1, PROMPT + STEPS))
    full = _reference(b, ids)
    chunk = 37  # not a divisor of the prompt, nor of the SSD chunk size
    slot = 2
    for start in range(0, PROMPT, chunk):
        last = b.prefill_chunk(slot, ids[0, start:min(start + chunk, PROMPT)].tolist(), start)
    torch.testing.assert_close(last, full[PROMPT - 1], atol=2e-5, rtol=1e-4)
    for t in range(STEPS):
        pos = PROMPT + t
        step = b.decode([slot], [int(ids[0, pos])], [pos])[0]
        torch.testing.assert_close(step, full[pos], atol=2e-5, rtol=1e-4)


def test_batched_decode_over_slots_matches_each_sequence_alone():
    b = _backend("tiny-mamba2")
    assert b.pooled and b.state_bytes > 0
    torch.manual_seed(2)
    seqs = [torch.randint(1, b.vocab_size, (1, n + STEPS)) for n in (40, 90, 65)]
    refs = [_reference(b, s) for s in seqs]
    slots = [3, 0, 1]
    for s, x, n in zip(slots, seqs, (40, 90, 65)):
        b.prefill_chunk(s, x[0, :n].tolist(), 0)
    for t in range(STEPS):
        pos = [n + t for n in (40, 90, 65)]
        out = b.decode(slots, [int(x[0, p]) for x, p in zip(seqs, pos)], pos)
        for i, (ref, p) in enumerate(zip(refs, pos)):
            torch.testing.assert_close(out[i], ref[p], atol=2e-5, rtol=1e-4)


def test_reused_slot_starts_from_a_clean_state():
    b = _backend("tiny-mamba2")
    ids = torch.randint(1, b.vocab_size, (1, 50))
    b.prefill_chunk(0, torch.randint(1, b.vocab_size, (200,)).tolist(), 0)  # dirty slot 0
    again = b.prefill_chunk(0, ids[0].tolist(), 0)
    torch.testing.assert_close(again, _reference(b, ids)[-1], atol=2e-5, rtol=1e-4)


def test_memory_budget_sizes_the_pool_and_rejects_too_small():
    b = _backend("tiny-mamba2")
    weights = sum(p.numel() * p.element_size() for p in b.model.parameters())
    small = _backend("tiny-mamba2", gpu_memory_budget=weights + 2 * 3 * b.state_bytes)
    assert small.num_slots == 3
    from servers.ssm_server.backend_hf import ModelLoadError
    with pytest.raises(ModelLoadError, match="no room"):
        _backend("tiny-mamba2", gpu_memory_budget=weights + 1)


@pytest.mark.parametrize("text,value", [("24GiB", 24 << 30), ("500MB", 500_000_000), ("1024", 1024)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["24 parsecs", "", "-5GB", "GiB"])
def test_parse_bytes_rejects(text):
    with pytest.raises(ValueError):
        parse_bytes(text)


def test_each_backend_states_the_interfaces_it_offers():
    """The engine reads a backend's abilities from the protocols (servers/ssm_server/protocols.py),
    not from hasattr: the native Mamba2 backend pipelines its decode steps and samples on the
    device; the transformers backend only returns logits."""
    from servers.ssm_server import protocols
    from servers.ssm_server.backend_hf import HFBackend
    from servers.ssm_server.backend_mamba import MambaBackend
    from servers.ssm_server.engine import Engine
    from servers.ssm_server.synthetic import SyntheticEngine

    for cls, pipelined in ((MambaBackend, True), (HFBackend, False)):
        assert issubclass(cls, protocols.DeviceSampling) is pipelined, cls
        assert issubclass(cls, protocols.PipelinedBackend) is pipelined, cls
    for cls in (Engine, SyntheticEngine):
        assert all(callable(getattr(cls, m, None)) for m in ("start", "stop", "submit", "cancel", "state")), cls
