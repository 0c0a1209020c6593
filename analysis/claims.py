"""The claims table: each PAPER.md claim beside what this run measured.

A verdict is ``holds`` (the run shows the direction the paper claims), ``differs`` (it shows
the opposite), or ``could not be measured`` with the reason (the run lacks the data or the
prompt lengths the claim is about, or its only targets ran on different engine classes —
see :mod:`analysis.engines`). The magnitude measured stands beside the paper's, and every
verdict lists the figures it used (:class:`Figure`: target, engine, metric, prompt length,
value, requests), so a reader can recompute it from requests.jsonl.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from analysis import engines as eng
from analysis import units
from analysis.memory import PAPER_BUDGET_BYTES, MemoryCurve
from analysis.records import RunData
from analysis.scaling import ContextLimit, points

HOLDS, DIFFERS, UNMEASURED = "holds", "differs", "could not be measured"
SHORT = 8192
"""The paper's short-prompt regime: below 8K tokens."""
LONG = 16384
"""Shortest prompt length at which a long-prompt claim is tested (the paper's are 32K–57K)."""
PAPER_MEMORY_AT = 57344


@dataclass(frozen=True)
class Figure:
    """One number a verdict rests on."""

    target: str
    engine: str
    metric: str
    """``TTFT p50``, ``TPOT p50``, ``peak device memory``, ``J per request``, ``longest ok prompt``."""
    prompt: int | None
    value: float
    show: str
    """``value`` as displayed (``886 ms``)."""
    requests: int | None = None
    """How many ok requests the value summarises (None: not from requests)."""
    how: str = ""

    def text(self) -> str:
        at = f" at {units.tokens(self.prompt)}" if self.prompt is not None else ""
        extra = []
        if self.requests is not None:
            n = f"{self.requests} ok request{'s' if self.requests != 1 else ''}"
            extra.append(f"median of {n}" if self.metric.endswith("p50") else n)
        if self.how:
            extra.append(self.how)
        more = f" ({'; '.join(extra)})" if extra else ""
        return f"{self.target} · {self.engine}: {self.metric}{at} = {self.show}{more}"


@dataclass
class Claim:
    claim: str
    paper: str
    measured: str
    verdict: str
    why: str = ""
    figures: list[Figure] = field(default_factory=list)

    @property
    def used(self) -> str:
        return "; ".join(f.text() for f in self.figures) or "—"


def _of(run: RunData, family: str) -> list[str]:
    return [t for t in run.targets() if run.family_of(t) == family]


def _pairs(run: RunData, fa: str, fb: str):
    return [(a, b) for a in _of(run, fa) for b in _of(run, fb)]


def _median_points(run: RunData, target: str, metric: str) -> dict[int, tuple[float, int]]:
    """prompt length → (median of ``metric`` over its ok requests, how many)."""
    return {n: (float(np.median(v)), len(v)) for n, v in points(run, target, metric).items()}


def _latency(e, target: str, metric: str, n: int, v: tuple[float, int]) -> Figure:
    return Figure(target, e[target].label if target in e else "?", f"{metric.upper()} p50", n, v[0],
                  units.duration(v[0]), v[1])


def _comparable(group, e) -> bool:
    return all(eng.comparable(group[0], t, e)[0] for t in group[1:])


def _decide(groups, e, judge) -> list[Claim]:
    """``judge(*group)`` for the groups of targets on one engine class; when there is none,
    each group's figures with no verdict, saying why."""
    same = [g for g in groups if _comparable(g, e)]
    if same:
        out = [judge(*g) for g in same]
        left = len(groups) - len(same)
        if left:
            for c in out:
                c.why = (c.why + "; " if c.why else "") + (
                    f"{left} combination(s) on different engine classes left out")
        return out
    out = []
    for g in groups:
        c = judge(*g)
        why = eng.not_comparable_why(list(g), e)
        c.why = why if c.verdict != UNMEASURED else f"{c.why}; also {why}"
        c.verdict = UNMEASURED
        out.append(c)
    return out


def context_claim(run: RunData, limits: list[ContextLimit], mem: list[MemoryCurve], e) -> list[Claim]:
    text, paper = ("SSMs reach longer contexts than Transformers on a 24 GB budget",
                   "Mamba/Mamba2 to 220K; Qwen2.5/Llama-3.2 OOM at 57K–65K (~3.8–4×)")
    by = {c.target: c for c in limits}
    mc = {m.target: m for m in mem}

    def lim(t) -> Figure:
        c = by[t]
        ok = sum(1 for r in run.requests if r.target == t and r.ok and r.prompt_length == c.max_ok)
        how = (f"first failed {units.tokens(c.first_failed)}: {c.cause}" if c.reached
               else "no longer prompt failed")
        return Figure(t, e[t].label, "longest ok prompt", None, float(c.max_ok or 0),
                      units.tokens(c.max_ok), ok, how)

    def judge(t, s) -> Claim:
        lt, ls = by[t], by[s]
        if lt.reached and lt.max_ok:
            figs = [lim(t), lim(s)]
            if ls.reached and ls.max_ok:
                r = ls.max_ok / lt.max_ok
                return Claim(text, paper, f"{s} {units.tokens(ls.max_ok)} vs {t} {units.tokens(lt.max_ok)} "
                             f"({units.ratio(r)}; {t} ended by {lt.cause})", HOLDS if r > 1 else DIFFERS,
                             figures=figs)
            if ls.max_ok and ls.max_ok > lt.max_ok:
                return Claim(text, paper, f"{s} ok to {units.tokens(ls.max_ok)} (limit not reached) vs "
                             f"{t} ended after {units.tokens(lt.max_ok)} by {lt.cause} "
                             f"(≥{units.ratio(ls.max_ok / lt.max_ok)})", HOLDS, figures=figs)
            return Claim(text, paper, f"{t} ended after {units.tokens(lt.max_ok)} by {lt.cause}",
                         UNMEASURED, f"{s} was not tested beyond that length", figs)
        ft, fs = mc.get(t), mc.get(s)
        if ft and fs and ft.fit and fs.fit and ft.fit.coef[1] > 0:
            rt, rs = memory_reach(ft), memory_reach(fs)
            span = units.tokens(max(ft.fit.n_max, fs.fit.n_max))
            figs = [Figure(x, e[x].label, "prompt at 24 GB of device memory", None, r[0], r[1], None,
                           f"{m.source} memory, fit {m.fit.formula(units.size)}")
                    for x, r, m in ((t, rt, ft), (s, rs, fs))]
            return Claim(text, paper, f"24 GB of device memory reached at {t} {rt[1]}, {s} {rs[1]} "
                         f"(measured to {span} tokens)", HOLDS if rs[0] > rt[0] else DIFFERS,
                         "from device memory against prompt length, not from failures", figs)
        state = (f"{t} did not reach its limit (ok to {units.tokens(lt.max_ok)})" if lt.max_ok
                 else f"{t} served no request")
        return Claim(text, paper, "—", UNMEASURED,
                     f"{state} and no growing device-memory series was scraped to extrapolate from")

    return _decide(_pairs(run, "transformer", "ssm"), e, judge)


def memory_reach(m: MemoryCurve, budget: float = PAPER_BUDGET_BYTES) -> tuple[float, str]:
    """Prompt length at which a target's memory reaches ``budget``, and how that was found:
    the first measured length above it, else the linear fit extrapolated (∞ when flat)."""
    over = [n for n, b in zip(m.lengths, m.peak_bytes) if b >= budget]
    if over:
        return float(over[0]), f"{units.tokens(over[0])} (measured)"
    a, b = m.fit.coef if m.fit else (0.0, 0.0)
    if b <= 0 or b * m.fit.n_max < 1e-3 * max(abs(a), 1.0):  # < 0.1% growth over the span: flat
        return float("inf"), "never (flat)"
    n = (budget - a) / b
    return n, f"~{units.tokens(round(n))} (fit)"


def memory_claim(run: RunData, mem: list[MemoryCurve], e) -> list[Claim]:
    text, paper = ("SSMs need less memory at long context", "57K: Qwen2.5-0.5B 19.9 GB vs Mamba2-780m 7.2 GB (−64%)")
    mc = {m.target: m for m in mem}

    def judge(t, s) -> Claim:
        ft, fs = mc.get(t), mc.get(s)
        if not (ft and fs and ft.lengths and fs.lengths):
            lacking = ", ".join(x for x, m in ((t, ft), (s, fs)) if not (m and m.lengths))
            return Claim(text, paper, "—", UNMEASURED,
                         f"no device memory (ssm:device_memory_allocated_bytes or "
                         f"DCGM_FI_DEV_FB_USED) per prompt length for {lacking}")
        common = [n for n in ft.lengths if n in fs.lengths and n <= PAPER_MEMORY_AT]
        if not common:
            return Claim(text, paper, "—", UNMEASURED, "no prompt length with memory for both")
        n = max(common)
        mt, ms = ft.peak_bytes[ft.lengths.index(n)], fs.peak_bytes[fs.lengths.index(n)]
        saving = 1 - ms / mt if mt else 0.0
        note = "" if n >= PAPER_MEMORY_AT else f"at {units.tokens(n)}, the longest length measured for both (paper: 57K)"
        figs = [Figure(x, e[x].label, "peak memory", n, v, units.size(v), None, f"{m.source} metrics")
                for x, v, m in ((t, mt, ft), (s, ms, fs))]
        return Claim(text, paper, f"{units.tokens(n)}: {t} {units.size(mt)} vs {s} {units.size(ms)} "
                     f"({units.percent(-saving, signed=True)})", HOLDS if ms < mt else DIFFERS, note, figs)

    return _decide(_pairs(run, "transformer", "ssm"), e, judge)


def _speed_claim(run, e, text, paper, metric, fa, fb, lengths_ok, pick, regime) -> list[Claim]:
    """fa should be faster than fb (a lower ``metric``) at the length ``pick`` chooses."""
    def judge(a, b) -> Claim:
        pa, pb = _median_points(run, a, metric), _median_points(run, b, metric)
        common = sorted(set(pa) & set(pb))
        rows = [n for n in common if lengths_ok(n)]
        if not rows:
            span = f"{units.tokens(common[0])}–{units.tokens(common[-1])}" if common else "none"
            return Claim(text, paper, "—", UNMEASURED,
                         f"prompt lengths served by both {a} and {b}: {span}; the claim is about {regime}")
        n = pick(rows)
        va, vb = pa[n][0], pb[n][0]
        r = vb / va if va > 0 else float("inf")
        faster = f"{a} {units.ratio(r)} faster" if r >= 1 else f"{b} {units.ratio(1 / r)} faster"
        return Claim(text, paper, f"{units.tokens(n)}: {metric.upper()} {a} {units.duration(va)} vs {b} "
                     f"{units.duration(vb)} ({faster})", HOLDS if va < vb else DIFFERS,
                     figures=[_latency(e, a, metric, n, pa[n]), _latency(e, b, metric, n, pb[n])])

    return _decide(_pairs(run, fa, fb), e, judge)


def hybrid_claim(run: RunData, e) -> list[Claim]:
    text, paper = ("Hybrids fall between Transformers and SSMs at long prompts",
                   "57K: Falcon-H1-1.5B TTFT 2.8× below Qwen2.5-1.5B")

    def judge(t, s, h) -> Claim:
        curves = [_median_points(run, x, "ttft") for x in (t, s, h)]
        common = sorted(set(curves[0]) & set(curves[1]) & set(curves[2]))
        long_ = [n for n in common if n >= LONG]
        if not long_:
            return Claim(text, paper, "—", UNMEASURED,
                         f"longest length served by {t}, {s} and {h}: "
                         f"{units.tokens(common[-1]) if common else 'none'}; the claim is about ≥{units.tokens(LONG)}")
        n = long_[-1]
        vt, vs, vh = (c[n][0] for c in curves)
        inside = min(vt, vs) <= vh <= max(vt, vs)
        return Claim(text, paper, f"{units.tokens(n)}: TTFT {t} {units.duration(vt)}, {h} {units.duration(vh)}, "
                     f"{s} {units.duration(vs)}", HOLDS if inside else DIFFERS,
                     figures=[_latency(e, x, "ttft", n, c[n]) for x, c in zip((t, s, h), curves)])

    groups = [(t, s, h) for t in _of(run, "transformer") for s in _of(run, "ssm") for h in _of(run, "hybrid")]
    return _decide(groups, e, judge)


def energy_claim(run: RunData, energy, e) -> list[Claim]:
    text, paper = ("SSMs spend less energy per long prefill", "57K: Qwen 1,492 J, Mamba2 370 J, Falcon-H1 613 J")
    if not energy:
        return [Claim(text, paper, "—", UNMEASURED, "no GPU energy or power "
                      "(DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION / DCGM_FI_DEV_POWER_USAGE) in the metrics")]

    # one-shot prefills only: a stage whose prompts share a prefix (a cache may serve it), a
    # conversation or a stage above the sweep's concurrency measures something else
    other = {(r.target, r.stage) for r in run.requests if not run.in_sweep(r)}
    energy = [x for x in energy if (x.target, x.stage) not in other]

    def judge(t, s) -> Claim:
        et = {x.prompt_tokens: x for x in energy if x.target == t and x.prompt_tokens}
        es = {x.prompt_tokens: x for x in energy if x.target == s and x.prompt_tokens}
        common = sorted(set(et) & set(es))
        if not common:
            return Claim(text, paper, "—", UNMEASURED, f"no prompt length with energy for both {t} and {s} "
                         "(one-shot prefills at the sweep's concurrency; reuse stages left out)")
        n = common[-1]
        a, b = et[n].per_request_j, es[n].per_request_j
        figs = [Figure(x.target, e[x.target].label, "J per request", n, x.per_request_j,
                       units.joules(x.per_request_j), x.requests, f"{units.joules(x.joules)} over the stage, {x.source}")
                for x in (et[n], es[n])]
        return Claim(text, paper, f"{units.tokens(n)}: {t} {units.joules(a)} vs {s} {units.joules(b)} per request",
                     HOLDS if b < a else DIFFERS, figures=figs)

    return _decide(_pairs(run, "transformer", "ssm"), e, judge)


OPERATOR_CLAIM = "SSM kernels dominate latency (>55%)"
SSM_DOMINATES = 0.55
"""The paper's operator claim: SSM kernels over 55% of latency (46–74% on an RTX 4090)."""


def operator_claim(run: RunData, ops, e) -> list[Claim]:
    """For each SSM target of the profile pass: the SSM-scan share (scan + conv1d) of device
    time in its prefill at the longest length profiled, against the paper's 55%."""
    text, paper = OPERATOR_CLAIM, "55–71% of latency on Jetson; 46–74% on the 4090"
    ops = [r for r in (ops or []) if r.breakdown is not None and r.breakdown.total_s > 0]
    if not ops:
        return [Claim(text, paper, "—", UNMEASURED, "the run has no profile pass (a scenario's `profile:`)")]
    ssm = [t for t in dict.fromkeys(r.target for r in ops) if run.family_of(t) == "ssm"]
    if not ssm:
        return [Claim(text, paper, "—", UNMEASURED, "no SSM target was profiled")]
    out = []
    for t in ssm:
        prefill = sorted((r for r in ops if r.target == t and r.phase == "prefill"), key=lambda r: r.prompt_tokens)
        if not prefill:
            out.append(Claim(text, paper, "—", UNMEASURED, f"{t}: no prefill was profiled"))
            continue
        r = prefill[-1]
        share = r.breakdown.ssm_share
        decode = next((d for d in ops if d.target == t and d.phase == "decode" and d.prompt_tokens == r.prompt_tokens), None)
        figs = [Figure(t, e[t].label, "SSM-scan share of device time", r.prompt_tokens, share, units.percent(share),
                       how=f"prefill, the profiled request: {units.duration(r.breakdown.total_s)} of {r.device} "
                           f"time, operators.jsonl")]
        measured = f"{t} prefill at {units.tokens(r.prompt_tokens)}: SSM scan {units.percent(share)} of device time"
        if decode is not None:
            d = decode.breakdown.ssm_share
            measured += f" (decode: {units.percent(d)})"
            figs.append(Figure(t, e[t].label, "SSM-scan share of device time", decode.prompt_tokens, d,
                               units.percent(d), how=f"decode, {decode.steps or '?'} steps, operators.jsonl"))
        if r.device == "cpu" and not any(x.breakdown.by_fine["ssm"] for x in ops if x.target == t):
            out.append(Claim(text, paper, measured, UNMEASURED,
                             f"{t}'s CPU trace has no scan op of its own (transformers' torch fallback runs "
                             f"the scan as aten ops, placed by name)", figures=figs))
            continue
        out.append(Claim(text, paper, measured, HOLDS if share > SSM_DOMINATES else DIFFERS, figures=figs))
    return out


def claims_table(run, limits, mem, energy, engines=None, ops=None) -> list[Claim]:
    e = engines if engines is not None else eng.identify(run)
    families = {run.family_of(t) for t in run.targets()}
    if not {"transformer", "ssm"} <= families:
        have = ", ".join(sorted(families)) or "no targets"
        return [Claim(title, "", "—", UNMEASURED, f"the claims compare a Transformer with an SSM; "
                      f"this run has {have}") for title in TITLES if title != OPERATOR_CLAIM] \
            + operator_claim(run, ops, e)
    rows = context_claim(run, limits, mem, e) + memory_claim(run, mem, e)
    rows += _speed_claim(run, e, "Transformers are faster at short prompts",
                         "up to 1.8–1.9× below 8K (1K: 13.8 ms vs 26.0 ms)", "ttft",
                         "transformer", "ssm", lambda n: n <= SHORT, lambda ns: ns[0],
                         f"prompts ≤{units.tokens(SHORT)}")
    rows += _speed_claim(run, e, "SSMs are faster at long prompts (TTFT)",
                         "32K: 1.30 s vs 0.49 s (2.65×); up to 4× near 57K", "ttft",
                         "ssm", "transformer", lambda n: n >= LONG, lambda ns: ns[-1],
                         f"prompts ≥{units.tokens(LONG)}")
    rows += _speed_claim(run, e, "SSMs decode faster at long prompts (TPOT)",
                         "32K: 41.8 ms vs 13.7 ms", "tpot", "ssm", "transformer",
                         lambda n: n >= LONG, lambda ns: ns[-1], f"prompts ≥{units.tokens(LONG)}")
    return rows + hybrid_claim(run, e) + energy_claim(run, energy, e) + operator_claim(run, ops, e)


TITLES = ("SSMs reach longer contexts than Transformers on a 24 GB budget",
          "SSMs need less memory at long context", "Transformers are faster at short prompts",
          "SSMs are faster at long prompts (TTFT)", "SSMs decode faster at long prompts (TPOT)",
          "Hybrids fall between Transformers and SSMs at long prompts",
          "SSMs spend less energy per long prefill", OPERATOR_CLAIM)
