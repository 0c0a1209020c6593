"""Batched decode for the native mamba_ssm backend, one CUDA graph per batch-size bucket.

A graph covers the whole step: embedding of the input tokens → every layer (fused add+RMSNorm,
in_proj, the conv step and ``selective_state_update`` working in place on the pooled state of
each row's slot through ``state_batch_indices``, gated RMSNorm, out_proj) → final norm →
lm_head → sampling (greedy, temperature, top-k, top-p on the device). There is no gather and no
scatter of states: the two state kernels index the pool directly. Rows past the real batch are
padding: their slot index is -1, which both state kernels skip.

Inputs live in static device buffers (slot ids, tokens, temperature, top-k, top-p, banned id),
filled each step by one copy from pinned host memory; the sampled ids come back by one
non-blocking copy into pinned memory and one event wait — the only host sync of a step.
Requests with their own ``seed`` sample on the host side's generator path (``sampling.sample``)
from the graph's logits.
"""

from __future__ import annotations

import logging

import torch

from servers.ssm_server.cuda_graphs import BUCKETS
from servers.ssm_server.mamba_kernels import conv_step, sample_on_device
from servers.ssm_server.sampling import sample

log = logging.getLogger("ssm_server")


class NativeDecoder:
    def __init__(self, backend, max_batch: int, use_graphs: bool = True):
        from mamba_ssm.ops.triton.layer_norm import layer_norm_fn
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update

        self._ln = layer_norm_fn
        self._ssu = selective_state_update
        self.b = backend
        self.use_graphs = use_graphs
        self.failed = False
        self.buckets = [x for x in BUCKETS if x < max_batch] + [max_batch]
        self.max = self.buckets[-1]
        dev = backend.device
        self.graphs: dict[tuple[int, bool], tuple] = {}
        # static inputs: rows 0..2 long (slot, token, top-k, banned id), floats (temperature, top-p)
        self.d_long = torch.zeros((4, self.max), dtype=torch.long, device=dev)
        self.d_float = torch.zeros((2, self.max), dtype=torch.float32, device=dev)
        self.h_long = torch.zeros((4, self.max), dtype=torch.long).pin_memory()
        self.h_float = torch.zeros((2, self.max), dtype=torch.float32).pin_memory()
        self.h_out = torch.zeros((self.max,), dtype=torch.long).pin_memory()
        self.done = torch.cuda.Event()
        self.copied = torch.cuda.Event()  # the pinned inputs may be rewritten once this passed
        self.copied.record()
        # per-layer constants in the shapes selective_state_update wants (stride-0 head_dim:
        # its tied-head_dim fast path)
        H, P, N = backend.nheads, backend.headdim, backend.d_state
        self.consts = []
        for layer in backend.layers:
            m = layer.mixer
            A = (-torch.exp(m.A_log.float()))[:, None, None].expand(H, P, N)
            self.consts.append((A, m.D[:, None].expand(H, P), m.dt_bias[:, None].expand(H, P),
                                m.conv1d.weight.reshape(backend.conv_dim, backend.d_conv).contiguous()))

    def bucket(self, n: int) -> int | None:
        return next((x for x in self.buckets if x >= n), None)

    # ---- the step body (captured or eager) -------------------------------------------------
    def _body(self, size: int, greedy_only: bool):
        b = self.b
        bb = b.model.backbone
        idx, tok, topk, ban = (self.d_long[r, :size] for r in range(4))
        temp, topp = self.d_float[0, :size], self.d_float[1, :size]
        H, P, G, N = b.nheads, b.headdim, b.ngroups, b.d_state
        h = bb.embedding(tok)
        res = None
        for i, layer in enumerate(b.layers):
            m = layer.mixer
            A, D, dt_bias, w = self.consts[i]
            h, res = self._ln(h, layer.norm.weight, layer.norm.bias, residual=res, prenorm=True,
                              residual_in_fp32=bb.residual_in_fp32, eps=layer.norm.eps, is_rms_norm=True)
            zxbcdt = m.in_proj(h)
            z = zxbcdt[:, :b.d_ssm]
            xBC = conv_step(zxbcdt[:, b.d_ssm:b.d_ssm + b.conv_dim], b.conv_pool[i], w, m.conv1d.bias, idx)
            dt = zxbcdt[:, b.d_ssm + b.conv_dim:]
            x = xBC[:, :b.d_ssm].view(size, H, P)
            Bm = xBC[:, b.d_ssm:b.d_ssm + G * N].view(size, G, N)
            Cm = xBC[:, b.d_ssm + G * N:].view(size, G, N)
            y = self._ssu(b.ssm_pool[i], x, dt[:, :, None].expand(size, H, P), A, Bm, Cm, D, z=None,
                          dt_bias=dt_bias, dt_softplus=True, state_batch_indices=idx)
            y = m.norm(y.reshape(size, b.d_ssm), z)
            h = m.out_proj(y)
        h = self._ln(h, bb.norm_f.weight, bb.norm_f.bias, eps=bb.norm_f.eps, residual=res, prenorm=False,
                     residual_in_fp32=bb.residual_in_fp32, is_rms_norm=True)
        logits = b.model.lm_head(h)[:, :b.vocab_size].float()
        tokens = sample_on_device(logits, temp, topk, topp, ban, greedy_only)
        return logits, tokens

    def _capture(self, size: int, greedy_only: bool):
        self.d_long[0, :size].fill_(-1)  # warm-up and capture touch no slot
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # Triton JIT + allocator settle outside the capture
                self._body(size, greedy_only)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits, tokens = self._body(size, greedy_only)
        return graph, logits, tokens

    def _run(self, n: int, greedy_only: bool, eager: bool):
        """Replay (or run) the bucket for n rows whose inputs are in the pinned buffers."""
        size = self.bucket(n)
        if size is None:  # more rows than the largest bucket: eager in pieces is not needed —
            raise ValueError(f"decode batch {n} exceeds the slot pool {self.max}")
        self.d_long[:, :size].copy_(self.h_long[:, :size], non_blocking=True)
        self.d_float[:, :size].copy_(self.h_float[:, :size], non_blocking=True)
        self.copied.record()
        if eager or not self.use_graphs or self.failed:
            return self._body(size, greedy_only)
        key = (size, greedy_only)
        if key not in self.graphs:
            try:
                self.graphs[key] = self._capture(size, greedy_only)
            except Exception as e:
                log.warning("CUDA graph capture failed (%s: %s); decoding eagerly", type(e).__name__, e)
                self.failed = True
                torch.cuda.synchronize()
                self.d_long[:, :size].copy_(self.h_long[:, :size])
                self.d_float[:, :size].copy_(self.h_float[:, :size])
                return self._body(size, greedy_only)
            # capture wrote the padding marker over the inputs: load them again
            self.d_long[:, :size].copy_(self.h_long[:, :size], non_blocking=True)
            self.d_float[:, :size].copy_(self.h_float[:, :size], non_blocking=True)
            self.copied.record()
        graph, logits, tokens = self.graphs[key]
        graph.replay()
        return logits, tokens

    def _fill(self, slots, tokens, params=None, banned=None) -> int:
        self.copied.synchronize()
        n = len(slots)
        size = self.bucket(n) or n
        pad = size - n
        self.h_long[0, :size] = torch.tensor(list(slots) + [-1] * pad, dtype=torch.long)
        self.h_long[1, :size] = torch.tensor(list(tokens) + [0] * pad, dtype=torch.long)
        if params is None:
            self.h_long[2, :size] = 1
            self.h_long[3, :size] = -1
            self.h_float[:, :size] = 0.0
        else:
            self.h_long[2, :size] = torch.tensor([p.top_k for p in params] + [1] * pad, dtype=torch.long)
            self.h_long[3, :size] = torch.tensor([ids[0] if ids else -1 for ids in banned] + [-1] * pad,
                                                 dtype=torch.long)
            self.h_float[0, :size] = torch.tensor([p.temperature for p in params] + [0.0] * pad)
            self.h_float[1, :size] = torch.tensor([p.top_p for p in params] + [1.0] * pad)
        return n

    # ---- interface ----------------------------------------------------------------------------
    def logits(self, slots, tokens, eager: bool = False) -> torch.Tensor:
        n = self._fill(slots, tokens)
        logits, _ = self._run(n, True, eager)
        return logits[:n].clone()

    def step_sample(self, slots, tokens, params, banned, generators) -> list[int]:
        n = len(slots)
        if any(g is not None for g in generators) or any(len(x) > 1 for x in banned):
            logits = self.logits(slots, tokens)  # seeded rows: the host-seeded generator path
            return sample(logits, params, banned, generators)
        self._fill(slots, tokens, params, banned)
        greedy_only = all(p.greedy for p in params)
        _, toks = self._run(n, greedy_only, eager=False)
        self.h_out[:n].copy_(toks[:n], non_blocking=True)
        self.done.record()
        self.done.synchronize()
        return self.h_out[:n].tolist()

    def capture_all(self) -> None:
        for size in self.buckets:
            if (size, True) not in self.graphs and not self.failed:
                self._fill([], [])
                self.h_long[0, :size] = -1
                self._run(size, True, eager=False)
