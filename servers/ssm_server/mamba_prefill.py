"""CUDA graphs of short prefills for the native mamba_ssm backend.

A prefill costs its kernels' launches before any of its work: the model's 48 layers launch
about 700 kernels, most of them Triton kernels started from Python, and on an H200 that took
~50 ms however short the prompt (``benchmarks/gpu/bench_packed_prefill.py``: one 256-token
prompt 51 ms, one of 4,096 tokens 50 ms) — the floor of a short prompt's TTFT, and a stall of
every stream decoding beside it. Here each packed prefill of fresh prompts (``prefill_packed``:
whole prompts end to end, the conv and the scan kept within each sequence) is captured once per
total-length bucket (``SIZES`` up to the prefill chunk) and sequence-row bucket (``ROWS``: room
for 1, 8 or 64 prompts); a replay costs one launch. The rows are a bucket of their own because
every row costs its final state whether a prompt fills it or not: mamba_ssm writes each row's
state in float32 (1.6 MB a layer for Mamba2-780m), and the graph gathers, converts and stores it
— 65 rows cost ~8 ms of a one-prompt replay on an H200 (16.0 ms against 7.9 ms with 2 rows
for a 1K prompt: ``bench_packed_prefill.py``), more than the prompt's own work.

Static inputs, per bucket (T tokens, S sequence rows): token ids, each position's
sequence (``seq_idx``) and that sequence's first position (``starts``) over T positions; the
offsets ``cu`` (S + 1); each row's slot, last position and source row. A call packs n <= S - 1
prompts of total L <= T: positions past L are one padding sequence (token 0, its own sequence,
so it touches no real one), rows past it are empty sequences; every row past the real n writes
row 0's state again into row 0's slot (the same values twice), so a replay writes no slot but
the n given. The inputs go to the device in two copies from pinned memory.

A long prompt's later chunks (a continuation: the chunk starts from its slot's conv window and
SSM state) have graphs of their own, one per total-length bucket, keyed (T, 0): static token
ids [T], the slot and the real length n. The slot's window and state are gathered into the
graph by index and written back the same way; the padding past n changes nothing, because its
dt is set to -inf before the scan: softplus(-inf) = 0, so a padding position neither decays nor
adds to the state (exact, as long as the model's ``dt_limit`` keeps a zero dt at zero: the
backend captures these graphs only then), and the window written back is the last inputs
before n. A chunk shorter than the conv window runs eagerly. With them a long prompt arriving
while streams decode costs each step a replay of a 4,096-token chunk (~21 ms on an H200), not
the ~50 ms of launching a chunk's kernels (``--prefill-chunk-size-decoding``).

All graphs share one memory pool, not the decode graphs' (the prefill overlap runs both at
once): one is replayed at a time, after the last replay's logits were copied out, whichever
thread and stream call.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import torch

from servers.ssm_server.cuda_graphs import GraphSet

log = logging.getLogger("ssm_server")

SIZES = (256, 512, 1024, 2048, 4096, 8192)
"""Total prompt tokens of the captured packs (those up to the prefill chunk)."""

ROWS = (2, 9, 65)
"""Sequence rows of the captured packs: up to 1, 8 or 64 prompts, and the padding's row."""

CONTINUED = 0
"""The rows of a continuation graph's key (tokens, CONTINUED): the next chunk of one sequence."""


def graph_sizes(chunk: int) -> list[int]:
    """The buckets captured under a prefill chunk of ``chunk`` tokens."""
    return [t for t in SIZES if t <= chunk]


@dataclass
class Pack:
    """Where the sequences of a packed prefill lie (device tensors): their ``slots`` [n] and
    last positions ``rows`` [n], the offsets ``cu`` [n + 1] (int32), each position's sequence
    ``seq_idx`` [L] (int32) and that sequence's first position ``starts`` [L] (int32); ``src``
    [n]: the row whose state each row writes (a graph's spare rows repeat row 0), None: its own."""
    slots: torch.Tensor
    rows: torch.Tensor
    cu: torch.Tensor
    seq_idx: torch.Tensor
    starts: torch.Tensor
    src: torch.Tensor | None = None


class PrefillGraphs:
    def __init__(self, backend, max_tokens: int, rows: tuple[int, ...] = ROWS):
        self.b = backend
        self.set = GraphSet(1, "prefilling")
        self.sizes = graph_sizes(max_tokens)
        self.rows = tuple(sorted(rows))
        self.keys = [(t, S) for t in self.sizes for S in self.rows]
        """(tokens, rows) of every pack graph, smallest first (by tokens, then rows)."""
        self.continued = [(t, CONTINUED) for t in self.sizes] if backend.pads_continuation else []
        """(tokens, CONTINUED) of every continuation graph, smallest first."""
        dev = backend.device
        self.inputs = {}
        for t, S in self.keys:  # long: ids, slots, rows, src; int32: seq_idx, starts, cu
            self.inputs[t, S] = (torch.zeros(t + 3 * S, dtype=torch.long, device=dev),
                                 torch.zeros(2 * t + S + 1, dtype=torch.int32, device=dev))
        for key in self.continued:  # long: ids, slot, length
            self.inputs[key] = (torch.zeros(key[0] + 2, dtype=torch.long, device=dev), None)
        top, S = max(self.sizes, default=0), max(self.rows)
        self.h_long = torch.zeros(top + 3 * S, dtype=torch.long).pin_memory()
        self.h_int = torch.zeros(2 * top + S + 1, dtype=torch.int32).pin_memory()
        self.copied = torch.cuda.Event()
        self.copied.record()
        # one replay at a time, and each after the last one's outputs were read, whichever
        # thread (and stream) prefills: the inputs, outputs and pool are shared
        self.lock = threading.Lock()
        self.done = torch.cuda.Event()
        self.done.record()

    def _views(self, key: tuple[int, int]):
        """(ids [1, T], Pack) over bucket key's static inputs."""
        (t, S), (lg, it) = key, self.inputs[key]
        return lg[:t][None], Pack(slots=lg[t:t + S], rows=lg[t + S:t + 2 * S], src=lg[t + 2 * S:t + 3 * S],
                                  seq_idx=it[:t], starts=it[t:2 * t], cu=it[2 * t:])

    def _continued_views(self, key: tuple[int, int]):
        """(ids [1, T], slot [1], length [1]) over a continuation graph's static inputs."""
        t, lg = key[0], self.inputs[key][0]
        return lg[:t][None], lg[t:t + 1], lg[t + 1:t + 2]

    @torch.inference_mode()
    def capture_all(self) -> None:
        """Every bucket, largest first (the shared pool then fits the smaller ones), on inputs
        of one prompt filling the bucket, into slot 0 (no sequence lives yet)."""
        t0 = time.perf_counter()
        for key in sorted(self.keys + self.continued, reverse=True):
            if key[1] == CONTINUED:
                self._fill_continued(key, 0, [1] * key[0])
                ids, slot, n = self._continued_views(key)
                body = lambda ids=ids, slot=slot, n=n: self.b.continued_forward(ids, slot, n)  # noqa: E731
            else:
                self._fill(key, [0], [[1] * key[0]])
                ids, pack = self._views(key)
                body = lambda ids=ids, pack=pack: self.b.packed_forward(ids, pack)  # noqa: E731
            if self.set.get(key, body) is None:
                break
        if self.set.graphs:
            log.info("captured %d prefill graphs (%s tokens × room for %s prompts, and %d continuation chunks) "
                     "in %.1f s", len(self.set), "/".join(map(str, self.sizes)),
                     "/".join(str(S - 1) for S in self.rows), len(self.continued), time.perf_counter() - t0)

    def bucket(self, n: int, total: int) -> tuple[int, int] | None:
        """The smallest captured (tokens, rows) that holds n prompts of ``total`` tokens."""
        if total < 1 or self.set.failed:
            return None
        return next((k for k in self.keys if k[0] >= total and k[1] > n and k in self.set.graphs), None)

    def _fill(self, key: tuple[int, int], slots: list[int], prompts: list[list[int]]) -> None:
        (t, S), n = key, len(prompts)
        lens = torch.tensor([len(p) for p in prompts], dtype=torch.int32)
        total = int(lens.sum())
        # row n: the padding (may be empty); rows past it: empty, at the end
        cu = torch.cat([torch.zeros(1, dtype=torch.int32), lens.cumsum(0, dtype=torch.int32),
                        torch.full((S - n,), t, dtype=torch.int32)])
        seq = torch.repeat_interleave(torch.arange(n + 1, dtype=torch.int32),
                                      torch.cat([lens, torch.tensor([t - total], dtype=torch.int32)]))
        self.copied.synchronize()  # the last call's copies have left the pinned buffers
        hl, hi = self.h_long, self.h_int
        hl[:total] = torch.tensor([tok for p in prompts for tok in p])
        hl[total:t] = 0
        hl[t:t + S] = torch.tensor(slots + [slots[0]] * (S - n))
        hl[t + S:t + 2 * S] = (cu[1:] - 1).clamp_min(0)
        hl[t + 2 * S:t + 3 * S] = 0
        hl[t + 2 * S:t + 2 * S + n] = torch.arange(n)
        hi[:t] = seq
        hi[t:2 * t] = cu[seq.long()]
        hi[2 * t:2 * t + S + 1] = cu
        lg, it = self.inputs[key]
        lg.copy_(hl[:t + 3 * S], non_blocking=True)
        it.copy_(hi[:2 * t + S + 1], non_blocking=True)
        self.copied.record()

    def _fill_continued(self, key: tuple[int, int], slot: int, ids: list[int]) -> None:
        t, n = key[0], len(ids)
        self.copied.synchronize()
        hl = self.h_long
        hl[:n] = torch.tensor(ids)
        hl[n:t] = 0
        hl[t], hl[t + 1] = slot, n
        self.inputs[key][0].copy_(hl[:t + 2], non_blocking=True)
        self.copied.record()

    def largest_piece(self) -> int:
        """The most tokens of one prompt a single replay takes, fresh or continued (0: none)."""
        if self.set.failed:
            return 0
        fresh = {k[0] for k in self.keys if k in self.set.graphs}
        return max(fresh & {k[0] for k in self.continued if k in self.set.graphs}, default=0)

    def continued_bucket(self, length: int) -> tuple[int, int] | None:
        """The smallest captured continuation graph that holds a chunk of ``length`` tokens
        (None for one shorter than the conv window: its new window reaches into the old one)."""
        if length < self.b.d_conv or self.set.failed:
            return None
        return next((k for k in self.continued if k[0] >= length and k in self.set.graphs), None)

    def _replay(self, key: tuple[int, int], fill, rows: int) -> torch.Tensor:
        graph, logits = self.set.graphs[key]
        with self.lock:
            torch.cuda.current_stream().wait_event(self.done)
            fill()
            graph.replay()
            out = logits[:rows].clone()
            self.done.record()
        return out

    def run(self, slots: list[int], prompts: list[list[int]]) -> torch.Tensor | None:
        """Logits [n, V] after each prompt, from a replay; None when no captured bucket holds
        them (too many prompts, too many tokens): prefill eagerly then."""
        key = self.bucket(len(prompts), sum(len(p) for p in prompts))
        if key is None:
            return None
        return self._replay(key, lambda: self._fill(key, slots, prompts), len(prompts))

    def run_continued(self, slot: int, ids: list[int]) -> torch.Tensor | None:
        """Logits [1, V] after the chunk ``ids`` continuing the sequence in ``slot``, from a
        replay; None when no continuation graph holds it: run it eagerly then."""
        key = self.continued_bucket(len(ids))
        if key is None:
            return None
        return self._replay(key, lambda: self._fill_continued(key, slot, ids), 1)
