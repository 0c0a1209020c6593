"""The interfaces ssm-server's parts meet at, written down (the engine checked for methods
with ``hasattr`` before): a backend, the things a backend may add, and the engine the HTTP
layer drives (the model engine, or the synthetic one)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Backend(Protocol):
    """A model's prefill and decode over a pool of state slots (backend_hf, backend_mamba)."""

    device: torch.device
    num_slots: int
    max_model_len: int
    exact_chunking: bool
    """Whether a prompt may be prefilled in chunks with the same result (else in one piece)."""
    state_bytes: int
    kv_bytes_per_token: int

    def prefill_chunk(self, slot: int, ids: list[int], start: int) -> torch.Tensor:
        """Run ``ids`` (positions ``start``…) into the slot's state; the last position's logits."""

    def decode(self, slots: list[int], tokens: list[int], positions: list[int]) -> torch.Tensor:
        """One step of every listed sequence: logits [B, V]."""

    def free(self, slot: int) -> None:
        """The slot's sequence ended."""

    def kv_bytes_used(self, lengths: list[int]) -> int:
        """KV cache bytes of sequences of these lengths (0 for a pure SSM)."""


@runtime_checkable
class PackedPrefill(Protocol):
    """A backend that prefills several whole prompts of fresh sequences in one call."""

    def prefill_packed(self, slots: list[int], prompts: list[list[int]]) -> torch.Tensor:
        """``prompts[j]`` into ``slots[j]``, each from position 0: logits [n, V] after each."""


@runtime_checkable
class DeviceSampling(Protocol):
    """A backend that samples on the device: a step returns token ids, not logits."""

    def decode_sample(self, slots: list[int], tokens: list[int], params, banned, generators) -> list[int]:
        """One step and the sampled token of every listed sequence."""


@runtime_checkable
class PipelinedBackend(DeviceSampling, Protocol):
    """A backend whose step N+1 is enqueued before step N's tokens are read back."""

    def can_launch(self, generators, banned) -> bool:
        """Whether ``decode_launch`` serves this batch (no host-seeded rows, …)."""

    def decode_launch(self, slots: list[int], tokens: list[int], params, banned):
        """Enqueue one step and return at once: a handle for ``decode_collect``."""

    def decode_collect(self, handle) -> list[int]:
        """Wait for a launched step and return its sampled tokens."""


@runtime_checkable
class ServingEngine(Protocol):
    """What the HTTP layer drives (engine.Engine, synthetic.SyntheticEngine)."""

    model_name: str
    ready: bool
    """Warm: /health says 200 (503 before)."""
    stopped: str | None
    """Why the engine stopped serving (its loop failed), None while it serves: /health and new
    requests get 503 with it."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def submit(self, req) -> None:
        """Queue a request (raises APIError 429 when the queue is full)."""

    def cancel(self, req) -> None: ...

    def state(self) -> dict[str, float]:
        """The gauges /metrics exports."""
