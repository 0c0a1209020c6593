"""The native mamba_ssm backend (GPU, bf16): chunked prefill and graph decode give the same
logits as mamba_ssm's own one-shot forward. Skips without CUDA + mamba_ssm, saying which."""

from __future__ import annotations

import pytest

from servers.ssm_server.mamba_check import skip_reason

_WHY = skip_reason()
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"native backend check: {_WHY}")

TOL = 0.03  # max |logit diff| over the logit scale, bf16 (the scale's bf16 step is ~0.4% of it)


def _close(a, b) -> bool:
    """Within TOL of b's scale (bf16: the same work in other shapes)."""
    return (a.float() - b.float()).abs().max().item() <= TOL * b.float().abs().max().item()


@pytest.fixture(scope="module")
def backend():
    from servers.ssm_server.backend_mamba import MambaBackend
    from servers.ssm_server.config import ServerConfig

    preset = __import__("os").environ.get("CTXLOAD_GPU_PRESET", "mamba2-780m")
    return MambaBackend(ServerConfig(model=preset, device="cuda", dtype="bfloat16", random_weights=True,
                                     max_num_seqs=8, prefill_chunk_size=4096))


def test_chunked_prefill_and_graph_decode_match_one_forward(backend):
    from servers.ssm_server.mamba_check import check_native

    r = check_native(backend)
    print(r)
    scale = r["logit_scale"]
    for key in ("prefill_chunk_1024", "prefill_chunk_1000", "prefill_chunk_4096", "prefill_chunk_8192",
                "prefill_ragged", "graph_decode", "eager_decode", "batched_graph_decode"):
        assert r[key] <= TOL * scale, (key, r)
    assert r["graph_vs_eager"] <= TOL * scale, r
    assert r["device_greedy_matches_argmax"] == "3/3", r
    assert r["device_sampled_in_vocab"], r


def test_conv_step_kernel_matches_reference():
    import torch

    from servers.ssm_server.mamba_kernels import conv_ref, conv_step

    torch.manual_seed(0)
    x = torch.randn(5, 3328, device="cuda", dtype=torch.bfloat16)
    st = torch.randn(8, 3328, 4, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(3328, 4, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(3328, device="cuda", dtype=torch.bfloat16)
    idx = torch.tensor([3, 0, 6, -1, 5], device="cuda")
    st2 = st.clone()
    out = conv_step(x, st, w, bias, idx)
    real = idx >= 0
    ref = conv_ref(x[real], st2, w, bias, idx[real])
    torch.testing.assert_close(out[real], ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(st, st2)  # padding row (-1) touched no slot


@pytest.mark.parametrize("block_p", [4, 16, 64])
def test_state_update_kernel_matches_reference_and_mamba_ssm(block_p):
    """Our Mamba2 state update (ssu_step) against a float32 PyTorch reference and against
    mamba_ssm's selective_state_update on the same pool, slot indices and padding rows."""
    import torch

    from servers.ssm_server.mamba_check import SSUCase
    from servers.ssm_server.mamba_kernels import ssu_ref

    c = SSUCase(bsz=6, slots=10, groups=2, idx=[7, 0, -1, 3, 9, -1], seed=1)
    pool, idx, slots = c.pool, c.idx, c.pool.shape[0]
    real = idx >= 0
    ours, ref, theirs = pool.clone(), pool.clone(), pool.clone()
    y = c.ours(ours, block_p)
    y_ref = ssu_ref(ref, c.x[real], c.dt[real], c.A, c.B[real], c.C[real], c.D, c.dt_bias, idx[real])
    y_mamba = c.mamba_ssm(theirs)
    torch.testing.assert_close(y[real], y_ref, atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(ours, ref, atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(y, y_mamba, atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(ours, theirs, atol=3e-2, rtol=2e-2)
    assert (y[~real] == 0).all()
    untouched = torch.ones(slots, dtype=torch.bool, device=idx.device)
    untouched[idx[real]] = False
    assert torch.equal(ours[untouched], pool[untouched])  # padding rows touched no slot


def _greedy_decode(backend, slots, first, n):
    """n pipelined greedy decode steps of ``slots`` from tokens ``first``: each step's tokens."""
    from servers.ssm_server.sampling import SamplingParams

    g = [SamplingParams(temperature=0.0)] * len(slots)
    out, h = [], backend.decode_launch(slots, first, g, [[]] * len(slots))
    for _ in range(n - 1):
        nxt = backend.decode_launch(slots, [-1] * len(slots), g, [[]] * len(slots))
        out.append(backend.decode_collect(h))
        h = nxt
    out.append(backend.decode_collect(h))
    return out


def test_pipelined_decode_matches_synchronous(backend):
    """Launching step N+1 (input token fed on the device) before reading step N back gives the
    same greedy tokens as the synchronous step with host-fed tokens."""
    import torch

    from servers.ssm_server.sampling import SamplingParams

    g = SamplingParams(temperature=0.0)
    ids = torch.randint(1, backend.vocab_size, (600,)).tolist()
    t0 = int(backend.prefill_chunk(0, ids, 0).argmax())
    backend.conv_pool[:, 1].copy_(backend.conv_pool[:, 0])
    backend.ssm_pool[:, 1].copy_(backend.ssm_pool[:, 0])
    sync, tok = [], t0
    for _ in range(16):
        tok = backend.decode_sample([0], [tok], [g], [[]], [None])[0]
        sync.append(tok)
    piped = [step[0] for step in _greedy_decode(backend, [1], [t0], 16)]
    assert piped == sync


def test_every_decode_bucket_is_captured_greedy_and_sampling_before_the_first_request(backend):
    """Both graphs of every batch bucket exist once the backend is built, so a sampled batch
    (temperature, top-p) of a size not seen before replays one: a capture then would stall every
    stream in that step for seconds."""
    from servers.ssm_server.sampling import SamplingParams

    dec = backend.decoder
    assert set(dec.set.graphs) == {(s, g) for s in dec.set.sizes for g in (True, False)}
    before = dict(dec.set.graphs)
    tokens = backend.decode_sample([0, 1, 2], [5, 6, 7], [SamplingParams(temperature=0.8, top_p=0.9)] * 3,
                                   [[], [], []], [None] * 3)
    assert all(0 <= t < backend.vocab_size for t in tokens) and dec.set.graphs == before


def test_prefill_on_its_stream_beside_pipelined_decode_matches_alone(backend):
    """The engine's prefill overlap: a prompt prefilled on the prefill thread (low-priority
    stream) while pipelined decode steps run on the device thread (high-priority stream) gives
    the decoding rows the tokens they get alone, and the prompt the logits and continuation it
    gets alone — also when its slot was in a decode step still in flight as it started (the
    chunk waits for the decode stream)."""
    import concurrent.futures

    import torch

    from servers.ssm_server.sampling import SamplingParams

    g = SamplingParams(temperature=0.0)
    gen = torch.Generator().manual_seed(1)
    p = torch.randint(1, backend.vocab_size, (700,), generator=gen).tolist()
    q = torch.randint(1, backend.vocab_size, (3000,), generator=gen).tolist()
    dev = concurrent.futures.ThreadPoolExecutor(1, initializer=backend.device_thread)
    pre = concurrent.futures.ThreadPoolExecutor(1, initializer=backend.prefill_thread)

    def prefill(slot, ids, chunk=1024):
        for s in range(0, len(ids), chunk):
            logits = backend.prefill_chunk(slot, ids[s:s + chunk], s)
        # done before another stream reads the logits or decodes the slot, as the engine's
        # sampling of the first token on the prefill thread waits for it (a replayed chunk
        # returns before the device has run it)
        torch.cuda.current_stream().synchronize()
        return logits

    def decode(slots, first, n):
        return _greedy_decode(backend, slots, first, n)

    def first_tokens(slots):
        return [int(dev.submit(prefill, s, p).result().argmax()) for s in slots]

    # alone: rows 1, 2 decode 40 steps; q prefilled into slot 3, then 8 steps of it
    t12 = first_tokens([1, 2])
    ref_rows = dev.submit(decode, [1, 2], t12, 40).result()
    ref_q = dev.submit(prefill, 3, q).result()
    ref_q_steps = dev.submit(decode, [3], [int(ref_q.argmax())], 8).result()
    # beside: slot 0 decodes with rows 1, 2 (so a step in flight holds it), then q goes into
    # slot 0 on the prefill stream while rows 1, 2 decode on
    first_tokens([1, 2])
    t0 = first_tokens([0])
    busy = dev.submit(decode, [0, 1, 2], t0 + t12, 1).result()  # noqa: F841 - slot 0 in a finished step
    h = dev.submit(backend.decode_launch, [0, 1, 2], [-1] * 3, [g] * 3, [[]] * 3).result()
    q_fut = pre.submit(prefill, 0, q)  # slot 0's step above may still be in flight
    dev.submit(backend.decode_collect, h).result()
    first_tokens([1, 2])  # rows 1, 2 restart from their prompt
    rows = dev.submit(decode, [1, 2], t12, 40)
    got_q = q_fut.result()
    got_rows = rows.result()
    got_q_steps = dev.submit(decode, [0], [int(got_q.argmax())], 8).result()
    dev.shutdown()
    pre.shutdown()
    scale = ref_q.abs().max().item()
    assert got_rows == ref_rows
    assert (got_q - ref_q).abs().max().item() <= TOL * scale
    assert got_q_steps == ref_q_steps


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graph"])
def test_packed_prefill_equals_each_prompt_alone(backend, graphs):
    """Several fresh prompts in one packed forward (``prefill_packed``, eagerly or as a replay
    of a prefill graph): each gets the logits, the carried conv window and SSM state, and the
    next decode step's logits it gets prefilled alone and eagerly (within bf16: the pack's
    matmuls have other shapes) — lengths shorter than the conv window, across mamba_ssm's
    256-token scan chunks, a sequence ending on a chunk edge; a slot not in the pack is left as
    it was. With graphs, each prompt alone is a replay too (a pack of one)."""
    import torch

    gen = torch.Generator().manual_seed(2)
    lens = [3, 700, 1, 256, 45, 1029]
    prompts = [torch.randint(1, backend.vocab_size, (n,), generator=gen).tolist() for n in lens]
    slots = [5, 0, 3, 1, 4, 2]
    held = backend.prefill_graphs
    assert held is not None and len(held.set.graphs) == 5 * 3 + 5, \
        "packs of 256 to 4096 tokens for 1/8/64 prompts, and continuation chunks of those lengths"
    try:
        backend.prefill_graphs = None
        alone = torch.stack([backend.prefill_chunk(s, p, 0) for s, p in zip(slots, prompts)])
        conv = backend.conv_pool[:, slots].clone()
        ssm = backend.ssm_pool[:, slots].clone()
        nxt = alone.argmax(-1).tolist()
        step = backend.decode(slots, nxt, [0] * len(slots))
        backend.prefill_graphs = held if graphs else None
        if graphs:  # each alone, replayed
            assert _close(torch.stack([backend.prefill_chunk(s, p, 0) for s, p in zip(slots, prompts)]), alone)
        backend.conv_pool[:, slots] = 7  # what a pack must overwrite
        backend.ssm_pool[:, slots] = 7
        spare = backend.num_slots - 1  # not packed: untouched
        backend.ssm_pool[:, spare] = 3
        got = backend.prefill_packed(slots, prompts)
        torch.cuda.synchronize()
    finally:
        backend.prefill_graphs = held
    assert got.shape == (len(lens), backend.vocab_size)
    for j in range(len(lens)):
        assert _close(got[j], alone[j]), (j, lens[j])
        assert _close(backend.conv_pool[:, slots[j]], conv[:, j]), (j, lens[j])
        assert _close(backend.ssm_pool[:, slots[j]], ssm[:, j]), (j, lens[j])
    assert bool((backend.ssm_pool[:, spare] == 3).all())
    assert _close(backend.decode(slots, nxt, [0] * len(slots)), step)


def test_prefill_graphs_beside_decode_graphs_finish_and_match_alone(backend):
    """``--prefill-overlap`` with both kinds of graphs: packs replayed from the prefill graphs on
    the prefill thread, again and again, while decode graphs replay on the device thread. Each
    set of graphs captures on a stream of its own (on ``torch.cuda.graph``'s shared default one
    they embedded the same cuBLAS workspace, and replayed at once the GPU hung: cuda_graphs.py);
    both finish, the decoding rows get the tokens they get alone, each pack its logits alone."""
    import concurrent.futures

    import torch

    held = backend.prefill_graphs
    assert held is not None and held.set.stream is not None and backend.decoder.set.stream is not None
    assert held.set.stream != backend.decoder.set.stream
    gen = torch.Generator().manual_seed(3)
    row_prompt = torch.randint(1, backend.vocab_size, (500,), generator=gen).tolist()
    packs = [[torch.randint(1, backend.vocab_size, (900,), generator=gen).tolist() for _ in range(4)]
             for _ in range(3)]  # 3,600 tokens: the 4,096 graph
    rows, pack_slots = [6, 7], [0, 1, 2, 3]
    assert held.bucket(4, 3600) == (4096, 9)
    dev = concurrent.futures.ThreadPoolExecutor(1, initializer=backend.device_thread)
    pre = concurrent.futures.ThreadPoolExecutor(1, initializer=backend.prefill_thread)

    def start_rows():
        return [int(backend.prefill_chunk(s, row_prompt, 0).argmax()) for s in rows]

    def decode_rows(n):
        return _greedy_decode(backend, rows, start_rows(), n)

    def replay_packs(times):
        return [backend.prefill_packed(pack_slots, packs[i % 3]) for i in range(times)][-3:]

    try:
        ref_rows = dev.submit(decode_rows, 300).result(timeout=120)
        ref_packs = pre.submit(replay_packs, 3).result(timeout=120)
        got_rows = dev.submit(decode_rows, 300)
        got_packs = pre.submit(replay_packs, 30)
        got_packs, got_rows = got_packs.result(timeout=120), got_rows.result(timeout=120)
    finally:
        dev.shutdown(wait=False)
        pre.shutdown(wait=False)
    assert got_rows == ref_rows
    for got, ref in zip(got_packs, ref_packs):
        assert (got - ref).abs().max().item() <= TOL * ref.abs().max().item()


def test_continued_chunks_replayed_equal_eager_chunks(backend):
    """A long prompt in chunks of many lengths: each later chunk replayed from a continuation
    graph, padded past its length (700 of 1,024 tokens, 2,048 of 2,048, 1,249 of 2,048, 4 of
    256: the conv window's width), gives the logits, conv window and SSM state the same chunks
    give run eagerly, and so does the decode step after it; a chunk shorter than the conv window
    runs eagerly; no other slot changes."""
    import torch

    gen = torch.Generator().manual_seed(4)
    chunks = [1000, 700, 2048, 3, 1249, 256, 4]
    ids = torch.randint(1, backend.vocab_size, (sum(chunks),), generator=gen).tolist()
    slot, spare = 2, 6
    held = backend.prefill_graphs
    assert [k for k in held.continued if k in held.set.graphs] == [(t, 0) for t in (256, 512, 1024, 2048, 4096)]
    assert held.continued_bucket(3) is None and held.continued_bucket(4) == (256, 0)
    assert held.continued_bucket(4097) is None

    def prefill():
        out, pos = [], 0
        for c in chunks:
            out.append(backend.prefill_chunk(slot, ids[pos:pos + c], pos))
            pos += c
        nxt = int(out[-1].argmax())
        state = backend.conv_pool[:, slot].clone(), backend.ssm_pool[:, slot].clone()
        return torch.stack(out), state, backend.decode([slot], [nxt], [pos])

    replayed = []
    run_continued = held.run_continued

    def spy(s, chunk):
        out = run_continued(s, chunk)
        replayed.append(out is not None)
        return out

    try:
        backend.prefill_graphs = None
        ref, (ref_conv, ref_ssm), ref_step = prefill()
        backend.prefill_graphs = held
        backend.conv_pool[:, spare] = 3
        backend.ssm_pool[:, spare] = 3
        held.run_continued = spy
        got, (conv, ssm), step = prefill()
        torch.cuda.synchronize()
    finally:
        backend.prefill_graphs = held
        del held.run_continued
    assert replayed == [True, True, False, True, True, True]
    for j, c in enumerate(chunks):
        assert _close(got[j], ref[j]), (j, c)
    assert _close(conv, ref_conv) and _close(ssm, ref_ssm)
    assert _close(step, ref_step)
    assert bool((backend.conv_pool[:, spare] == 3).all()) and bool((backend.ssm_pool[:, spare] == 3).all())


def test_a_chunk_up_to_twice_the_largest_graph_is_replayed_in_pieces(backend):
    """A fresh chunk of 7,000 tokens and a later one of 6,000 (the graphs here hold up to 4,096)
    each run as two replays (4,096 + the rest), and give the logits, window and state one eager
    forward of each gives; a chunk past twice the largest graph runs eagerly."""
    import torch

    gen = torch.Generator().manual_seed(5)
    chunks = [7000, 6000]
    ids = torch.randint(1, backend.vocab_size, (sum(chunks) + 9000,), generator=gen).tolist()
    held, slot = backend.prefill_graphs, 3
    assert held.largest_piece() == 4096
    calls = []
    run, run_continued = held.run, held.run_continued

    def spy_run(slots, prompts):
        calls.append(("fresh", sum(len(p) for p in prompts)))
        return run(slots, prompts)

    def spy_continued(s, chunk):
        calls.append(("continued", len(chunk)))
        return run_continued(s, chunk)

    def prefill(sizes):
        out, pos = [], 0
        for c in sizes:
            out.append(backend.prefill_chunk(slot, ids[pos:pos + c], pos))
            pos += c
        return torch.stack(out), backend.conv_pool[:, slot].clone(), backend.ssm_pool[:, slot].clone()

    try:
        backend.prefill_graphs = None
        ref = prefill(chunks)
        backend.prefill_graphs = held
        held.run, held.run_continued = spy_run, spy_continued
        got = prefill(chunks)
        torch.cuda.synchronize()
        assert calls == [("fresh", 7000), ("fresh", 4096), ("continued", 2904),
                         ("continued", 6000), ("continued", 4096), ("continued", 1904)], calls
        calls.clear()
        backend.prefill_chunk(slot, ids[:8193 + 9000], 0)  # past twice 4,096: one eager forward
        assert calls == [("fresh", 17193)], calls
    finally:
        backend.prefill_graphs = held
        del held.run, held.run_continued
    for a, b in zip(got, ref):
        assert _close(a, b)


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_fused_norm_projection_matches_norm_then_matmul(rows):
    """``mamba_gemv.project`` in each mode (plain, gated norm, add + norm writing the float32
    residual, first-layer norm) against the float32 reference, for every block config, at the
    model's projection shapes."""
    import torch

    from servers.ssm_server import mamba_gemv as g
    from servers.ssm_server.mamba_check import gemv_cases

    torch.manual_seed(rows)
    dev, bf = "cuda", torch.bfloat16
    for n, k in ((6448, 1536), (1536, 3072)):
        w = torch.randn(n, k, device=dev, dtype=bf) / k ** 0.5
        big = torch.randn(rows, k + 100, device=dev, dtype=bf)  # strided rows, as in_proj's z view
        x, z = torch.randn(rows, k, device=dev, dtype=bf), big[:, :k]
        r = torch.randn(rows, k, device=dev, dtype=torch.float32)
        nw = 1 + 0.1 * torch.randn(k, device=dev, dtype=bf)
        for mode, cfg, got, ref, got_r, ref_r in gemv_cases(x, w, z, r, nw):
            torch.testing.assert_close(got, ref, atol=3e-2, rtol=2e-2, msg=lambda m: f"{mode} {cfg} {n}x{k}: {m}")
            if mode >= g.ADD_NORM:
                torch.testing.assert_close(got_r, ref_r, atol=1e-5, rtol=1e-5)
            else:
                assert got_r is None


def test_fused_decoder_agrees_with_norm_kernels_and_cublas(backend):
    """A decoder that fuses each norm into the projection after it (batches up to 8; the served
    one does where timing finds it faster) and one with the norm kernels and cuBLAS
    (``CTXLOAD_GEMV=cublas``) give the same logits from the same states, in graphs and
    eagerly."""
    import torch

    from servers.ssm_server.mamba_decode import NativeDecoder

    fused = NativeDecoder(backend, backend.num_slots, fused=True)
    assert fused.block(4) is not None and fused.fuses(4) and not fused.fuses(16)
    gen = torch.Generator().manual_seed(5)
    for s in (0, 1, 2):
        backend.prefill_chunk(s, torch.randint(1, backend.vocab_size, (300 + 100 * s,), generator=gen).tolist(), 0)
    backend.conv_pool[:, 3:6].copy_(backend.conv_pool[:, 0:3])
    backend.ssm_pool[:, 3:6].copy_(backend.ssm_pool[:, 0:3])
    plain = NativeDecoder(backend, backend.num_slots, fused=False)
    toks = [11, 12, 13]
    fused.block(16)
    assert not fused.fuses(16) and not plain.fused
    assert _close(fused.logits([0, 1, 2], toks), plain.logits([3, 4, 5], toks))
    assert _close(fused.logits([0, 1, 2], toks, eager=True), plain.logits([3, 4, 5], toks, eager=True))
    assert _close(backend.conv_pool[:, 0:3], backend.conv_pool[:, 3:6])
    assert _close(backend.ssm_pool[:, 0:3], backend.ssm_pool[:, 3:6])


def test_a_first_token_beside_decoding_streams_is_read_in_a_later_step(backend):
    """In-step engine: a prompt whose prefill ends beside a launched decode step gets its first
    token sampled on the device and read back in a later step (reading it at once would hold the
    step, and the stream in it, until the device ran everything queued) — and nothing in that
    sampling waits for the device (PyTorch's sync debug mode set to raise). The token is the one
    it gets alone (the same prefill graph, greedy, EOS banned); the stream beside it goes on."""
    import asyncio

    import torch

    from servers.ssm_server.engine import Engine
    from servers.ssm_server.metrics import ServerMetrics
    from servers.ssm_server.request import Request
    from servers.ssm_server.sampling import SamplingParams
    from servers.ssm_server.textio import HFText

    engine = Engine(backend, HFText(str(backend.path)), ServerMetrics("m", lambda: {}), max_queue=16,
                    prefill_chunk_size=4096, model_name="m")
    deferred, synced = [], []
    real = engine._defer_first

    def no_sync(logits, reqs):  # an op that waits for the device here raises (and is recorded)
        deferred.append(len(reqs))
        torch.cuda.set_sync_debug_mode("error")
        try:
            real(logits, reqs)
        except RuntimeError as e:
            synced.append(str(e))
            raise
        finally:
            torch.cuda.set_sync_debug_mode("default")

    engine._defer_first = no_sync
    prompt = torch.randint(1, backend.vocab_size, (3000,), generator=torch.Generator().manual_seed(6)).tolist()

    async def drain(req):
        while (ev := await asyncio.wait_for(req.out.get(), 120)).kind == "token" and not ev.finish_reason:
            pass
        assert ev.kind == "token", ev.text

    async def go():
        await engine.start()
        alone = Request(prompt, SamplingParams(max_tokens=8, ignore_eos=True, temperature=0.0))
        engine.submit(alone)
        await drain(alone)
        assert deferred == []  # nothing decoding beside it: read at once
        stream = Request([5, 6, 7], SamplingParams(max_tokens=100_000, ignore_eos=True))
        engine.submit(stream)
        while not stream.generated:
            await asyncio.sleep(0.01)
        beside = Request(prompt, SamplingParams(max_tokens=8, ignore_eos=True, temperature=0.0))
        engine.submit(beside)
        at = len(stream.generated)
        await drain(beside)
        went_on = len(stream.generated) - at
        engine.cancel(stream)
        await engine.stop()
        return alone.generated, beside.generated, went_on

    toks_alone, toks_beside, went_on = asyncio.run(go())
    assert deferred == [1] and synced == []  # (the EOS mask as an indexed assignment waited here)
    assert toks_beside[0] == toks_alone[0] and len(toks_beside) == 8
    assert went_on >= 8
