"""Correctness of the native backend against mamba_ssm's own one-shot forward (GPU, bf16).

Used by tests/gpu/test_mamba_backend.py and at the start of benchmarks/gpu/bench_ssm_server_gpu.py.
Every figure is a max |logit difference| at the last prompt position (prefill) or at each decoded
position (decode), next to the logit scale (max |logit| of the reference).
"""

from __future__ import annotations

import torch

from servers.ssm_server.sampling import SamplingParams


def skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA device"
    from servers.ssm_server.mamba_kernels import import_mamba_ssm

    return import_mamba_ssm()


def _fresh_ids(vocab: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cuda")
    g.manual_seed(seed)
    return torch.randint(1, vocab, (1, n), device="cuda", generator=g)


@torch.inference_mode()
def check_native(b, prompt: int = 5000, steps: int = 6, chunks=(1024, 1000, 4096, 8192), seed: int = 0) -> dict:
    """Chunked prefill at several chunk sizes (one not dividing the prompt, one larger than it,
    ragged ones shorter than the conv window),
    graph decode, eager decode and a padded batched graph decode, each against one full forward."""
    res: dict = {}
    ids = _fresh_ids(b.vocab_size, prompt + steps, seed)
    full = b.full_forward_last(ids)
    scale = full.abs().max().item()
    res["logit_scale"] = scale
    for c in chunks:
        for s in range(0, prompt, c):
            last = b.prefill_chunk(0, ids[0, s:min(s + c, prompt)].tolist(), s)
        res[f"prefill_chunk_{c}"] = (last - full[prompt - 1]).abs().max().item()
    # ragged chunks, some shorter than the conv window (2, 1, 3 tokens), between longer ones
    cuts = [0, 2, 3, 1000, 1003, prompt]
    for s, e in zip(cuts, cuts[1:]):
        last = b.prefill_chunk(0, ids[0, s:e].tolist(), s)
    res["prefill_ragged"] = (last - full[prompt - 1]).abs().max().item()
    b.conv_pool[:, 1].copy_(b.conv_pool[:, 0])
    b.ssm_pool[:, 1].copy_(b.ssm_pool[:, 0])
    d_graph = d_eager = d_ge = 0.0
    agree = 0
    for t in range(steps):
        p = prompt + t
        tok = int(ids[0, p])
        g = b.decode([0], [tok], [p])[0]
        e = b.decode_eager([1], [tok])[0]
        d_graph = max(d_graph, (g - full[p]).abs().max().item())
        d_eager = max(d_eager, (e - full[p]).abs().max().item())
        d_ge = max(d_ge, (g - e).abs().max().item())
        agree += int(g.argmax() == full[p].argmax())
    res.update(graph_decode=d_graph, eager_decode=d_eager, graph_vs_eager=d_ge, argmax_agree=f"{agree}/{steps}")
    # three sequences decoded together (bucket of 4: one padding row), on-device greedy sampling
    lens = (300, 701, 513)
    seqs = [_fresh_ids(b.vocab_size, n + steps, seed + 1 + k) for k, n in enumerate(lens)]
    refs = [b.full_forward_last(s) for s in seqs]
    slots = [2, 0, 1]
    for s, x, n in zip(slots, seqs, lens):
        b.prefill_chunk(s, x[0, :n].tolist(), 0)
    d_batch = 0.0
    same_tok = 0
    for t in range(steps):
        pos = [n + t for n in lens]
        toks = [int(x[0, p]) for x, p in zip(seqs, pos)]
        out = b.decode(slots, toks, pos)
        for i, (ref, p) in enumerate(zip(refs, pos)):
            d_batch = max(d_batch, (out[i] - ref[p]).abs().max().item())
    # on-device greedy sampling = argmax of the same step's logits (state copies in spare slots)
    if b.num_slots >= 6:
        b.conv_pool[:, 3:6].copy_(b.conv_pool[:, [2, 0, 1]])
        b.ssm_pool[:, 3:6].copy_(b.ssm_pool[:, [2, 0, 1]])
        toks = [7, 8, 9]
        lg = b.decode([3, 4, 5], toks, [0, 0, 0])
        greedy = SamplingParams(temperature=0.0)
        sampled = b.decode_sample(slots, toks, [greedy] * 3, [[], [], []], [None] * 3)
        same_tok = sum(int(a == int(c)) for a, c in zip(sampled, lg.argmax(-1)))
        res["device_greedy_matches_argmax"] = f"{same_tok}/3"
        hot = SamplingParams(temperature=0.8, top_k=50, top_p=0.9)
        drawn = b.decode_sample(slots, toks, [hot] * 3, [[], [], []], [None] * 3)
        res["device_sampled_in_vocab"] = all(0 <= x < b.vocab_size for x in drawn)
    res["batched_graph_decode"] = d_batch
    res["worst_over_scale"] = max(v for k, v in res.items() if isinstance(v, float) and k != "logit_scale") / scale
    return res


class SSUCase:
    """Random inputs of one Mamba2-780m-shaped decode state update (48 heads × 64 × 128, bf16)
    on a pool of ``slots``, rows ``idx`` (default: ``bsz`` distinct random slots): for checking
    ``mamba_kernels.ssu_step`` and timing it against mamba_ssm's kernel."""

    H, P, N = 48, 64, 128

    def __init__(self, bsz: int, slots: int, groups: int, idx=None, seed: int = 0, device: str = "cuda"):
        torch.manual_seed(seed)
        bf, H, P, N = torch.bfloat16, self.H, self.P, self.N
        self.pool = torch.randn((slots, H, P, N), dtype=bf, device=device)
        self.x = torch.randn((bsz, H, P), dtype=bf, device=device)
        self.dt = torch.randn((bsz, H), dtype=bf, device=device)
        self.B, self.C = torch.randn((2, bsz, groups, N), dtype=bf, device=device)
        self.A = -torch.rand(H, device=device) * 4
        self.D, self.dt_bias = torch.rand((2, H), device=device)
        self.idx = (torch.randperm(slots, device=device)[:bsz] if idx is None
                    else torch.tensor(idx, device=device))

    def ours(self, state: torch.Tensor, block_p: int) -> torch.Tensor:
        from servers.ssm_server.mamba_kernels import ssu_step

        return ssu_step(state, self.x, self.dt, self.A, self.B, self.C, self.D, self.dt_bias, self.idx, block_p)

    def mamba_ssm(self, state: torch.Tensor) -> torch.Tensor:
        """mamba_ssm's ``selective_state_update`` on the same inputs (tied head dims as stride-0)."""
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update

        bsz, H, P, N = self.x.shape[0], self.H, self.P, self.N
        return selective_state_update(state, self.x, self.dt[:, :, None].expand(bsz, H, P),
                                      self.A[:, None, None].expand(H, P, N), self.B, self.C,
                                      self.D[:, None].expand(H, P), z=None,
                                      dt_bias=self.dt_bias[:, None].expand(H, P), dt_softplus=True,
                                      state_batch_indices=self.idx)


def gemv_cases(x, w, z, residual, norm_weight, eps: float = 1e-5):
    """``mamba_gemv.project`` in every mode and block config on these inputs, each beside its
    reference: yields (mode, config, out, reference out, residual out, reference residual out)."""
    from servers.ssm_server import mamba_gemv as g

    for mode in (g.PLAIN, g.GATED, g.ADD_NORM, g.NORM):
        kw = dict(z=z if mode == g.GATED else None, residual=residual if mode == g.ADD_NORM else None,
                  norm_weight=None if mode == g.PLAIN else norm_weight, eps=eps)
        ref, ref_r = g.project_ref(x, w, mode, **kw)
        for cfg in g.CONFIGS:
            got, got_r = g.project(x, w, mode, config=cfg, **kw)
            yield mode, cfg, got, ref, got_r, ref_r
