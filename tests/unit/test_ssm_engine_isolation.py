"""A request whose own work fails inside an engine step fails alone: the requests stepped with
it go on to their last token. Driven at the engine (real tiny Mamba2 on CPU), below the API's
validation, with the two inputs that once failed whole steps: a prompt id past the vocabulary
(its prefill raises) and a temperature of 1e-45 (its sampling raises)."""

from __future__ import annotations

import asyncio
import re

import pytest

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
    assert out[4][0] == 0 and "IndexError" not in out[4][1]  # its own sampling raised (inf logits),
    # though it was prefilled in one pack with the bad prompt (then each alone)
    assert not running and len(free) == 8  # nothing left holding a slot


def test_a_prompt_arriving_while_others_decode_is_prefilled_in_the_smaller_chunks():
    """--prefill-chunk-size-decoding: a prompt prefills in chunks of 128 alone, and of 32 while
    another stream decodes (so that stream's gaps stay one small chunk long); the tokens are the
    same either way (chunked prefill is exact). A prompt that fits in one 128-token chunk is
    prefilled whole even then: one gap for the stream, not four."""
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
        stream = Request([5, 6, 7], SamplingParams(max_tokens=100_000, ignore_eos=True))
        engine.submit(stream)
        while not stream.generated:  # it is decoding
            await asyncio.sleep(0.01)
        beside = Request(prompt, SamplingParams(max_tokens=4, ignore_eos=True, temperature=0.0))
        engine.submit(beside)
        got = await _drain(beside)
        short = Request(prompt[:100], SamplingParams(max_tokens=4, ignore_eos=True))
        engine.submit(short)
        got_short = await _drain(short)
        decoding = not stream.finished
        engine.cancel(stream)
        await engine.stop()
        return got_alone, n_alone, (got, got_short, decoding), alone.generated, beside.generated

    got_alone, n_alone, got, toks_alone, toks_beside = asyncio.run(run())
    assert n_alone == [128, 128, 44] and got_alone == (4, None)
    # the stream's own prompt, then 300 in 32s, then the 100-token prompt whole
    assert chunks == [3] + [32] * 9 + [12] + [100], chunks
    assert got == ((4, None), (4, None), True)
    assert toks_beside == toks_alone  # greedy: the same tokens from either chunking


@pytest.mark.parametrize("overlap", [False, True], ids=["in-step", "overlap"])
def test_short_prompts_arriving_together_are_prefilled_as_one(overlap):
    """Packed prefill: four 20-token prompts arrive at once with a 64-token budget — the first
    three whole prompts go in one prefill (their first tokens come from one step, at one
    time), the fourth in the next; each streams the greedy tokens it streams alone."""
    model = build_tiny("tiny-mamba2")
    backend = HFBackend(ServerConfig(model=str(model), max_num_seqs=8))
    packs: list[list[int]] = []
    real = backend.prefill_packed

    def spy(slots, prompts):
        packs.append([len(p) for p in prompts])
        return real(slots, prompts)

    backend.prefill_packed = spy
    engine = Engine(backend, HFText(str(model)), ServerMetrics("m", lambda: {}), max_queue=16,
                    prefill_chunk_size=64, model_name="m", prefill_overlap=overlap)
    prompts = [list(range(5 + i, 25 + i)) for i in range(4)]

    def req(p):
        return Request(p, SamplingParams(max_tokens=6, ignore_eos=True, temperature=0.0))

    async def run():
        await engine.start()
        alone = []
        for p in prompts:
            r = req(p)
            engine.submit(r)
            await _drain(r)
            alone.append(r.generated)
        packs.clear()
        together = [req(p) for p in prompts]
        for r in together:
            engine.submit(r)
        await asyncio.gather(*(_drain(r) for r in together))
        await engine.stop()
        return alone, together

    alone, together = asyncio.run(run())
    assert packs == [[20, 20, 20]], packs
    firsts = [r.t_first for r in together]
    assert firsts[0] == firsts[1] == firsts[2] < firsts[3]
    assert [r.generated for r in together] == alone


def _engine_with_held_prefill(model, **kw):
    """An engine whose prefill chunks wait on a gate the test opens: the real chunk runs once
    the gate opens (or after 30 s). ``started`` is set when a chunk reaches the gate."""
    import threading

    backend = HFBackend(ServerConfig(model=str(model), max_num_seqs=4))
    gate, started = threading.Event(), threading.Event()
    held = {"on": False}
    real = backend.prefill_chunk

    def held_chunk(slot, ids, start):
        if held["on"]:
            started.set()
            gate.wait(30)
        return real(slot, ids, start)

    backend.prefill_chunk = held_chunk
    engine = Engine(backend, HFText(str(model)), ServerMetrics("m", lambda: {}), max_queue=16,
                    prefill_chunk_size=512, model_name="m", **kw)
    return engine, gate, started, held


async def _a_prompt_held_beside_a_stream(engine, started, held, stream_tokens: int, prompt_tokens: int):
    """Start the engine, a stream decoding, then a 300-token prompt whose prefill chunk is held
    (``_engine_with_held_prefill``); returns (stream, prompt) once the chunk is held."""
    await engine.start()
    stream = Request([5, 6, 7], SamplingParams(max_tokens=stream_tokens, ignore_eos=True))
    engine.submit(stream)
    while not stream.generated:
        await asyncio.sleep(0.01)
    held["on"] = True
    prompt = Request(list(range(5, 305)), SamplingParams(max_tokens=prompt_tokens, ignore_eos=True))
    engine.submit(prompt)
    while not started.is_set():
        await asyncio.sleep(0.005)
    return stream, prompt


def test_decode_steps_go_on_while_a_prompt_prefills_beside_them():
    """Prefill overlap (``--prefill-overlap``): while a prompt's chunk is on the prefill thread, the
    stream already decoding keeps getting tokens — here 20 of them while the chunk is held —
    and the prompt's tokens are those it gets alone. With the overlap off the chunk runs inside
    the step, so the stream gets none until it is done."""
    model = build_tiny("tiny-mamba2")
    prompt = list(range(5, 305))

    def run(overlap: bool):
        engine, gate, started, held = _engine_with_held_prefill(model, prefill_overlap=overlap)

        async def go():
            await engine.start()
            alone = Request(prompt, SamplingParams(max_tokens=4, ignore_eos=True, temperature=0.0))
            engine.submit(alone)
            await _drain(alone)
            stream = Request([5, 6, 7], SamplingParams(max_tokens=2000, ignore_eos=True))
            engine.submit(stream)
            while not stream.generated:
                await asyncio.sleep(0.01)
            held["on"] = True
            beside = Request(prompt, SamplingParams(max_tokens=4, ignore_eos=True, temperature=0.0))
            engine.submit(beside)
            while not started.is_set():
                await asyncio.sleep(0.005)
            at_hold = len(stream.generated)
            for _ in range(1000):  # up to 10 s for 20 tokens (a step is milliseconds)
                if len(stream.generated) >= at_hold + 20:
                    break
                await asyncio.sleep(0.01)
            while_held = len(stream.generated) - at_hold
            gate.set()
            got = await _drain(beside)
            engine.cancel(stream)
            await engine.stop()
            return while_held, got, alone.generated, beside.generated

        return asyncio.run(go())

    while_held, got, toks_alone, toks_beside = run(True)
    assert while_held >= 20, while_held
    assert got == (4, None) and toks_beside == toks_alone
    while_held, got, toks_alone, toks_beside = run(False)
    assert while_held <= 1, while_held  # at most the token of a step launched before the chunk
    assert got == (4, None) and toks_beside == toks_alone


def test_a_request_cancelled_while_its_chunk_runs_frees_its_slot_after_the_chunk():
    """Its slot is in use by the prefill thread until the chunk ends: the request is dropped
    then (counted cancelled), never while the chunk still writes the slot's state."""
    model = build_tiny("tiny-mamba2")
    engine, gate, started, held = _engine_with_held_prefill(model, prefill_overlap=True)

    async def go():
        await engine.start()
        held["on"] = True
        req = Request(list(range(5, 305)), SamplingParams(max_tokens=4, ignore_eos=True))
        engine.submit(req)
        while not started.is_set():
            await asyncio.sleep(0.005)
        engine.cancel(req)
        await asyncio.sleep(0.05)
        slots_while_running = len(engine.free_slots)
        gate.set()
        for _ in range(500):
            if len(engine.free_slots) == 4:
                break
            await asyncio.sleep(0.01)
        after = (len(engine.free_slots), list(engine.running), list(req.generated))
        held["on"] = False
        nxt = Request([5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True))
        engine.submit(nxt)
        got = await _drain(nxt)
        await engine.stop()
        return slots_while_running, after, got

    slots_while_running, after, got = asyncio.run(go())
    assert slots_while_running == 3  # held by the chunk in flight
    assert after == (4, [], [])  # dropped after it, with no token
    assert got == (3, None)



def test_a_prompt_cancelled_during_its_overlapped_prefill_harms_no_decoding_stream():
    """A client that leaves while its prompt is on the prefill thread (a load generator's stage
    ending): its prompt is done when the prefill returns, but it has no token. It must not join
    the next decode step (it has no input token; that step once failed with an IndexError, and
    every stream in it with it): the streams decoding beside it get every token."""
    model = build_tiny("tiny-mamba2")
    engine, gate, started, held = _engine_with_held_prefill(model, prefill_overlap=True)

    async def go():
        stream, leaving = await _a_prompt_held_beside_a_stream(engine, started, held, 300, 4)
        engine.cancel(leaving)
        held["on"] = False
        gate.set()
        got = await _drain(stream)
        await engine.stop()
        return got, leaving.generated

    got, leaving = asyncio.run(go())
    assert got == (300, None) and leaving == []  # every token of the stream beside it
    assert not engine.running and len(engine.free_slots) == 4


def test_a_defect_in_the_loop_fails_every_request_and_says_why_not_a_silent_hang():
    """Were the engine loop itself to raise (a defect; injected here in the emitting of tokens),
    every stream would wait for tokens that never come and /health would go on saying ready.
    Instead: each request in the engine ends with an error naming the cause, and new requests
    (and /health, tests/integration) get 503."""
    from servers.ssm_server.protocol import APIError

    model = build_tiny("tiny-mamba2")
    backend = HFBackend(ServerConfig(model=str(model), max_num_seqs=2))
    engine = Engine(backend, HFText(str(model)), ServerMetrics("m", lambda: {}), max_queue=16,
                    prefill_chunk_size=64, model_name="m")

    def defect(results, now):
        raise RuntimeError("injected defect")

    engine._emit_all = defect

    async def run():
        await engine.start()
        engine.ready = True
        reqs = [Request(list(range(5, 30)), SamplingParams(max_tokens=8)) for _ in range(3)]  # 2 slots: one waits
        for r in reqs:
            engine.submit(r)
        out = await asyncio.gather(*(_drain(r) for r in reqs))
        with pytest.raises(APIError) as late:
            engine.submit(Request([5, 6], SamplingParams(max_tokens=2)))
        await engine.stop()
        return out, late.value

    out, late = asyncio.run(run())
    assert out == [(0, "the engine stopped (RuntimeError: injected defect)")] * 3
    assert engine.stopped == "RuntimeError: injected defect" and not engine.ready
    assert late.status == 503 and "injected defect" in late.message
    assert not engine.running and len(engine.free_slots) == 2


def test_a_stall_writes_every_threads_stack_into_the_log_once(tmp_path, caplog):
    """A prefill that does not end (here: one held for 1.5 s, past a 0.3 s threshold) while a
    request waits on it: the watch logs the stall once and every thread's stack, the device
    thread's showing where it is held."""
    import time

    model = build_tiny("tiny-mamba2")
    backend = HFBackend(ServerConfig(model=str(model), max_num_seqs=2))
    engine = Engine(backend, HFText(str(model)), ServerMetrics("m", lambda: {}), max_queue=16,
                    prefill_chunk_size=64, model_name="m")
    real = backend.prefill_chunk

    def held_prefill(slot, ids, start):
        time.sleep(1.5)
        return real(slot, ids, start)

    backend.prefill_chunk = held_prefill
    stacks = open(tmp_path / "stacks.txt", "w+")
    engine.stall.after_s, engine.stall.every_s, engine.stall.out = 0.3, 0.05, stacks

    async def run():
        await engine.start()
        req = Request(list(range(5, 30)), SamplingParams(max_tokens=4, ignore_eos=True))
        engine.submit(req)
        out = await _drain(req)
        await engine.stop()
        return out

    with caplog.at_level("WARNING", logger="ssm_server"):
        assert asyncio.run(run()) == (4, None)  # held, not failed
    stacks.seek(0)
    text = stacks.read()
    assert text.count("(most recent call first)") >= 2 and "in held_prefill" in text
    assert sum("a stall" in r.getMessage() for r in caplog.records) == 1  # once per stall


def test_a_step_that_holds_decoding_streams_past_50_ms_is_logged_with_its_prefill(caplog):
    """In-step prefill: a chunk held 0.3 s inside a step stalls the stream decoding beside it;
    the server log says so, with the chunk that did it and the step's own share of the time."""
    model = build_tiny("tiny-mamba2")
    engine, gate, started, held = _engine_with_held_prefill(model)

    async def go():
        stream, beside = await _a_prompt_held_beside_a_stream(engine, started, held, 2000, 2)
        await asyncio.sleep(0.3)
        gate.set()
        got = await _drain(beside)
        engine.cancel(stream)
        await engine.stop()
        return got

    with caplog.at_level("INFO", logger="ssm_server"):
        assert asyncio.run(go()) == (2, None)
    slow = [r.getMessage() for r in caplog.records if r.getMessage().startswith("slow step:")]
    held_step = [m for m in slow if "a prefill chunk of 300 tokens (to 300 of 300, its last)" in m]
    assert len(held_step) == 1, slow
    took, work = (float(x) for x in re.findall(r"([\d.]+) ms", held_step[0])[:2])
    assert "holding 1 decoding streams" in held_step[0] and 300 <= work <= took, held_step[0]
    # its work by part: the held prefill is where the time went, and the parts add up to it
    parts = dict((p, float(ms)) for p, ms in re.findall(r"([a-z][a-z ]+) ([\d.]+)(?= ·| ms\))", held_step[0]))
    assert parts["prefill"] >= 300 and abs(sum(parts.values()) - work) < 1, held_step[0]
