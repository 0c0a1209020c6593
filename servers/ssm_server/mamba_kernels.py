"""mamba_ssm imports for the native backend, one small Triton kernel of our own, and sampling
written with device ops only (so it can sit inside a CUDA graph).

mamba_ssm is used as pure Python over its Triton kernels: the CUDA extension
``selective_scan_cuda`` (Mamba v1's scan, unused by Mamba2) is stubbed when it is not built.
"""

from __future__ import annotations

import functools
import sys
import types

import torch


def import_mamba_ssm() -> str | None:
    """Import what the native backend needs; None when it worked, else the reason."""
    try:
        import triton  # noqa: F401
    except Exception as e:
        return f"triton not importable ({type(e).__name__}: {e})"
    try:
        import selective_scan_cuda  # noqa: F401
    except Exception:
        stub = types.ModuleType("selective_scan_cuda")
        stub.__ctxload_stub__ = True  # mamba_ssm then imports; its Mamba v1 scan does not run
        sys.modules.setdefault("selective_scan_cuda", stub)
    try:
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel  # noqa: F401
        from mamba_ssm.ops.triton.layer_norm import layer_norm_fn  # noqa: F401
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update  # noqa: F401
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined  # noqa: F401
    except Exception as e:
        if scan_stubbed():  # nothing imported with it: leave no stub behind
            del sys.modules["selective_scan_cuda"]
        return f"mamba_ssm not importable ({type(e).__name__}: {e})"
    return None


def scan_stubbed() -> bool:
    """Whether this process stubbed mamba_ssm's CUDA scan (:func:`import_mamba_ssm`): a
    transformers Mamba (v1) loaded after it would take mamba_ssm's scan and fail on the stub."""
    return getattr(sys.modules.get("selective_scan_cuda"), "__ctxload_stub__", False)


@functools.cache
def _conv_kernel():
    """Compiled on first use (Triton is imported only where a kernel runs)."""
    import triton
    import triton.language as tl

    @triton.jit
    def conv_step(x_ptr, state_ptr, w_ptr, b_ptr, out_ptr, idx_ptr, dim, stride_x, stride_sb, stride_sd,
                  stride_o, W: tl.constexpr, BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr):
        """One decode step of the depthwise causal conv for row b, in place on the pooled state
        of slot idx[b] (skipped when idx[b] < 0: a padding row): shift the window left by one,
        append x, out = silu(sum(window * w) + bias). The window is read as one [BLOCK, W] tile
        and written back as one (no load after a store: nothing serialises on memory)."""
        b = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        cols = tl.arange(0, W)
        mask = offs < dim
        slot = tl.load(idx_ptr + b)
        live = slot >= 0
        xn = tl.load(x_ptr + b * stride_x + offs, mask=mask, other=0.0)
        sp = state_ptr + slot.to(tl.int64) * stride_sb + offs[:, None] * stride_sd + cols[None, :]
        # window after the shift: old[1..W-1] then x (padding rows: zeros then x)
        old = tl.load(sp + 1, mask=mask[:, None] & (cols[None, :] < W - 1) & live, other=0.0)
        win = tl.where(cols[None, :] == W - 1, xn[:, None].to(state_ptr.dtype.element_ty), old)
        wt = tl.load(w_ptr + offs[:, None] * W + cols[None, :], mask=mask[:, None], other=0.0)
        acc = tl.sum(win.to(tl.float32) * wt.to(tl.float32), axis=1)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(sp, win, mask=mask[:, None] & live)
        out = acc / (1.0 + tl.exp(-acc))
        tl.store(out_ptr + b * stride_o + offs, out.to(out_ptr.dtype.element_ty), mask=mask)

    return conv_step


def conv_step(x: torch.Tensor, state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              idx: torch.Tensor) -> torch.Tensor:
    """x [B, D] (unit inner stride), state [slots, D, W] (pool, updated in place for idx[b] >= 0),
    weight [D, W] contiguous, idx [B] slot per row. Returns silu(conv) [B, D] in x's dtype."""
    bsz, dim = x.shape
    width = state.shape[-1]
    assert x.stride(-1) == 1 and state.stride(-1) == 1 and weight.is_contiguous()
    out = torch.empty((bsz, dim), dtype=x.dtype, device=x.device)
    assert width & (width - 1) == 0, "conv width must be a power of two"
    block = 128  # 26 CTAs per row at dim 3328 (was 1024: 4 CTAs at batch 1)
    grid = (bsz, (dim + block - 1) // block)
    _conv_kernel()[grid](x, state, weight, bias if bias is not None else weight, out, idx, dim,
                         x.stride(0), state.stride(0), state.stride(1), out.stride(0),
                         W=width, BLOCK=block, HAS_BIAS=bias is not None, num_warps=4)
    return out


def conv_ref(x: torch.Tensor, state: torch.Tensor, weight: torch.Tensor, bias, idx: torch.Tensor):
    """PyTorch reference of ``conv_step`` (non-negative idx only), for tests."""
    win = torch.cat([state[idx, :, 1:], x[:, :, None].to(state.dtype)], dim=-1)
    state[idx] = win
    acc = (win.float() * weight.float()).sum(-1)
    if bias is not None:
        acc = acc + bias.float()
    return torch.nn.functional.silu(acc).to(x.dtype)


@functools.cache
def _conv_chunk_kernel():
    """Compiled on first use, as ``_conv_kernel``."""
    import triton
    import triton.language as tl

    @triton.jit
    def conv_chunk(x_ptr, state_ptr, w_ptr, b_ptr, out_ptr, starts_ptr, L, dim, stride_xt, stride_sd, stride_ot,
                   W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, HAS_BIAS: tl.constexpr,
                   FRESH: tl.constexpr, PACKED: tl.constexpr):
        """The depthwise causal conv of a prefill chunk, a [BLOCK_T, BLOCK_C] tile of it:
        out[t, c] = silu(bias[c] + sum_k w[c, k] * x[t + k - (W-1), c]), where a position before
        the chunk reads the carried window (state[c, W + pos]: its last W-1 inputs), or 0 for a
        fresh sequence. Reads x where it lies (a strided view of in_proj's output): no copy
        of the chunk, no concatenation with the window. PACKED (fresh sequences end to end):
        position t's sequence starts at starts[t], and a position before it reads 0."""
        offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mt = offs_t < L
        mc = offs_c < dim
        acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
        if PACKED:
            first = tl.load(starts_ptr + offs_t, mask=mt, other=0)
        else:
            first = tl.zeros([BLOCK_T], dtype=tl.int32)
        for k in tl.static_range(W):
            src = offs_t - (W - 1) + k
            in_chunk = src >= first
            xv = tl.load(x_ptr + src[:, None].to(tl.int64) * stride_xt + offs_c[None, :],
                         mask=(mt & in_chunk)[:, None] & mc[None, :], other=0.0).to(tl.float32)
            if not FRESH:
                sv = tl.load(state_ptr + offs_c[None, :] * stride_sd + (W + src)[:, None],
                             mask=(mt & (src < 0))[:, None] & mc[None, :], other=0.0).to(tl.float32)
                xv = tl.where(in_chunk[:, None], xv, sv)
            wk = tl.load(w_ptr + offs_c * W + k, mask=mc, other=0.0).to(tl.float32)
            acc += xv * wk[None, :]
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_c, mask=mc, other=0.0).to(tl.float32)[None, :]
        out = acc / (1.0 + tl.exp(-acc))
        tl.store(out_ptr + offs_t[:, None].to(tl.int64) * stride_ot + offs_c[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=mt[:, None] & mc[None, :])

    return conv_chunk


def conv_chunk(x: torch.Tensor, state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               fresh: bool) -> torch.Tensor:
    """silu(causal depthwise conv) of a prefill chunk ``x`` [L, D] (unit inner stride: a slice of
    in_proj's output), continuing the carried window ``state`` [D, W] (its last W-1 inputs; a
    ``fresh`` sequence has none), which then holds the chunk's last W inputs. ``weight`` [D, W]
    contiguous. Returns [L, D] contiguous in x's dtype."""
    length, dim = x.shape
    width = state.shape[-1]
    assert x.stride(-1) == 1 and state.stride(-1) == 1 and weight.is_contiguous()
    out = torch.empty((length, dim), dtype=x.dtype, device=x.device)
    bt, bc = 64, 128
    grid = ((length + bt - 1) // bt, (dim + bc - 1) // bc)
    _conv_chunk_kernel()[grid](x, state, weight, bias if bias is not None else weight, out, out, length, dim,
                               x.stride(0), state.stride(0), out.stride(0), W=width, BLOCK_T=bt, BLOCK_C=bc,
                               HAS_BIAS=bias is not None, FRESH=fresh, PACKED=False, num_warps=4)
    # the window after the chunk (enqueued after the kernel, which read the old one)
    if length >= width:
        state.copy_(x[length - width:].transpose(0, 1))
    else:
        prev = torch.zeros_like(state) if fresh else state.clone()
        state.copy_(torch.cat([prev, x.transpose(0, 1).to(state.dtype)], dim=1)[:, -width:])
    return out


def conv_chunk_ref(x: torch.Tensor, state: torch.Tensor, weight: torch.Tensor, bias, fresh: bool):
    """The PyTorch path ``conv_chunk`` replaces (concatenate, F.conv1d, silu), for checks."""
    width = state.shape[-1]
    prev = torch.zeros_like(state[None, :, 1:]) if fresh else state[None, :, 1:]
    xcat = torch.cat([prev, x.transpose(0, 1)[None].to(state.dtype)], dim=-1)
    state.copy_(xcat[0, :, -width:])
    y = torch.nn.functional.conv1d(xcat, weight[:, None, :], bias, groups=x.shape[1])
    return torch.nn.functional.silu(y)[0].transpose(0, 1).to(x.dtype)


def conv_packed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, starts: torch.Tensor,
                width: int) -> torch.Tensor:
    """silu(causal depthwise conv) of several fresh sequences packed end to end in ``x`` [L, D]
    (unit inner stride), position t's sequence starting at ``starts[t]`` ([L] int32): no position
    sees another sequence's inputs. Returns [L, D] contiguous; the windows to carry are
    ``last_windows``."""
    length, dim = x.shape
    assert x.stride(-1) == 1 and weight.is_contiguous() and starts.shape == (length,)
    out = torch.empty((length, dim), dtype=x.dtype, device=x.device)
    bt, bc = 64, 128
    grid = ((length + bt - 1) // bt, (dim + bc - 1) // bc)
    _conv_chunk_kernel()[grid](x, weight, weight, bias if bias is not None else weight, out, starts, length, dim,
                               x.stride(0), 0, out.stride(0), W=width, BLOCK_T=bt, BLOCK_C=bc,
                               HAS_BIAS=bias is not None, FRESH=True, PACKED=True, num_warps=4)
    return out


def last_windows(x: torch.Tensor, seq_starts: torch.Tensor, seq_ends: torch.Tensor, width: int) -> torch.Tensor:
    """The conv window each packed sequence carries on: its last ``width`` inputs of ``x`` [L, D]
    (zeros before its first), as [n, D, width] — what ``conv_chunk`` leaves in the state."""
    pos = seq_ends[:, None] - width + torch.arange(width, device=x.device)[None, :]  # [n, W]
    win = x[pos.clamp_min(0)]  # [n, W, D]
    win = win.masked_fill((pos < seq_starts[:, None])[..., None], 0)
    return win.transpose(1, 2)


@functools.cache
def _ssu_kernel():
    """Compiled on first use, as ``_conv_kernel``."""
    import triton
    import triton.language as tl

    @triton.jit
    def ssu(state_ptr, x_ptr, dt_ptr, dt_bias_ptr, A_ptr, B_ptr, C_ptr, D_ptr, out_ptr, idx_ptr,
            P, N, ratio, s_slot, s_head, s_p, sx_b, sx_h, sdt_b, sB_b, sB_g, sC_b, sC_g, so_b, so_h,
            BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
        """One Mamba2 decode step of head h for row b (BLOCK_P head-dim rows of it), in place on
        the pooled state of slot idx[b] (padding rows, idx < 0, write zeros and touch no slot):
        dt = softplus(dt + dt_bias); state = state * exp(A dt) + dt B x; y = state . C + D x.
        Scalars per head (A, D, dt, dt_bias) as Mamba2 ties them over the head dim."""
        pid_p = tl.program_id(0)
        b = tl.program_id(1)
        h = tl.program_id(2)
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_n = tl.arange(0, BLOCK_N)
        mp = offs_p < P
        mn = offs_n < N
        optr = out_ptr + b * so_b + h * so_h + offs_p
        slot = tl.load(idx_ptr + b)
        if slot < 0:
            tl.store(optr, tl.zeros([BLOCK_P], dtype=tl.float32).to(out_ptr.dtype.element_ty), mask=mp)
            return
        sp = state_ptr + slot.to(tl.int64) * s_slot + h * s_head + offs_p[:, None] * s_p + offs_n[None, :]
        m2 = mp[:, None] & mn[None, :]
        state = tl.load(sp, mask=m2, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + b * sx_b + h * sx_h + offs_p, mask=mp, other=0.0).to(tl.float32)
        dt = tl.load(dt_ptr + b * sdt_b + h).to(tl.float32) + tl.load(dt_bias_ptr + h).to(tl.float32)
        dt = tl.where(dt <= 20.0, tl.math.log(tl.math.exp(dt) + 1), dt)  # mamba_ssm's softplus
        dA = tl.exp(tl.load(A_ptr + h).to(tl.float32) * dt)
        g = h // ratio
        Bv = tl.load(B_ptr + b * sB_b + g * sB_g + offs_n, mask=mn, other=0.0).to(tl.float32)
        Cv = tl.load(C_ptr + b * sC_b + g * sC_g + offs_n, mask=mn, other=0.0).to(tl.float32)
        state = state * dA + (Bv * dt)[None, :] * x[:, None]
        tl.store(sp, state.to(state_ptr.dtype.element_ty), mask=m2)
        y = tl.sum(state * Cv[None, :], axis=1) + x * tl.load(D_ptr + h).to(tl.float32)
        tl.store(optr, y.to(out_ptr.dtype.element_ty), mask=mp)

    return ssu


SSU_BLOCKS = (4, 8, 16, 32, 64)
"""Head-dim rows per program of ``ssu_step``: small blocks give many programs (batch 1 fills
the GPU), large ones stream more state per program (big batches reach the memory bandwidth)."""


def ssu_step(state, x, dt, A, B, C, D, dt_bias, idx, block_p: int = 16) -> torch.Tensor:
    """Mamba2's ``selective_state_update`` for tied head dims, in place on a slot pool.

    state [slots, H, P, N] (pool; rows idx[b] >= 0 updated), x [B, H, P], dt [B, H] (raw, before
    bias and softplus), A/D/dt_bias [H] (A = -exp(A_log), float32), B/C [B, G, N], idx [B].
    Returns y [B, H, P] in x's dtype (zeros for padding rows). Unlike mamba_ssm's kernel (4
    head-dim rows per program at N = 128), the block is a parameter: ``pick_ssu_block`` times
    them once per batch size on scratch state and keeps the fastest."""
    bsz, H, P = x.shape
    N = state.shape[-1]
    G = B.shape[1]
    assert state.stride(-1) == 1 and x.stride(-1) == 1 and dt.stride(-1) == 1
    assert B.stride(-1) == 1 and C.stride(-1) == 1 and H % G == 0
    out = torch.empty((bsz, H, P), dtype=x.dtype, device=x.device)
    bn = 1 << (N - 1).bit_length()
    grid = ((P + block_p - 1) // block_p, bsz, H)
    _ssu_kernel()[grid](state, x, dt, dt_bias, A, B, C, D, out, idx, P, N, H // G,
                        state.stride(0), state.stride(1), state.stride(2), x.stride(0), x.stride(1),
                        dt.stride(0), B.stride(0), B.stride(1), C.stride(0), C.stride(1),
                        out.stride(0), out.stride(1), BLOCK_P=block_p, BLOCK_N=bn,
                        num_warps=8 if block_p * bn >= 4096 else 4)
    return out


def ssu_ref(state, x, dt, A, B, C, D, dt_bias, idx):
    """PyTorch reference of ``ssu_step`` (non-negative idx only), for tests."""
    H, G = x.shape[1], B.shape[1]
    dtv = torch.nn.functional.softplus(dt.float() + dt_bias.float())  # [B, H]
    Bh = B.float().repeat_interleave(H // G, dim=1)  # [B, H, N]
    Ch = C.float().repeat_interleave(H // G, dim=1)
    s = state[idx].float()
    s = s * torch.exp(A.float()[None, :] * dtv)[:, :, None, None] + (dtv[:, :, None] * Bh)[:, :, None, :] * x.float()[..., None]
    state[idx] = s.to(state.dtype)
    return ((s * Ch[:, :, None, :]).sum(-1) + D.float()[None, :, None] * x.float()).to(x.dtype)


def graph_time_us(fn, reps: int = 50) -> float:
    """Device time of one ``fn()`` in microseconds: ``reps`` calls captured in one CUDA graph and
    replayed (a host-timed loop of Triton launches measures the launcher, not the kernel)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # JIT outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):  # not the default capture stream: freeing this
        for _ in range(reps):                  # graph must not touch the decode graphs' workspace
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps * 1e3


def pick_ssu_block(bsz: int, H: int, P: int, N: int, G: int, dtype, device) -> int:
    """The fastest ``SSU_BLOCKS`` entry for a batch of ``bsz`` rows, timed in a CUDA graph on
    scratch tensors (the live slot pool is never touched); 16 where timing fails."""
    try:
        st = torch.zeros((bsz, H, P, N), dtype=dtype, device=device)
        x = torch.randn((bsz, H, P), dtype=dtype, device=device)
        dt = torch.randn((bsz, H), dtype=dtype, device=device)
        BC = torch.randn((2, bsz, G, N), dtype=dtype, device=device)
        hv = torch.rand((3, H), dtype=torch.float32, device=device)
        idx = torch.arange(bsz, device=device)
        times = {bp: graph_time_us(lambda bp=bp: ssu_step(st, x, dt, -hv[0], BC[0], BC[1], hv[1], hv[2], idx, bp))
                 for bp in SSU_BLOCKS if bp <= max(P, 4)}
    except (torch.cuda.OutOfMemoryError, RuntimeError):
        return 16
    return min(times, key=times.get)


def sample_on_device(logits: torch.Tensor, temp: torch.Tensor, topk: torch.Tensor, topp: torch.Tensor,
                     ban: torch.Tensor, greedy_only: bool) -> torch.Tensor:
    """Tokens [B] from logits [B, V] float32 with per-row temperature (0 = greedy), top-k (<= 0:
    off), top-p (1: off) and one banned id per row (-1: none). Device ops only, no host sync:
    capturable in a CUDA graph. Random draws use the exponential race (argmax p / E), which
    samples exactly from p."""
    bsz, vocab = logits.shape
    rows = torch.arange(bsz, device=logits.device)
    col = ban.clamp_min(0)
    old = logits[rows, col]
    logits[rows, col] = torch.where(ban >= 0, torch.full_like(old, float("-inf")), old)
    greedy = logits.argmax(dim=-1)
    if greedy_only:
        return greedy
    scaled = logits / temp.clamp_min(1e-6)[:, None]
    vals, order = scaled.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(topk > 0, topk, torch.full_like(topk, vocab))[:, None]
    vals = vals.masked_fill(rank >= k, float("-inf"))
    probs = vals.softmax(dim=-1)
    keep = (probs.cumsum(dim=-1) - probs) <= topp[:, None]
    probs = probs.masked_fill(~keep, 0.0)
    race = probs / torch.empty_like(probs).exponential_()
    drawn = order.gather(1, race.argmax(dim=-1, keepdim=True))[:, 0]
    return torch.where((temp == 0) | (topk == 1), greedy, drawn)
