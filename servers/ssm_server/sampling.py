"""Token sampling on the model's device: greedy, temperature, top-k, top-p, per-request seeds."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def new_generator(params: SamplingParams, device) -> torch.Generator | None:
    if params.seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(params.seed)
    return g


def sample(logits: torch.Tensor, params: list[SamplingParams], banned: list[list[int]],
           generators: list[torch.Generator | None]) -> list[int]:
    """One token per row of ``logits`` [B, V]; ``banned[i]`` ids (EOS before min_tokens) are
    masked out of row i. Greedy rows take one vectorised argmax."""
    return sample_tensor(logits, params, banned, generators).tolist()


def sample_tensor(logits: torch.Tensor, params: list[SamplingParams], banned: list[list[int]],
                  generators: list[torch.Generator | None]) -> torch.Tensor:
    """``sample``'s tokens as a tensor on the logits' device [B], enqueued without waiting for
    the device (no host-seeded row reads a value back). Per-request parameters as Python
    values; the decode graph's sampler, from device tensors, is ``mamba_kernels.sample_on_device``."""
    logits = logits.float()
    for i, ids in enumerate(banned):
        # a view filled in place: an indexed assignment (``logits[i, t] = -inf``, or a list of
        # ids) copies its value from the host and waits for the device (sync debug mode said so)
        for t in ids:
            logits[i, t:t + 1].fill_(float("-inf"))
    out = logits.argmax(dim=-1)
    for i, p in enumerate(params):
        if p.greedy:
            continue
        row = logits[i] / p.temperature
        if 0 < p.top_k < row.numel():
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, dim=-1)
        if p.top_p < 1.0:
            sp, si = torch.sort(probs, descending=True)
            cut = torch.cumsum(sp, 0) - sp > p.top_p
            sp = sp.masked_fill(cut, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, si, sp)
        out[i] = torch.multinomial(probs, 1, generator=generators[i])[0]
    return out
