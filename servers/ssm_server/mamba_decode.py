"""Batched decode for the native mamba_ssm backend, one CUDA graph per batch-size bucket.

A graph covers the whole step: embedding of the input tokens → every layer (fused add+RMSNorm,
in_proj, the conv step and ``selective_state_update`` working in place on the pooled state of
each row's slot through ``state_batch_indices``, gated RMSNorm, out_proj) → final norm →
lm_head → sampling (greedy, temperature, top-k, top-p on the device). There is no gather and no
scatter of states: the two state kernels index the pool directly. Rows past the real batch are
padding: their slot index is -1, which both state kernels skip.

Inputs live in one static device buffer (slot ids, input tokens, top-k, banned id; temperature
and top-p as float32 bits), filled each step by ONE copy from pinned host memory. The graph also
keeps each slot's last sampled token on the device (``last_tok``) and writes the step's samples
there, so step N+1 can be launched before step N's tokens reach the host: a row whose input
token is -1 reads its slot's last token on the device. ``launch`` enqueues the input copy, the
replay, a non-blocking copy of the sampled ids into a pinned buffer and an event, and returns at
once; ``collect`` waits on that event (the only host sync) — the engine launches step N+1 and
then collects step N, so the host's per-token work runs beside the device step. Pinned inputs,
outputs and events are double-buffered. Requests with their own ``seed`` sample on the host's
generator path (``sampling.sample``) from the graph's logits (synchronous).
"""

from __future__ import annotations

import logging

import torch

from servers.ssm_server import mamba_gemv
from servers.ssm_server.cuda_graphs import GraphSet
from servers.ssm_server.mamba_kernels import conv_step, pick_ssu_block, sample_on_device, ssu_step
from servers.ssm_server.sampling import sample
from servers import settings

log = logging.getLogger("ssm_server")


def fusable(backend) -> bool:
    """Whether the model's layers fit ``mamba_gemv``'s fused norm + projection: no projection
    bias, RMSNorm before each mixer with the residual in float32, one gated-norm group, gate
    applied before the norm."""
    bb = backend.model.backbone
    return bool(bb.residual_in_fp32) and all(
        layer.mixer.in_proj.bias is None and layer.mixer.out_proj.bias is None
        and getattr(layer.norm, "bias", None) is None and type(layer.norm).__name__ == "RMSNorm"
        and getattr(layer.mixer.norm, "group_size", 0) in (None, backend.d_ssm)
        and not getattr(layer.mixer.norm, "norm_before_gate", True) for layer in backend.layers)


class NativeDecoder:
    def __init__(self, backend, max_batch: int, use_graphs: bool = True, fused: bool | None = None):
        from mamba_ssm.ops.triton.layer_norm import layer_norm_fn
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update

        self._ln = layer_norm_fn
        self._ssu = selective_state_update
        self.b = backend
        self.use_graphs = use_graphs
        self.set = GraphSet(max_batch)  # keyed (batch size, greedy only)
        self.max = self.set.sizes[-1]
        dev = backend.device
        # one static input block: rows 0..3 long (slot, input token or -1, top-k, banned id),
        # row 4 holds two float32 rows (temperature, top-p) in its bits
        self.d_in = torch.zeros((5, self.max), dtype=torch.long, device=dev)
        self.d_long = self.d_in[:4]
        self.d_float = self.d_in[4].view(torch.float32).view(2, self.max)
        self.h_in = [torch.zeros((5, self.max), dtype=torch.long).pin_memory() for _ in range(2)]
        self.h_out = [torch.zeros((self.max,), dtype=torch.long).pin_memory() for _ in range(2)]
        self.done = [torch.cuda.Event() for _ in range(2)]
        self.copied = [torch.cuda.Event() for _ in range(2)]  # pinned inputs reusable once passed
        for e in self.copied:
            e.record()
        self._buf = 0
        # the last sampled token of every slot (+1 scratch entry that padding rows write)
        self.scratch = backend.num_slots
        self.last_tok = torch.zeros((backend.num_slots + 1,), dtype=torch.long, device=dev)
        # per-layer constants in the shapes the chosen state-update kernel wants
        H, P, N = backend.nheads, backend.headdim, backend.d_state
        # the state update: our own kernel (block of head-dim rows per program picked per batch
        # size by timing) unless CTXLOAD_SSU=mamba asks for mamba_ssm's selective_state_update
        self.own_ssu = settings.own_state_update()
        self.ssu_block: dict[int, int] = {}
        # batches up to mamba_gemv.MAX_ROWS: each projection one kernel with its norm fused in,
        # where timing finds it faster (fused=True: always), unless CTXLOAD_GEMV=cublas asks for
        # the norm kernels and cuBLAS
        self.fused = (settings.fused_projections() if fused is None else fused) and fusable(backend)
        self.fuse_timed = fused is None
        self.gemv_config: dict[int, tuple] = {}
        """Per batch size it fuses at: (in_proj's, out_proj's) ``mamba_gemv`` config."""
        self.consts = []
        for i, layer in enumerate(backend.layers):
            m = layer.mixer
            A = -torch.exp(m.A_log.float())
            if self.own_ssu:  # [H] scalars per head
                ssu = (A.contiguous(), m.D.reshape(H).contiguous(), m.dt_bias.reshape(H).contiguous())
            else:  # stride-0 head_dim: mamba_ssm's tied-head_dim fast path
                ssu = (A[:, None, None].expand(H, P, N), m.D[:, None].expand(H, P), m.dt_bias[:, None].expand(H, P))
            self.consts.append(ssu + (backend.conv_weights[i],))

    def block(self, size: int) -> int:
        """The state-update block for this batch size, timed once (never inside a capture), and
        the fused projections' blocks where they serve it."""
        if size not in self.ssu_block:
            b = self.b
            self.ssu_block[size] = pick_ssu_block(size, b.nheads, b.headdim, b.d_state, b.ngroups,
                                                  b.ssm_pool.dtype, b.device) if self.own_ssu else 0
            if self.fused and size <= mamba_gemv.MAX_ROWS:
                m = b.layers[0].mixer
                cfg = (mamba_gemv.pick(size, m.in_proj.weight, mamba_gemv.ADD_NORM),
                       mamba_gemv.pick(size, m.out_proj.weight, mamba_gemv.GATED))
                if not self.fuse_timed or self._fusing_pays(size, cfg):
                    self.gemv_config[size] = cfg
        return self.ssu_block[size]

    def fuses(self, size: int) -> bool:
        """Whether a step of ``size`` rows runs the fused norm + projection kernels (known once
        ``block(size)`` ran)."""
        return size in self.gemv_config

    def _fusing_pays(self, size: int, cfg: tuple) -> bool:
        """Whether one layer's two fused projections beat its norm kernels and cuBLAS at this
        batch size, timed on scratch inputs with the first layer's weights."""
        from servers.ssm_server.mamba_kernels import graph_time_us

        b, g = self.b, mamba_gemv
        layer = b.layers[0]
        m = layer.mixer
        d = m.in_proj.weight.shape[1]
        h = torch.randn((size, d), dtype=b.dtype, device=b.device)
        res = torch.randn((size, d), dtype=torch.float32, device=b.device)
        y, z = torch.randn((2, size, b.d_ssm), dtype=b.dtype, device=b.device)

        def fused():
            g.project(h, m.in_proj.weight, g.ADD_NORM, residual=res, norm_weight=layer.norm.weight,
                      eps=layer.norm.eps, config=cfg[0])
            g.project(y, m.out_proj.weight, g.GATED, z=z, norm_weight=m.norm.weight, eps=m.norm.eps, config=cfg[1])

        def plain():
            x, _ = self._ln(h, layer.norm.weight, None, residual=res, prenorm=True, residual_in_fp32=True,
                            eps=layer.norm.eps, is_rms_norm=True)
            m.in_proj(x)
            m.out_proj(m.norm(y, z))

        try:
            return graph_time_us(fused) < graph_time_us(plain)
        except Exception as e:  # noqa: BLE001 - a kernel that does not build or run here: never fuse
            log.warning("fused norm + projection unavailable at batch %d (%s: %s); norm kernels and cuBLAS",
                        size, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            return False

    # ---- the step body (captured or eager) -------------------------------------------------
    def _body(self, size: int, greedy_only: bool):
        b = self.b
        bb = b.model.backbone
        idx, tok_in, topk, ban = (self.d_long[r, :size] for r in range(4))
        temp, topp = self.d_float[0, :size], self.d_float[1, :size]
        H, P, G, N = b.nheads, b.headdim, b.ngroups, b.d_state
        blk = self.ssu_block.get(size, 16)
        safe = torch.where(idx >= 0, idx, self.scratch)
        tok = torch.where(tok_in >= 0, tok_in, self.last_tok[safe])
        h = bb.embedding(tok)
        res = None
        fused = self.fuses(size)
        cfg_in, cfg_out = self.gemv_config.get(size, (None, None))
        for i, layer in enumerate(b.layers):
            m = layer.mixer
            A, D, dt_bias, w = self.consts[i]
            if fused:
                zxbcdt, res = mamba_gemv.project(
                    h, m.in_proj.weight, mamba_gemv.NORM if res is None else mamba_gemv.ADD_NORM, residual=res,
                    norm_weight=layer.norm.weight, eps=layer.norm.eps, config=cfg_in)
            else:
                h, res = self._ln(h, layer.norm.weight, layer.norm.bias, residual=res, prenorm=True,
                                  residual_in_fp32=bb.residual_in_fp32, eps=layer.norm.eps, is_rms_norm=True)
                zxbcdt = m.in_proj(h)
            z = zxbcdt[:, :b.d_ssm]
            xBC = conv_step(zxbcdt[:, b.d_ssm:b.d_ssm + b.conv_dim], b.conv_pool[i], w, m.conv1d.bias, idx)
            dt = zxbcdt[:, b.d_ssm + b.conv_dim:]
            x = xBC[:, :b.d_ssm].view(size, H, P)
            Bm = xBC[:, b.d_ssm:b.d_ssm + G * N].view(size, G, N)
            Cm = xBC[:, b.d_ssm + G * N:].view(size, G, N)
            if self.own_ssu:
                y = ssu_step(b.ssm_pool[i], x, dt, A, Bm, Cm, D, dt_bias, idx, blk)
            else:
                y = self._ssu(b.ssm_pool[i], x, dt[:, :, None].expand(size, H, P), A, Bm, Cm, D, z=None,
                              dt_bias=dt_bias, dt_softplus=True, state_batch_indices=idx)
            if fused:
                h, _ = mamba_gemv.project(y.reshape(size, b.d_ssm), m.out_proj.weight, mamba_gemv.GATED, z=z,
                                          norm_weight=m.norm.weight, eps=m.norm.eps, config=cfg_out)
            else:
                h = m.out_proj(m.norm(y.reshape(size, b.d_ssm), z))
        h = self._ln(h, bb.norm_f.weight, bb.norm_f.bias, eps=bb.norm_f.eps, residual=res, prenorm=False,
                     residual_in_fp32=bb.residual_in_fp32, is_rms_norm=True)
        logits = b.model.lm_head(h)[:, :b.vocab_size].float()
        tokens = sample_on_device(logits, temp, topk, topp, ban, greedy_only)
        self.last_tok.index_copy_(0, safe, tokens)
        return logits, tokens

    def _neutral_inputs(self, size: int) -> None:
        self.d_long[0, :size].fill_(-1)  # warm-up and capture touch no slot
        self.d_long[1, :size].fill_(0)
        self.d_long[2, :size].fill_(1)
        self.d_long[3, :size].fill_(-1)
        self.d_float[:, :size].fill_(0.0)

    def _load_inputs(self, buf: int) -> None:
        self.d_in.copy_(self.h_in[buf], non_blocking=True)
        self.copied[buf].record()

    def _run(self, n: int, greedy_only: bool, eager: bool, buf: int):
        """Replay (or run) the bucket for n rows whose inputs are in pinned buffer ``buf``."""
        size = self.set.bucket(n)
        if size is None:
            raise ValueError(f"decode batch {n} exceeds the slot pool {self.max}")
        self.block(size)  # timed before any capture, never inside one
        self._load_inputs(buf)
        if eager or not self.use_graphs or self.set.failed:
            return self._body(size, greedy_only)
        key = (size, greedy_only)
        entry = self.set.graphs.get(key)
        if entry is None:
            self._neutral_inputs(size)  # warm-up and capture touch no slot
            entry = self.set.get(key, lambda: self._body(size, greedy_only))
            self._load_inputs(buf)  # the capture ran on neutral inputs: load the step's again
            if entry is None:
                return self._body(size, greedy_only)
        graph, (logits, tokens) = entry
        graph.replay()
        return logits, tokens

    def _fill(self, slots, tokens, params=None, banned=None) -> int:
        """Write the pinned input buffer for this step; returns its index."""
        self._buf ^= 1
        buf = self._buf
        self.copied[buf].synchronize()
        n = len(slots)
        size = self.set.bucket(n) or n
        pad = [-1] * (size - n)
        h = self.h_in[buf]
        if params is None:
            rows = [list(slots) + pad, list(tokens) + [0] * (size - n), [1] * size, [-1] * size]
            floats = [[0.0] * size, [1.0] * size]
        else:
            rows = [list(slots) + pad, list(tokens) + [0] * (size - n),
                    [p.top_k for p in params] + [1] * (size - n),
                    [ids[0] if ids else -1 for ids in banned] + pad]
            floats = [[p.temperature for p in params] + [0.0] * (size - n),
                      [p.top_p for p in params] + [1.0] * (size - n)]
        h[:4, :size] = torch.tensor(rows, dtype=torch.long)
        h[4].view(torch.float32).view(2, self.max)[:, :size] = torch.tensor(floats, dtype=torch.float32)
        return buf

    # ---- interface ----------------------------------------------------------------------------
    def logits(self, slots, tokens, eager: bool = False) -> torch.Tensor:
        buf = self._fill(slots, tokens)
        logits, _ = self._run(len(slots), True, eager, buf)
        return logits[:len(slots)].clone()

    def launch(self, slots, tokens, params, banned):
        """Enqueue one step (inputs, replay, sampled ids → pinned memory) without waiting.
        ``tokens[i]`` is the row's input token, or -1 for its slot's last sampled token on the
        device. Returns a handle for ``collect``."""
        n = len(slots)
        buf = self._fill(slots, tokens, params, banned)
        greedy_only = all(p.greedy for p in params)
        _, toks = self._run(n, greedy_only, False, buf)
        self.h_out[buf][:n].copy_(toks[:n], non_blocking=True)
        self.done[buf].record()
        return buf, n

    def collect(self, handle) -> list[int]:
        buf, n = handle
        self.done[buf].synchronize()
        return self.h_out[buf][:n].tolist()

    def step_sample(self, slots, tokens, params, banned, generators) -> list[int]:
        if any(g is not None for g in generators) or any(len(x) > 1 for x in banned):
            logits = self.logits(slots, tokens)  # seeded rows: the host-seeded generator path
            return sample(logits, params, banned, generators)
        return self.collect(self.launch(slots, tokens, params, banned))

    def capture_all(self) -> None:
        """Both graphs of every bucket — the greedy one and the sampling one (temperature,
        top-k, top-p) — largest first (the shared pool then fits the smaller ones in its
        memory): a graph captured on first use would stall every stream in that step for the
        capture (the first sampled batch of each size, seconds)."""
        for size in reversed(self.set.sizes):
            for greedy in (True, False):
                if (size, greedy) not in self.set.graphs and not self.set.failed:
                    self._run(size, greedy, False, self._fill([-1] * size, [0] * size))
        torch.cuda.current_stream().synchronize()
