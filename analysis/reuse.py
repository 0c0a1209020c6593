"""Prefix reuse: how much of each target's prompts its prefix cache served.

A ``shared_prefix`` prompt source (docs/scenarios.md) gives groups of requests one document;
the server says in its usage how many prompt tokens it took from its cache
(``prompt_tokens_details.cached_tokens``: vLLM with ``--enable-prompt-tokens-details``, which
ctxload's launch profiles set; ssm-server reports 0, having no prefix cache). Per target ×
stage: the hit rate over all prompt tokens and over the shared ones, and TTFT beside the
uncached part of the prompt, which is what a prefill then has to compute. A ``conversation``
load's turns resend their history: per target × turn, how the prompt grows and how much of it
the cache served.
"""

from __future__ import annotations

from dataclasses import dataclass

from analysis.records import RunData
from rundir.slos import percentile


@dataclass
class ReuseRow:
    target: str
    stage: str
    requests: int
    """Ok requests whose usage said how many tokens were cached."""
    prompt_tokens: int
    shared_tokens: int | None
    """Tokens the prompt source shared across each group (None: no shared-prefix source)."""
    cached_tokens: int
    ttft_p50: float | None
    uncached_p50: float | None
    """Median prompt tokens not served from the cache: the prefill's own work."""
    metrics_hit_rate: float | None = None
    """vLLM's own count over the stage: the rise of ``vllm:prefix_cache_hits_total`` over that
    of ``vllm:prefix_cache_queries_total`` (tokens), from the scrape before the stage to the
    one as it ended. None where the server exports no such counters."""
    speedup: float | None = None
    """Median TTFT of its requests the cache served nothing of over that of those it served
    most of (at least half their shared tokens), when both are there at one prompt length
    (within 10%): how much faster reuse made the first token. None otherwise."""

    @property
    def hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def shared_hit_rate(self) -> float | None:
        return self.cached_tokens / self.shared_tokens if self.shared_tokens else None


HITS, QUERIES = "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"


def _counters(s) -> tuple[float, float] | None:
    hits = sum(v for n, _, v in s.samples if n == HITS)
    queries = [v for n, _, v in s.samples if n == QUERIES]
    return (hits, sum(queries)) if queries else None


def _metrics_hit_rate(run: RunData, target: str, rs: list) -> float | None:
    index = rs[0].stage_index
    t0 = min((r.start_time for r in rs if r.start_time is not None), default=None)
    mine = sorted(((s, c) for s in run.scrapes if s.target == target and s.ok and (c := _counters(s))),
                  key=lambda sc: sc[0].time)
    after = [c for s, c in mine if (s.stage_of(target) or (None,))[0] == index]
    if not after or t0 is None:
        return None
    before = [c for s, c in mine if s.time < t0]
    h0, q0 = before[-1] if before else (0.0, 0.0)
    h1, q1 = after[-1]
    return (h1 - h0) / (q1 - q0) if q1 > q0 else None


def _speedup(rs: list) -> float | None:
    cold = [r for r in rs if r.cached_tokens == 0 and r.ttft_s]
    warm = [r for r in rs if r.cached_tokens and r.ttft_s and
            (r.shared_tokens is None or r.cached_tokens >= r.shared_tokens / 2)]
    if not cold or not warm:
        return None
    pc, pw = percentile([r.prompt_tokens for r in cold], 50), percentile([r.prompt_tokens for r in warm], 50)
    if not pc or not pw or abs(pc - pw) > 0.1 * max(pc, pw):
        return None  # not one length: a conversation's later turns are longer than its first
    return percentile([r.ttft_s for r in cold], 50) / percentile([r.ttft_s for r in warm], 50)


def rows(run: RunData) -> list[ReuseRow]:
    """One row per target × stage with cache figures, for the targets that reused anything or
    whose prompts were meant to be shared."""
    keep = {r.target for r in run.requests if (r.cached_tokens or 0) > 0 or r.shared_tokens is not None}
    by: dict[tuple[str, str], list] = {}
    for r in run.requests:
        if r.target in keep and r.ok and r.cached_tokens is not None and r.prompt_tokens:
            by.setdefault((r.target, r.stage), []).append(r)
    out = []
    for (t, st), rs in by.items():
        shared = [r.shared_tokens for r in rs if r.shared_tokens is not None]
        out.append(ReuseRow(
            target=t, stage=st, requests=len(rs), prompt_tokens=sum(r.prompt_tokens for r in rs),
            shared_tokens=sum(shared) if shared else None, cached_tokens=sum(r.cached_tokens for r in rs),
            ttft_p50=percentile([r.ttft_s for r in rs if r.ttft_s is not None], 50),
            uncached_p50=percentile([r.prompt_tokens - r.cached_tokens for r in rs], 50),
            metrics_hit_rate=_metrics_hit_rate(run, t, rs), speedup=_speedup(rs)))
    order = {t: i for i, t in enumerate(run.targets())}
    out.sort(key=lambda x: (order.get(x.target, 1 << 30), min(r.stage_index for r in by[(x.target, x.stage)])))
    return out


@dataclass
class TurnRow:
    target: str
    turn: int
    requests: int
    """Ok turns of this index, over every conversation."""
    prompt_p50: float | None
    cached_p50: float | None
    """Median cached prompt tokens (None: the server does not say)."""
    ttft_p50: float | None


def turns(run: RunData) -> list[TurnRow]:
    """One row per target × turn of its conversations (ok requests only)."""
    by: dict[tuple[str, int], list] = {}
    for r in run.requests:
        if r.turn is not None and r.ok:
            by.setdefault((r.target, r.turn), []).append(r)
    order = {t: i for i, t in enumerate(run.targets())}
    out = []
    for (t, k), rs in sorted(by.items(), key=lambda kv: (order.get(kv[0][0], 1 << 30), kv[0][1])):
        cached = [r.cached_tokens for r in rs if r.cached_tokens is not None]
        out.append(TurnRow(t, k, len(rs), percentile([r.prompt_tokens for r in rs if r.prompt_tokens], 50),
                           percentile(cached, 50) if cached else None,
                           percentile([r.ttft_s for r in rs if r.ttft_s is not None], 50)))
    return out


def warnings(run: RunData, rows_: list[ReuseRow]) -> list[str]:
    """Where a vLLM target could not reuse what its prompts shared: prefix caching off, or a
    shared part shorter than its cache's unit — the block (a hybrid's is an attention block
    sized to its Mamba state's page: 800 tokens for Falcon-H1-0.5B on vLLM 0.26)."""
    from analysis.memory import VLLM_CACHE_INFO

    out = []
    for t in dict.fromkeys(r.target for r in rows_):
        info = run.latest_labels(t, VLLM_CACHE_INFO)
        if not info:
            continue
        mine = [r for r in rows_ if r.target == t and r.shared_tokens]
        if not mine:
            continue
        if str(info.get("enable_prefix_caching")) == "False":
            out.append(f"{t}: its prompts shared prefixes, but vLLM ran with prefix caching off: it could "
                       "reuse none of them")
            continue
        try:
            block = int(info.get("block_size") or 0)
        except ValueError:
            continue
        for r in mine:
            shared = r.shared_tokens / r.requests
            if block and shared < block:
                out.append(f"{t} {r.stage}: the shared part of its prompts ({shared:,.0f} tokens a request) is "
                           f"shorter than its prefix cache's block ({block:,} tokens): vLLM reuses whole blocks "
                           "only")
    return out
