"""CUDA-graph decode for pooled SSM models: one graph per batch-size bucket.

Each graph holds, as static tensors, the slot indices, the input tokens and a batch of state
buffers; replaying it gathers the slots' states from the pool, runs one decode step of the
whole model, writes the states back to the pool and leaves the logits in a static output.
Only the first ``n`` rows of a bucket are real; the rest point at a scratch slot.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("ssm_server")

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class GraphDecoder:
    def __init__(self, backend, max_batch: int):
        self.b = backend
        self.buckets = [x for x in BUCKETS if x < max_batch] + [max_batch]
        self.graphs: dict[int, tuple] = {}
        self.failed = False
        # a scratch slot row for padding lanes: one more row in every pool tensor
        self.scratch = backend.num_slots
        b = backend
        b.conv_pool = [torch.cat([t, t[:1].clone()]) for t in b.conv_pool]
        b.rec_pool = [torch.cat([t, t[:1].clone()]) if t is not None else None for t in b.rec_pool]

    def bucket(self, n: int) -> int | None:
        for x in self.buckets:
            if x >= n:
                return x
        return None

    @torch.inference_mode()
    def _capture(self, size: int):
        b = self.b
        idx = torch.full((size,), self.scratch, dtype=torch.long, device=b.device)
        tok = torch.zeros((size, 1), dtype=torch.long, device=b.device)
        conv = [torch.zeros((size, *t.shape[1:]), dtype=t.dtype, device=b.device) for t in b.conv_pool]
        rec = [torch.zeros((size, *t.shape[1:]), dtype=t.dtype, device=b.device) if t is not None else None
               for t in b.rec_pool]
        cache = b.bind(b.new_cache(), conv, rec, fresh=False)

        def step():
            for k in range(len(conv)):
                torch.index_select(b.conv_pool[k], 0, idx, out=conv[k])
                if rec[k] is not None:
                    torch.index_select(b.rec_pool[k], 0, idx, out=rec[k])
            out = b.forward(tok, cache)
            b.scatter_states(idx, conv, rec)
            return out

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up: kernels autotune, allocator settles
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = step()
        return graph, idx, tok, logits

    def step(self, slots: list[int], tokens: list[int]) -> torch.Tensor | None:
        """Logits [n, V] for the slots, or None when graphs are unavailable (eager then)."""
        if self.failed:
            return None
        size = self.bucket(len(slots))
        if size is None:
            return None
        if size not in self.graphs:
            try:
                self.graphs[size] = self._capture(size)
            except Exception as e:  # a model whose step cannot be captured: decode eagerly
                log.warning("CUDA graph capture failed (%s: %s); decoding eagerly", type(e).__name__, e)
                self.failed = True
                return None
        graph, idx, tok, logits = self.graphs[size]
        n = len(slots)
        pad = size - n
        idx.copy_(torch.tensor(slots + [self.scratch] * pad, dtype=torch.long), non_blocking=True)
        tok.copy_(torch.tensor(tokens + [0] * pad, dtype=torch.long)[:, None], non_blocking=True)
        graph.replay()
        return logits[:n]

    def capture_all(self) -> None:
        for size in self.buckets:
            if self.failed:
                return
            if size not in self.graphs:
                self.step([self.scratch] * size, [0] * size)
