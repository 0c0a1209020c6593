"""The claims table: each PAPER.md claim beside what this run measured.

A verdict is ``holds`` (the run shows the direction the paper claims), ``differs`` (it shows
the opposite), or ``could not be measured`` with the reason (the run lacks the data or the
prompt lengths the claim is about). The magnitude measured stands beside the paper's.
"""

from __future__ import annotations

from dataclasses import dataclass

from analysis.memory import PAPER_BUDGET_BYTES, MemoryCurve
from analysis.records import RunData
from analysis.scaling import ContextLimit, curve

HOLDS, DIFFERS, UNMEASURED = "holds", "differs", "could not be measured"
SHORT = 8192
"""The paper's short-prompt regime: below 8K tokens."""
LONG = 16384
"""Shortest prompt length at which a long-prompt claim is tested (the paper's are 32K–57K)."""
PAPER_MEMORY_AT = 57344


@dataclass
class Claim:
    claim: str
    paper: str
    measured: str
    verdict: str
    why: str = ""


def _fmt_n(n: float | None) -> str:
    if n is None:
        return "?"
    return f"{n / 1024:.0f}K" if n >= 1024 and n % 1024 == 0 else f"{n:,.0f}"


def _first(run: RunData, family: str) -> list[str]:
    return [t for t in run.targets() if run.family_of(t) == family]


def _pairs(run: RunData, fa: str, fb: str):
    return [(a, b) for a in _first(run, fa) for b in _first(run, fb)]


def _common(run, a, b, metric):
    na, ya = curve(run, a, metric)
    nb, yb = curve(run, b, metric)
    common = sorted(set(na) & set(nb))
    return [(n, ya[na.index(n)], yb[nb.index(n)]) for n in common]


def context_claim(run: RunData, limits: list[ContextLimit], mem: list[MemoryCurve]) -> list[Claim]:
    text, paper = ("SSMs reach longer contexts than Transformers on a 24 GB budget",
                   "Mamba/Mamba2 to 220K; Qwen2.5/Llama-3.2 OOM at 57K–65K (~3.8–4×)")
    by = {c.target: c for c in limits}
    mc = {m.target: m for m in mem}
    out = []
    for t, s in _pairs(run, "transformer", "ssm"):
        lt, ls = by[t], by[s]
        if lt.reached and lt.max_ok:
            if ls.reached and ls.max_ok:
                r = ls.max_ok / lt.max_ok
                out.append(Claim(text, paper, f"{s} {_fmt_n(ls.max_ok)} vs {t} {_fmt_n(lt.max_ok)} "
                                 f"({r:.2g}×; {t} ended by {lt.cause})", HOLDS if r > 1 else DIFFERS))
            elif ls.max_ok and ls.max_ok > lt.max_ok:
                out.append(Claim(text, paper, f"{s} ok to {_fmt_n(ls.max_ok)} (limit not reached) vs "
                                 f"{t} ended after {_fmt_n(lt.max_ok)} by {lt.cause} "
                                 f"(≥{ls.max_ok / lt.max_ok:.2g}×)", HOLDS))
            else:
                out.append(Claim(text, paper, f"{t} ended after {_fmt_n(lt.max_ok)} by {lt.cause}",
                                 UNMEASURED, f"{s} was not tested beyond that length"))
            continue
        ft, fs = mc.get(t), mc.get(s)
        if ft and fs and ft.fit and fs.fit and ft.fit.coef[1] > 0:
            rt, rs = memory_reach(ft), memory_reach(fs)
            span = _fmt_n(max(ft.fit.n_max, fs.fit.n_max))
            out.append(Claim(text, paper, f"24 GB of device memory reached at {t} {rt[1]}, {s} {rs[1]} "
                             f"(measured to {span} tokens)", HOLDS if rs[0] > rt[0] else DIFFERS,
                             "from device memory against prompt length, not from failures"))
            continue
        state = (f"{t} did not reach its limit (ok to {_fmt_n(lt.max_ok)})" if lt.max_ok
                 else f"{t} served no request")
        out.append(Claim(text, paper, "—", UNMEASURED,
                         f"{state} and no growing device-memory series was scraped to extrapolate from"))
    return out


def memory_reach(m: MemoryCurve, budget: float = PAPER_BUDGET_BYTES) -> tuple[float, str]:
    """Prompt length at which a target's memory reaches ``budget``, and how that was found:
    the first measured length above it, else the linear fit extrapolated (∞ when flat)."""
    over = [n for n, b in zip(m.lengths, m.peak_bytes) if b >= budget]
    if over:
        return float(over[0]), f"{_fmt_n(over[0])} (measured)"
    a, b = m.fit.coef if m.fit else (0.0, 0.0)
    if b <= 0:
        return float("inf"), "never (flat)"
    n = (budget - a) / b
    return n, f"~{_fmt_n(round(n))} (fit)"


def memory_claim(run: RunData, mem: list[MemoryCurve]) -> list[Claim]:
    text, paper = ("SSMs need less memory at long context", "57K: Qwen2.5-0.5B 19.9 GB vs Mamba2-780m 7.2 GB (−64%)")
    mc = {m.target: m for m in mem}
    out = []
    for t, s in _pairs(run, "transformer", "ssm"):
        ft, fs = mc.get(t), mc.get(s)
        if not (ft and fs and ft.lengths and fs.lengths):
            lacking = ", ".join(x for x, m in ((t, ft), (s, fs)) if not (m and m.lengths))
            out.append(Claim(text, paper, "—", UNMEASURED,
                             f"no device memory (ssm:device_memory_allocated_bytes or "
                             f"DCGM_FI_DEV_FB_USED) per prompt length for {lacking}"))
            continue
        common = [n for n in ft.lengths if n in fs.lengths and n <= PAPER_MEMORY_AT]
        if not common:
            out.append(Claim(text, paper, "—", UNMEASURED, "no prompt length with memory for both"))
            continue
        n = max(common)
        mt, ms = ft.peak_bytes[ft.lengths.index(n)], fs.peak_bytes[fs.lengths.index(n)]
        saving = 1 - ms / mt if mt else 0.0
        note = "" if n >= PAPER_MEMORY_AT else f"at {_fmt_n(n)}, the longest length measured for both (paper: 57K)"
        out.append(Claim(text, paper, f"{_fmt_n(n)}: {t} {mt / 1e9:.3g} GB vs {s} {ms / 1e9:.3g} GB "
                         f"({-saving:+.0%})", HOLDS if ms < mt else DIFFERS, note))
    return out


def _speed_claim(run, text, paper, metric, fa, fb, lengths_ok, pick, regime) -> list[Claim]:
    """fa should be faster than fb (a lower ``metric``) at the length ``pick`` chooses."""
    out = []
    for a, b in _pairs(run, fa, fb):
        rows = [x for x in _common(run, a, b, metric) if lengths_ok(x[0])]
        if not rows:
            allc = _common(run, a, b, metric)
            span = f"{_fmt_n(allc[0][0])}–{_fmt_n(allc[-1][0])}" if allc else "none"
            out.append(Claim(text, paper, "—", UNMEASURED,
                             f"prompt lengths served by both {a} and {b}: {span}; the claim is about {regime}"))
            continue
        n, va, vb = pick(rows)
        r = vb / va if va > 0 else float("inf")
        out.append(Claim(text, paper, f"{_fmt_n(n)}: {metric.upper()} {a} {va * 1e3:.3g} ms vs {b} "
                         f"{vb * 1e3:.3g} ms ({a} {r:.2g}× faster)" if r >= 1 else
                         f"{_fmt_n(n)}: {metric.upper()} {a} {va * 1e3:.3g} ms vs {b} {vb * 1e3:.3g} ms "
                         f"({b} {1 / r:.2g}× faster)", HOLDS if va < vb else DIFFERS))
    return out


def hybrid_claim(run: RunData) -> list[Claim]:
    text, paper = ("Hybrids fall between Transformers and SSMs at long prompts",
                   "57K: Falcon-H1-1.5B TTFT 2.8× below Qwen2.5-1.5B")
    out = []
    for t in _first(run, "transformer"):
        for s in _first(run, "ssm"):
            for h in _first(run, "hybrid"):
                curves = [dict(zip(*curve(run, x, "ttft"))) for x in (t, s, h)]
                common = sorted(set(curves[0]) & set(curves[1]) & set(curves[2]))
                long_ = [n for n in common if n >= LONG]
                if not long_:
                    out.append(Claim(text, paper, "—", UNMEASURED,
                                     f"longest length served by {t}, {s} and {h}: "
                                     f"{_fmt_n(common[-1]) if common else 'none'}; the claim is about ≥{_fmt_n(LONG)}"))
                    continue
                n = long_[-1]
                vt, vs, vh = (c[n] for c in curves)
                inside = min(vt, vs) <= vh <= max(vt, vs)
                out.append(Claim(text, paper, f"{_fmt_n(n)}: TTFT {t} {vt * 1e3:.3g} ms, {h} {vh * 1e3:.3g} ms, "
                                 f"{s} {vs * 1e3:.3g} ms", HOLDS if inside else DIFFERS))
    return out


def energy_claim(run: RunData, energy) -> list[Claim]:
    text, paper = ("SSMs spend less energy per long prefill", "57K: Qwen 1,492 J, Mamba2 370 J, Falcon-H1 613 J")
    if not energy:
        return [Claim(text, paper, "—", UNMEASURED, "no GPU energy or power "
                      "(DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION / DCGM_FI_DEV_POWER_USAGE) in the metrics")]
    out = []
    for t, s in _pairs(run, "transformer", "ssm"):
        et = {e.prompt_tokens: e.per_request_j for e in energy if e.target == t and e.prompt_tokens}
        es = {e.prompt_tokens: e.per_request_j for e in energy if e.target == s and e.prompt_tokens}
        common = sorted(set(et) & set(es))
        if not common:
            out.append(Claim(text, paper, "—", UNMEASURED, f"no prompt length with energy for both {t} and {s}"))
            continue
        n = common[-1]
        out.append(Claim(text, paper, f"{_fmt_n(n)}: {t} {et[n]:.3g} J vs {s} {es[n]:.3g} J per request",
                         HOLDS if es[n] < et[n] else DIFFERS))
    return out


def claims_table(run, limits, mem, energy) -> list[Claim]:
    families = {run.family_of(t) for t in run.targets()}
    rows = context_claim(run, limits, mem) + memory_claim(run, mem)
    rows += _speed_claim(run, "Transformers are faster at short prompts",
                         "up to 1.8–1.9× below 8K (1K: 13.8 ms vs 26.0 ms)", "ttft",
                         "transformer", "ssm", lambda n: n <= SHORT, lambda r: r[0],
                         f"prompts ≤{_fmt_n(SHORT)}")
    rows += _speed_claim(run, "SSMs are faster at long prompts (TTFT)",
                         "32K: 1.30 s vs 0.49 s (2.65×); up to 4× near 57K", "ttft",
                         "ssm", "transformer", lambda n: n >= LONG, lambda r: r[-1],
                         f"prompts ≥{_fmt_n(LONG)}")
    rows += _speed_claim(run, "SSMs decode faster at long prompts (TPOT)",
                         "32K: 41.8 ms vs 13.7 ms", "tpot", "ssm", "transformer",
                         lambda n: n >= LONG, lambda r: r[-1], f"prompts ≥{_fmt_n(LONG)}")
    rows += hybrid_claim(run) + energy_claim(run, energy)
    if not {"transformer", "ssm"} <= families:
        have = ", ".join(sorted(families)) or "no targets"
        return [Claim(title, "", "—", UNMEASURED, f"the claims compare a Transformer with an SSM; "
                      f"this run has {have}") for title in TITLES]
    return rows


TITLES = ("SSMs reach longer contexts than Transformers on a 24 GB budget",
          "SSMs need less memory at long context", "Transformers are faster at short prompts",
          "SSMs are faster at long prompts (TTFT)", "SSMs decode faster at long prompts (TPOT)",
          "Hybrids fall between Transformers and SSMs at long prompts",
          "SSMs spend less energy per long prefill")
