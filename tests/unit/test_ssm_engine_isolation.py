"""A request whose own work fails inside an engine step fails alone: the requests stepped with
it go on to their last token. Driven at the engine (real tiny Mamba2 on CPU), below the API's
validation, with the two inputs that once failed whole steps: a prompt id past the vocabulary
(its prefill raises) and a temperature of 1e-45 (its sampling raises)."""

from __future__ import annotations

import asyncio

from servers.ssm_server.backend_hf import HFBackend
from servers.ssm_server.config import ServerConfig
from servers.ssm_server.engine import Engine
from servers.ssm_server.metrics import ServerMetrics
from servers.ssm_server.request import Request
from servers.ssm_server.sampling import SamplingParams
from servers.ssm_server.textio import HFText
from tests.conftest import build_tiny

TOKENS = 40


async def _drain(req: Request) -> tuple[int, str | None]:
    """(tokens streamed, error text or None) once the request ends."""
    n = 0
    while True:
        ev = await asyncio.wait_for(req.out.get(), 60)
        if ev.kind == "token":
            n += 1
            if ev.finish_reason:
                return n, None
        elif ev.kind == "error":
            return n, ev.text
        else:
            return n, None


def test_a_failing_prefill_or_sampling_fails_only_its_own_request():
    model = build_tiny("tiny-mamba2")
    backend = HFBackend(ServerConfig(model=str(model), max_num_seqs=8))
    engine = Engine(backend, HFText(str(model)), ServerMetrics("m", lambda: {}), max_queue=16,
                    prefill_chunk_size=64, model_name="m")

    async def run():
        await engine.start()
        healthy = [Request(list(range(5, 105)), SamplingParams(max_tokens=TOKENS, ignore_eos=True, temperature=0.8))
                   for _ in range(3)]
        for r in healthy:
            engine.submit(r)
        await asyncio.sleep(0.05)  # the healthy ones are under way
        bad_ids = Request([5, 10**6, 7], SamplingParams(max_tokens=4))
        bad_temp = Request(list(range(5, 40)), SamplingParams(max_tokens=4, temperature=1e-45))
        engine.submit(bad_ids)
        engine.submit(bad_temp)
        out = await asyncio.gather(*(_drain(r) for r in healthy + [bad_ids, bad_temp]))
        await engine.stop()
        return out, engine.running, engine.free_slots

    out, running, free = asyncio.run(run())
    assert out[:3] == [(TOKENS, None)] * 3  # every healthy stream whole
    assert out[3][0] == 0 and "IndexError" in out[3][1]
    assert out[4][0] == 0 and out[4][1]  # its sampling raised (inf logits)
    assert not running and len(free) == 8  # nothing left holding a slot


def test_a_prompt_arriving_while_others_decode_is_prefilled_in_the_smaller_chunks():
    """--prefill-chunk-size-decoding: a prompt prefills in chunks of 128 alone, and of 32 while
    another stream decodes (so that stream's gaps stay one small chunk long); the tokens are the
    same either way (chunked prefill is exact)."""
    model = build_tiny("tiny-mamba2")
    backend = HFBackend(ServerConfig(model=str(model), max_num_seqs=4))
    chunks: list[int] = []
    real = backend.prefill_chunk

    def spy(slot, ids, start):
        chunks.append(len(ids))
        return real(slot, ids, start)

    backend.prefill_chunk = spy
    engine = Engine(backend, HFText(str(model)), ServerMetrics("m", lambda: {}), max_queue=16,
                    prefill_chunk_size=128, prefill_chunk_size_decoding=32, model_name="m")
    prompt = list(range(5, 305))  # 300 tokens

    async def run():
        await engine.start()
        alone = Request(prompt, SamplingParams(max_tokens=4, ignore_eos=True, temperature=0.0))
        engine.submit(alone)
        got_alone = await _drain(alone)
        n_alone = list(chunks)
        chunks.clear()
        stream = Request([5, 6, 7], SamplingParams(max_tokens=400, ignore_eos=True))
        engine.submit(stream)
        while not stream.generated:  # it is decoding
            await asyncio.sleep(0.01)
        beside = Request(prompt, SamplingParams(max_tokens=4, ignore_eos=True, temperature=0.0))
        engine.submit(beside)
        got = await asyncio.gather(_drain(beside), _drain(stream))
        await engine.stop()
        return got_alone, n_alone, got, alone.generated, beside.generated

    got_alone, n_alone, got, toks_alone, toks_beside = asyncio.run(run())
    assert n_alone == [128, 128, 44] and got_alone == (4, None)
    assert chunks == [3] + [32] * 9 + [12], chunks  # the stream's own prompt, then 300 in 32s
    assert got == [(4, None), (400, None)]
    assert toks_beside == toks_alone  # greedy: the same tokens from either chunking
