"""The report's tables, with display units (ms, GB, tokens/s): one function per table."""

from __future__ import annotations

from dataclasses import dataclass, field

from analysis.analyze import Analysis
from analysis.claims import _fmt_n


@dataclass
class Table:
    key: str
    title: str
    headers: list[str]
    rows: list[list[str]]
    note: str = ""
    empty: str = "no data"
    extra: dict = field(default_factory=dict)


def _ms(v):
    return "—" if v is None else f"{v * 1e3:.3g}"


def _s(v):
    return "—" if v is None else f"{v:.3g}"


def _gb(v):
    return "—" if v is None else f"{v / 1e9:.3g}"


def claims(a: Analysis) -> Table:
    return Table("claims", "Paper claims on this run",
                 ["claim", "paper (RTX 4090)", "this run", "verdict", "why / note"],
                 [[c.claim, c.paper, c.measured, c.verdict, c.why] for c in a.claims],
                 note="holds: the run shows the paper's direction; differs: the opposite; the "
                      "magnitudes stand side by side. Claims need both families and the lengths "
                      "they are about.")


def latency(a: Analysis) -> Table:
    rows = []
    for s in a.stages:
        L = s.latency
        rows.append([s.target, s.family, s.stage, _fmt_n(s.prompt_tokens), str(s.concurrency or "—"),
                     f"{s.ok}/{s.requests}",
                     *(_ms(getattr(L["ttft"], k)) for k in ("p50", "p90", "p99", "mean")),
                     *(_ms(getattr(L["tpot"], k)) for k in ("p50", "p90", "p99")),
                     *(_ms(getattr(L["itl"], k)) for k in ("p50", "p99")), str(L["itl"].count),
                     *(_s(getattr(L["e2e"], k)) for k in ("p50", "p99"))])
    return Table("latency", "Latency per target × stage", [
        "target", "family", "stage", "prompt", "users", "ok/sent", "TTFT p50 ms", "TTFT p90 ms",
        "TTFT p99 ms", "TTFT mean ms", "TPOT p50 ms", "TPOT p90 ms", "TPOT p99 ms", "ITL p50 ms",
        "ITL p99 ms", "ITL gaps", "e2e p50 s", "e2e p99 s"], rows,
        note="TTFT: request sent → first token event; ITL: each gap; TPOT: (e2e − TTFT)/(tokens − 1). "
             "Percentiles by linear interpolation, successful requests only.")


def throughput(a: Analysis) -> Table:
    slo = ", ".join(f"{k} ≤ {v * 1e3:.4g} ms" for k, v in a.slos.items()) or "none set"
    rows = []
    for s in a.stages:
        err = ", ".join(f"{k} {v}" for k, v in sorted(s.errors.items())) or "—"
        rows.append([s.target, s.stage, _s(s.duration_s), _s(s.request_throughput),
                     _s(s.output_token_throughput), _s(s.total_token_throughput), _s(s.goodput),
                     "—" if s.good_fraction is None else f"{s.good_fraction:.0%}", err])
    return Table("throughput", "Throughput, goodput and errors per target × stage", [
        "target", "stage", "duration s", "requests/s", "output tok/s", "total tok/s",
        "goodput req/s", "meeting SLOs", "errors by kind"], rows,
        note=f"Rates over the stage's wall time (first send → last end). SLOs: {slo}.")


def fits(a: Analysis) -> Table:
    rows = []
    for (t, metric), f in a.fits.items():
        rows.append([t, a.run.family_of(t), metric.upper(), f.formula("s"),
                     "—" if f.r2 is None else f"{f.r2:.4f}", str(f.points),
                     f"{_fmt_n(f.n_min)}–{_fmt_n(f.n_max)}"])
    for m in a.memory:
        if m.fit:
            rows.append([m.target, m.family, "memory", m.fit.formula("B"),
                         "—" if m.fit.r2 is None else f"{m.fit.r2:.4f}", str(m.fit.points),
                         f"{_fmt_n(m.fit.n_min)}–{_fmt_n(m.fit.n_max)}"])
    return Table("fits", "Scaling fits (n = prompt tokens)",
                 ["target", "family", "figure", "fit", "R²", "points", "range"], rows,
                 note="TTFT(n) = a + b·n + c·n², TPOT(n) and memory(n) = a + b·n, least squares "
                      "over the per-length medians of the context sweep. R² — when the data is flat.",
                 empty="too few prompt lengths to fit (a quadratic needs 3)")


def crossovers(a: Analysis) -> Table:
    rows = []
    for p in a.ttft_pairs + a.tpot_pairs:
        rows.append([f"{p.a} ({p.family_a}) / {p.b} ({p.family_b})", p.metric.upper(),
                     "none in data" if p.crossover_data is None else f"{p.crossover_data:,.0f}",
                     "none" if p.crossover_fit is None else f"{p.crossover_fit:,.0f}"])
    return Table("crossovers", "Crossover prompt lengths (tokens)",
                 ["pair", "figure", "from the data", "from the fits"], rows,
                 note="Data: log-linear interpolation between the measured lengths that bracket "
                      "the change of sign; fits: the smallest positive root of their difference "
                      "(searched from the shortest to 4× the longest length measured: below the data, the data decides).",
                 empty="needs targets of two families served at common prompt lengths")


def speedups(a: Analysis) -> Table:
    rows = []
    for p in a.ttft_pairs + a.tpot_pairs:
        for n, r in zip(p.common, p.ratio):
            faster, x = (p.b, r) if r >= 1 else (p.a, 1 / r if r else float("inf"))
            rows.append([p.metric.upper(), f"{p.a} vs {p.b}", _fmt_n(n), f"{faster} {x:.2f}×"])
    return Table("speedups", "× faster at n (p50 per length)", ["figure", "pair", "prompt", "faster"],
                 rows, empty="needs targets of two families served at common prompt lengths")


def limits(a: Analysis) -> Table:
    rows = [[c.target, c.family, _fmt_n(c.max_ok), _fmt_n(c.first_failed) if c.first_failed else "—",
             c.cause or "not reached", _fmt_n(c.max_tested), c.message or ""] for c in a.limits]
    return Table("limits", "Context limits", ["target", "family", "longest ok", "first failed",
                 "cause", "longest tried", "error message"], rows,
                 note="Longest ok: the longest prompt with a successful request; cause: the most "
                      "common error kind beyond it.")


def memory(a: Analysis) -> Table:
    budget, why = a.budget
    sizes = {s.target: s for s in a.sizes}
    rows = []
    for t in a.run.targets():
        m = next((x for x in a.memory if x.target == t), None)
        s = sizes.get(t)
        if m is None and s is None:
            continue
        kv = s.kv_bytes_per_token if s else None
        st = s.state_bytes_per_sequence if s else None
        left = (budget - m.baseline_bytes) if m and m.baseline_bytes is not None else None
        fit_tokens = f"{left / kv:,.0f}" if left and kv else "—"
        rows.append([t, a.run.family_of(t), m.source if m else "—",
                     _gb(m.baseline_bytes) if m else "—",
                     _gb(max(m.peak_bytes)) if m and m.peak_bytes else "—",
                     f"{m.fit.coef[1]:,.0f}" if m and m.fit else "—",
                     f"{kv:,}" if kv else "—", f"{st:,.0f}" if st else "—", _gb(left), fit_tokens,
                     s.source if s else ""])
    return Table("memory", f"Memory (budget {budget / 1e9:.3g} GB: {why})", [
        "target", "family", "source", "baseline GB", "peak GB", "measured B/token", "KV B/token",
        "state B/sequence", "left for context GB", "KV tokens that fit", "sizes from"], rows,
        note="Baseline: the smallest reading (weights and runtime). KV B/token = 2 × attention layers "
             "× KV heads × head dim × dtype bytes; SSM state is constant per sequence.",
        empty="no device-memory metrics and no model presets in env.json")


def energy(a: Analysis) -> Table:
    rows = [[e.target, e.stage, _fmt_n(e.prompt_tokens), str(e.requests), f"{e.joules:.4g}",
             f"{e.per_request_j:.4g}", e.source] for e in a.energy]
    return Table("energy", "Energy per request", ["target", "stage", "prompt", "ok requests",
                 "energy J", "J per request", "from"], rows,
                 empty="no GPU exporter energy or power in the metrics")


def errors(a: Analysis) -> Table:
    rows = [[s.target, s.stage, k, str(v), s.error_examples.get(k, "")]
            for s in a.stages for k, v in sorted(s.errors.items())]
    return Table("errors", "Errors by kind", ["target", "stage", "kind", "count", "example"], rows,
                 empty="no failed request")


ALL = (claims, latency, throughput, fits, crossovers, speedups, limits, memory, energy, errors)
