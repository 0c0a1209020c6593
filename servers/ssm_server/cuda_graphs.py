"""CUDA-graph decode for ssm-server: the capture both decoders share, and the decoder of the
transformers backend's pooled SSM models.

``GraphSet`` holds one decoder's graphs, one per key (a batch-size bucket, and for the native
decoder whether every row is greedy), all captured into ONE memory pool: a graph's scratch
memory is reused by the next capture, and only each graph's outputs stay its own. Their
replays never overlap (one stream, one step at a time), which is what sharing a pool needs.
Each set also captures on a stream of its own: PyTorch keys cuBLAS's workspace by the capture
stream, and ``torch.cuda.graph``'s default is one stream for every capture in the process, so
the decode graphs and the prefill graphs (``mamba_prefill``) would embed the same workspace —
and replayed at the same time on their two streams (``--prefill-overlap``), their GEMMs raced on
it and the GPU hung (H200, 2026-12-03: 64 streams stopped for good a few steps after the first
overlapped prefill graph).
A capture runs the step twice on that stream first (Triton JIT and autotuning, the
allocator settling), then records it, then replays it once: CUDA uploads a graph to the device
at its first launch (``cudaGraphUpload``, implicit), here rather than in the first client step
to use that graph. One that fails turns the set off and the decoder runs eagerly from then on.

``GraphDecoder`` (the transformers backend): each graph holds, as static tensors, the slot
indices, the input tokens and a batch of state buffers; replaying it gathers the slots'
states from the pool, runs one decode step of the whole model, writes the states back to the
pool and leaves the logits in a static output. Only the first ``n`` rows of a bucket are
real; the rest point at the pool's scratch row (``backend.scratch_slot``).
"""

from __future__ import annotations

import logging
from typing import Callable, Hashable

import torch

log = logging.getLogger("ssm_server")

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def bucket_sizes(max_batch: int) -> list[int]:
    """The batch sizes graphs are captured for: the standard buckets below ``max_batch``, and it."""
    return [x for x in BUCKETS if x < max_batch] + [max_batch]


class GraphSet:
    def __init__(self, max_batch: int, what: str = "decoding"):
        self.what = what
        """What runs eagerly once a capture fails (for the log)."""
        self.sizes = bucket_sizes(max_batch)
        self.graphs: dict[Hashable, tuple] = {}
        self.failed = False
        self.pool = None
        self.stream = None
        """The stream this set captures on (its own: see the module's docstring)."""

    def bucket(self, n: int) -> int | None:
        """The smallest captured batch size that holds ``n`` rows (None: more than the largest)."""
        return next((x for x in self.sizes if x >= n), None)

    def get(self, key: Hashable, body: Callable[[], object]) -> tuple | None:
        """``(graph, outputs)`` for ``key``, capturing ``body`` now if it is new (its outputs are
        the static tensors a replay refills); None once a capture has failed: decode eagerly."""
        if key in self.graphs or self.failed:
            return self.graphs.get(key)
        try:
            if self.pool is None:
                self.pool, self.stream = torch.cuda.graph_pool_handle(), torch.cuda.Stream()
            side = self.stream  # the warm-up too: the workspace it settles is the one captured
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    body()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
                out = body()
            graph.replay()  # the first launch uploads the graph to the device: here, not in a client's step
        except Exception as e:  # a step that cannot be captured: run eagerly
            log.warning("CUDA graph capture failed (%s: %s); %s eagerly", type(e).__name__, e, self.what)
            self.failed = True
            torch.cuda.synchronize()
            return None
        self.graphs[key] = (graph, out)
        return self.graphs[key]

    def __len__(self) -> int:
        return len(self.graphs)


class GraphDecoder:
    def __init__(self, backend, max_batch: int):
        self.b = backend
        self.set = GraphSet(max_batch)
        self.scratch = backend.scratch_slot
        self._inputs: dict[int, tuple] = {}

    def _step_body(self, size: int):
        """The step for ``size`` rows over static inputs (slot ids, tokens, state buffers)."""
        b = self.b
        idx = torch.full((size,), self.scratch, dtype=torch.long, device=b.device)
        tok = torch.zeros((size, 1), dtype=torch.long, device=b.device)
        conv = [torch.zeros((size, *t.shape[1:]), dtype=t.dtype, device=b.device) for t in b.conv_pool]
        rec = [torch.zeros((size, *t.shape[1:]), dtype=t.dtype, device=b.device) if t is not None else None
               for t in b.rec_pool]
        cache = b.bind(b.new_cache(), conv, rec, fresh=False)
        self._inputs[size] = (idx, tok)

        def step():
            for k in range(len(conv)):
                torch.index_select(b.conv_pool[k], 0, idx, out=conv[k])
                if rec[k] is not None:
                    torch.index_select(b.rec_pool[k], 0, idx, out=rec[k])
            out = b.forward(tok, cache)
            b.scatter_states(idx, conv, rec)
            return out

        return step

    @torch.inference_mode()
    def step(self, slots: list[int], tokens: list[int]) -> torch.Tensor | None:
        """Logits [n, V] for the slots, or None when graphs are unavailable (eager then)."""
        size = self.set.bucket(len(slots))
        if size is None or self.set.failed:
            return None
        entry = self.set.graphs.get(size)
        if entry is None:
            entry = self.set.get(size, self._step_body(size))
            if entry is None:
                return None
        graph, logits = entry
        idx, tok = self._inputs[size]
        pad = size - len(slots)
        idx.copy_(torch.tensor(slots + [self.scratch] * pad, dtype=torch.long), non_blocking=True)
        tok.copy_(torch.tensor(tokens + [0] * pad, dtype=torch.long)[:, None], non_blocking=True)
        graph.replay()
        return logits[:len(slots)]
