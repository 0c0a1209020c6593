"""mamba_ssm imports for the native backend, one small Triton kernel of our own, and sampling
written with device ops only (so it can sit inside a CUDA graph).

mamba_ssm is used as pure Python over its Triton kernels: the CUDA extension
``selective_scan_cuda`` (Mamba v1's scan, unused by Mamba2) is stubbed when it is not built.
"""

from __future__ import annotations

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
        sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
    try:
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel  # noqa: F401
        from mamba_ssm.ops.triton.layer_norm import layer_norm_fn  # noqa: F401
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update  # noqa: F401
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined  # noqa: F401
    except Exception as e:
        return f"mamba_ssm not importable ({type(e).__name__}: {e})"
    return None


_CONV_KERNEL = None


def _conv_kernel():
    global _CONV_KERNEL
    if _CONV_KERNEL is not None:
        return _CONV_KERNEL
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

    _CONV_KERNEL = conv_step
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
