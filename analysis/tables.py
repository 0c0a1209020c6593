"""The report's tables, one function per table. Every number is shown with its unit through
:mod:`analysis.units` (``121 ms``, ``5.65 s``, ``12.6 GB``, ``32K``), and every target with its
engine (:func:`analysis.engines.tag`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from analysis import engines as eng
from analysis import units
from analysis.analyze import Analysis
from servers import vllm_launch


@dataclass
class Table:
    key: str
    title: str
    headers: list[str]
    rows: list[list[str]]
    note: str = ""
    empty: str = "no data"
    extra: dict = field(default_factory=dict)


_t = units.duration
_tok = units.tokens


def _tag(a: Analysis, target: str) -> str:
    return eng.tag(target, a.engines)


def claims(a: Analysis) -> Table:
    return Table("claims", "Paper claims on this run",
                 ["claim", "paper (RTX 4090)", "this run", "verdict", "why / note", "figures used"],
                 [[c.claim, c.paper, c.measured, c.verdict, c.why, c.used] for c in a.claims],
                 note="holds: the run shows the paper's direction; differs: the opposite; the "
                      "magnitudes stand side by side. Claims need both families, the lengths "
                      "they are about, and targets on one engine class (a serving engine is not "
                      "compared with an eager research path). Latency figures are the median "
                      "over the ok requests of that target and prompt length in requests.jsonl "
                      "(warm-up excluded, lowest concurrency).")


def _placement(a: Analysis, target: str) -> str:
    """The GPUs a served target named, and how vLLM spread the model over several."""
    info = a.run.target_info(target)
    if not info.get("gpus"):
        return "—"
    how = vllm_launch.spread(info.get("launch_args") or [])
    return ", ".join(map(str, info["gpus"])) + (f" ({how[0]} parallel)" if how else "")


def engines(a: Analysis) -> Table:
    placed = any(a.run.target_info(t).get("gpus") for t in a.engines)
    rows = [[t, a.run.family_of(t), e.label, e.klass + (f" {eng.EAGER_MARK}" if e.eager else ""),
             *([_placement(a, t)] if placed else []), e.source] for t, e in a.engines.items()]
    return Table("engines", "Engines", ["target", "family", "engine", "engine class",
                                        *(["GPUs"] if placed else []), "how it is known"], rows,
                 note="Serving engine: vLLM with CUDA graphs, ssm-server's native mamba_ssm backend. Eager "
                      f"research path ({eng.EAGER_MARK}): on a GPU through eager PyTorch or without CUDA graphs "
                      "(ssm-server's transformers backend, --enforce-eager). On a CPU every engine runs its "
                      "portable path. Only targets of one class are compared.",
                 empty="no targets")


def latency(a: Analysis) -> Table:
    rows = []
    for s in a.stages:
        L = s.latency
        rows.append([_tag(a, s.target), s.family, s.stage, _tok(s.prompt_tokens), str(s.concurrency or "—"),
                     f"{s.ok}/{s.requests}",
                     *(_t(getattr(L["ttft"], k)) for k in ("p50", "p90", "p99", "mean")),
                     *(_t(getattr(L["tpot"], k)) for k in ("p50", "p90", "p99")),
                     *(_t(getattr(L["itl"], k)) for k in ("p50", "p99")), f"{L['itl'].count:,}",
                     *(_t(getattr(L["e2e"], k)) for k in ("p50", "p99"))])
    return Table("latency", "Latency per target × stage", [
        "target · engine", "family", "stage", "prompt", "users", "ok/sent", "TTFT p50", "TTFT p90",
        "TTFT p99", "TTFT mean", "TPOT p50", "TPOT p90", "TPOT p99", "ITL p50",
        "ITL p99", "ITL gaps", "e2e p50", "e2e p99"], rows,
        note="TTFT: request sent → first token event; ITL: each gap; TPOT: (e2e − TTFT)/(tokens − 1). "
             "Percentiles by linear interpolation, successful requests only.")


def throughput(a: Analysis) -> Table:
    slo = ", ".join(f"{k.removesuffix('_s')} ≤ {_t(v)}" for k, v in a.slos.given().items()) or "none set"
    rows = []
    for s in a.stages:
        err = ", ".join(f"{k} {v}" for k, v in sorted(s.errors.items())) or "—"
        rows.append([_tag(a, s.target), s.stage, _t(s.duration_s), units.rate(s.request_throughput),
                     units.rate(s.output_token_throughput), units.rate(s.total_token_throughput),
                     units.rate(s.goodput), units.percent(s.good_fraction), err])
    return Table("throughput", "Throughput, goodput and errors per target × stage", [
        "target · engine", "stage", "duration", "requests/s", "output tok/s", "total tok/s",
        "goodput req/s", "meeting SLOs", "errors by kind"], rows,
        note=f"Rates over the stage's wall time (first send → last end). SLOs: {slo}.")


def fits(a: Analysis) -> Table:
    rows = []
    for (t, metric), f in a.fits.items():
        rows.append([_tag(a, t), a.run.family_of(t), metric.upper(), f.formula(units.duration),
                     "—" if f.r2 is None else f"{f.r2:.4f}", str(f.points),
                     f"{_tok(f.n_min)}–{_tok(f.n_max)}"])
    for m in a.memory:
        if m.fit:
            rows.append([_tag(a, m.target), m.family, "memory", m.fit.formula(units.size),
                         "—" if m.fit.r2 is None else f"{m.fit.r2:.4f}", str(m.fit.points),
                         f"{_tok(m.fit.n_min)}–{_tok(m.fit.n_max)}"])
    return Table("fits", "Scaling fits (k = prompt tokens / 1,024)",
                 ["target · engine", "family", "figure", "fit", "R²", "points", "range"], rows,
                 note="TTFT = a + b·k + c·k², TPOT and memory = a + b·k, least squares "
                      "over the per-length medians of the context sweep. R² — when the data is flat.",
                 empty="too few prompt lengths to fit (a quadratic needs 3)")


def crossovers(a: Analysis) -> Table:
    rows = []
    for p in a.ttft_pairs + a.tpot_pairs:
        rows.append([f"{_tag(a, p.a)} ({p.family_a}) / {_tag(a, p.b)} ({p.family_b})", p.metric.upper(),
                     "none in data" if p.crossover_data is None else _tok(p.crossover_data),
                     "none" if p.crossover_fit is None else _tok(p.crossover_fit),
                     eng.comparable(p.a, p.b, a.engines)[1]])
    return Table("crossovers", "Crossover prompt lengths (tokens)",
                 ["pair", "figure", "from the data", "from the fits", "comparable"], rows,
                 note="Data: log-linear interpolation between the measured lengths that bracket "
                      "the change of sign; fits: the smallest positive root of their difference "
                      "(searched from the shortest to 4× the longest length measured; within the lengths both measured, only where the data crosses too). "
                      "Comparable: both targets on one engine class; a crossover between a serving engine "
                      "and an eager research path is the engines', not the families'.",
                 empty="needs targets of two families served at common prompt lengths")


def speedups(a: Analysis) -> Table:
    rows = []
    for p in a.ttft_pairs + a.tpot_pairs:
        same = eng.comparable(p.a, p.b, a.engines)[1]
        for n, r in zip(p.common, p.ratio):
            faster, x = (p.b, r) if r >= 1 else (p.a, 1 / r if r else float("inf"))
            rows.append([p.metric.upper(), f"{_tag(a, p.a)} vs {_tag(a, p.b)}", _tok(n),
                         f"{faster} {units.ratio(x)}", same])
    return Table("speedups", "× faster at n (p50 per length)",
                 ["figure", "pair", "prompt", "faster", "comparable"], rows,
                 note="Comparable: both targets on one engine class (see the crossover table).",
                 empty="needs targets of two families served at common prompt lengths")


def limits(a: Analysis) -> Table:
    rows = [[_tag(a, c.target), c.family, _tok(c.max_ok), _tok(c.first_failed) if c.first_failed else "—",
             (c.cause or "not reached") + (f": {c.why}" if c.why else ""), _tok(c.max_tested), c.message or ""]
            for c in a.limits]
    return Table("limits", "Context limits", ["target · engine", "family", "longest ok", "first failed",
                 "cause", "longest tried", "error message"], rows,
                 note="Longest ok: the longest prompt with a successful request; cause: the most "
                      "common error kind at the first failed length.")


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
        fit_tokens = _tok(left // kv) if left and kv and left > 0 else "—"
        rows.append([_tag(a, t), a.run.family_of(t), m.source if m else "—",
                     units.gb(m.baseline_bytes) if m else "—",
                     units.gb(max(m.peak_bytes)) if m and m.peak_bytes else "—",
                     f"{round(m.fit.coef[1]) + 0:,} B" if m and m.fit else "—",  # whole bytes: less is fit noise
                     f"{kv:,} B" if kv else "—", units.size(st) if st else "—", units.gb(left), fit_tokens,
                     s.source if s else ""])
    return Table("memory", f"Memory (budget {units.gb(budget)}: {why})", [
        "target · engine", "family", "source", "baseline", "peak", "measured per token", "KV per token",
        "state per sequence", "left for context", "KV tokens that fit", "sizes from"], rows,
        note="Baseline: the smallest reading (weights and runtime). KV B/token = 2 × attention layers "
             "× KV heads × head dim × dtype bytes; SSM state is constant per sequence.",
        empty="no device-memory metrics and no model presets in env.json")


def _gpus(by_gpu: dict[str, float] | None) -> str:
    """The GPUs an energy figure adds up, each with its share when there are several."""
    named = sorted((g for g in by_gpu or {} if g), key=lambda g: (len(g), g))
    if not named:
        return "the exporter's"
    if len(named) == 1:
        return named[0]
    return ", ".join(f"{g}: {units.joules(by_gpu[g])}" for g in named)


def energy(a: Analysis) -> Table:
    rows = [[_tag(a, e.target), e.stage, _tok(e.prompt_tokens), str(e.requests), units.joules(e.joules),
             units.joules(e.per_request_j), _gpus(e.by_gpu), e.source] for e in a.energy]
    return Table("energy", "Energy per request", ["target · engine", "stage", "prompt", "ok requests",
                 "energy", "per request", "GPUs", "from"], rows,
                 empty="no GPU exporter energy or power in the metrics",
                 note="GPUs: a target's own (its `gpus`: their energy only, each GPU's share beside it), "
                      "else every GPU the exporter reports.")


def errors(a: Analysis) -> Table:
    rows = [[_tag(a, s.target), s.stage, k, str(v), s.error_examples.get(k, "")]
            for s in a.stages for k, v in sorted(s.errors.items())]
    return Table("errors", "Errors by kind", ["target · engine", "stage", "kind", "count", "example"], rows,
                 empty="no failed request")


def plan(a: Analysis) -> Table:
    from analysis import plan_check
    from servers.plan import MISS

    rows = []
    for c in plan_check.checks(a.run, a.limits):
        fmt = units.gb if c.unit == "bytes" else _tok
        miss = "—" if c.miss is None else units.percent(c.miss, signed=True)
        rows.append([_tag(a, c.target), c.figure, fmt(c.planned) if c.planned else "no limit", fmt(c.measured),
                     miss + (" ⚠ off by more than 10%" if c.flagged else ""), c.source])
    return Table("plan", "The plan against the run (`ctxload plan`)", [
        "target · engine", "figure", "planned", "measured", "measured vs planned", "measured from"], rows,
        note=f"The plan sizes each target from its config, engine and memory_budget before any request "
             f"(docs/analysis.md); a measured figure more than {MISS:.0%} from it is flagged.",
        empty="no target with a preset, an engine and a memory_budget")


def operators(a: Analysis) -> Table:
    from analysis.operators import FINE, PAPER_CLASSES
    from rundir.operators import STEPS_SOURCES

    rows, unplaced = [], {}
    for r in a.operators:
        b = r.breakdown
        if b is None:
            rows.append([_tag(a, r.target), _tok(r.prompt_tokens), r.phase, "—", "—", "—", "—", "—",
                         r.error or "nothing traced", "—"])
            continue
        time = _t(b.total_s) + (f" ({_t(r.per_step_s)} a step, {r.steps})" if r.per_step_s else "")
        finer = ", ".join(f"{c} {units.percent(b.share(c))}" for c in FINE if b.share(c) >= 0.01)
        top = b.top[0]
        asked = ("TTFT " + _t(r.ttft_s)) if r.phase == "prefill" and r.ttft_s else (
            f"{r.steps} steps" + (f" ({STEPS_SOURCES[r.steps_source]})" if r.steps_source in STEPS_SOURCES else "")
            if r.steps else "—")
        rows.append([_tag(a, r.target), _tok(r.prompt_tokens), r.phase, f"{r.device} {time}",
                     *(units.percent(b.share(c)) for c in PAPER_CLASSES), finer,
                     f"{top[0][:70]} ({units.percent(top[3])}, {top[1] or 'unplaced'})", asked])
        for n, t in b.unclassified:
            unplaced[n] = max(unplaced.get(n, 0.0), t / b.total_s if b.total_s else 0.0)
    note = ("Device time of the profiled requests, from the engine's own profiler (a scenario's `profile:`; "
            "one prefill request and one decode window per row, not in requests.jsonl): GPU kernels, or "
            "CPU operators by self time. GEMM includes attention; SSM scan is the scan, the state update "
            "and the causal conv1d; the finer classes and the rules are docs/analysis.md's.")
    if unplaced:
        note += (" Kernels no rule places (counted in the total, in no class): "
                 + "; ".join(f"{n[:80]} ({units.percent(s)})" for n, s in
                             sorted(unplaced.items(), key=lambda kv: -kv[1])[:12]) + ".")
    return Table("operators", "Where the time goes (operator classes)",
                 ["target · engine", "prompt", "phase", "device time", *PAPER_CLASSES, "finer", "top kernel",
                  "profiled request"], rows, note=note,
                 empty="no profile pass (a scenario's `profile:`)")


def reuse(a: Analysis) -> Table:
    rows = [[_tag(a, r.target), r.stage, str(r.requests), _tok(r.prompt_tokens // max(r.requests, 1)),
             _tok(r.shared_tokens // r.requests) if r.shared_tokens is not None else "—",
             units.percent(r.hit_rate), units.percent(r.shared_hit_rate) if r.shared_hit_rate is not None else "—",
             units.percent(r.metrics_hit_rate) if r.metrics_hit_rate is not None else "—",
             _tok(round(r.uncached_p50)) if r.uncached_p50 is not None else "—", _t(r.ttft_p50),
             f"{r.speedup:.2f}×" if r.speedup is not None else "—"]
            for r in a.reuse]
    return Table("reuse", "Prefix reuse", ["target · engine", "stage", "requests", "prompt tokens (mean)",
                 "shared tokens (mean)", "cached / prompt", "cached / shared", "hit rate (server's metrics)",
                 "uncached tokens p50", "TTFT p50",
                 "faster with reuse"],
                 rows, note="Cached: the prompt tokens the server says it took from its prefix cache "
                            "(usage.prompt_tokens_details.cached_tokens); shared: the tokens each request's "
                            "group shares (a shared_prefix prompt source). Hit rate (server's metrics): vLLM's "
                            "own count over the stage, vllm:prefix_cache_hits_total over "
                            "vllm:prefix_cache_queries_total. TTFT stands beside the uncached part, "
                            "what the prefill computed. Faster with reuse: median TTFT of the stage's requests "
                            "the cache served nothing of (a group's first) over that of those it served at least "
                            "half their shared tokens, at one prompt length.",
                 empty="no prefix-cache figures (a shared_prefix prompt source, a server reporting cached tokens)")


def turns(a: Analysis) -> Table:
    rows = [[_tag(a, r.target), str(r.turn + 1), str(r.requests),
             _tok(round(r.prompt_p50)) if r.prompt_p50 is not None else "—",
             _tok(round(r.cached_p50)) if r.cached_p50 is not None else "—", _t(r.ttft_p50)]
            for r in a.turns]
    return Table("turns", "Conversations, turn by turn", ["target · engine", "turn", "requests",
                 "prompt tokens p50", "cached tokens p50", "TTFT p50"], rows,
                 note="Each turn resends the conversation so far (every user message and the reply streamed "
                      "to it) with a new message: the prompt grows turn by turn, and a prefix cache can serve "
                      "the history.",
                 empty="no conversation load")


ALL = (engines, claims, latency, throughput, fits, crossovers, speedups, limits, memory, plan, energy, reuse,
       turns, operators, errors)
