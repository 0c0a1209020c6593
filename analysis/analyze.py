"""Everything derived from one run, in one object, and the verdict read from it."""

from __future__ import annotations

from dataclasses import dataclass, field

from analysis import claims as claims_mod
from analysis import engines as engines_mod
from analysis import memory, reuse, scaling, stats
from analysis import operators as operators_mod
from analysis.records import RunData
from analysis.units import sig, size, tokens
from rundir.slos import Slos


@dataclass
class Analysis:
    run: RunData
    slos: Slos
    stages: list[stats.StageStats]
    fits: dict
    ttft_pairs: list[scaling.PairCompare]
    tpot_pairs: list[scaling.PairCompare]
    limits: list[scaling.ContextLimit]
    memory: list[memory.MemoryCurve]
    budget: tuple[float, str]
    sizes: list[memory.StateSizes]
    energy: list[memory.Energy]
    claims: list[claims_mod.Claim]
    reuse: list = field(default_factory=list)
    """Prefix-cache hits per target × stage (:func:`analysis.reuse.rows`)."""
    turns: list = field(default_factory=list)
    """A conversation load's turns per target (:func:`analysis.reuse.turns`)."""
    operators: list = field(default_factory=list)
    """The profile pass, classified (:func:`analysis.operators.rows`): where the time goes."""
    engines: dict[str, engines_mod.Engine] = field(default_factory=dict)
    """Each target's engine and engine class (:mod:`analysis.engines`)."""
    notes: list[str] = field(default_factory=list)
    """Shown at the top of the report: eager research paths, CPU-only runs, unknown engines."""
    verdict: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def analyze(run: RunData) -> Analysis:
    slos = stats.read_slos(run.scenario)
    fits = scaling.latency_fits(run)
    mem = memory.memory_curves(run)
    limits = scaling.context_limits(run)
    energy = memory.energy_per_request(run)
    engines = engines_mod.identify(run)
    ops = operators_mod.rows(run)
    ran = {r.target for r in run.requests}  # a target the run never reached needs no note
    a = Analysis(run=run, slos=slos, stages=stats.all_stage_stats(run, slos), fits=fits,
                 ttft_pairs=scaling.family_pairs(run, "ttft", fits),
                 tpot_pairs=scaling.family_pairs(run, "tpot", fits), limits=limits, memory=mem,
                 budget=memory.budget_bytes(run), sizes=memory.state_sizes(run), energy=energy,
                 claims=claims_mod.claims_table(run, limits, mem, energy, engines, ops), engines=engines,
                 operators=ops, reuse=reuse.rows(run), turns=reuse.turns(run),
                 notes=engines_mod.notes({t: e for t, e in engines.items() if t in ran},
                                         on_gpu=bool(run.env.get("gpus"))))
    for wave in run.waves():
        a.notes.append(f"Measured at the same time: {', '.join(wave)} ran at once, each on GPUs of its own "
                       "(placement: by_gpu). Each one's device memory, power and energy are read from its own "
                       "GPUs; the host (CPU, memory, the load generator) was shared.")
    if ran and all(getattr(memory.preset_of(run, t), "tiny", False) for t in ran):
        a.notes.append("Tiny random-weight models: every target is a tiny preset (a few layers, random "
                       "weights). Only the direction of each effect carries over to real models — a "
                       "quadratic attention prefill against a linear scan, a KV cache that grows against "
                       "a constant state — not the sizes, the times or where the lines cross.")
    a.missing = list(run.missing) + _missing_figures(a) + memory.kv_gauge_caveats(run)
    a.verdict = verdict(a)
    return a


def _missing_figures(a: Analysis) -> list[str]:
    out = []
    run = a.run
    if run.requests and not run.scrapes:
        out.append("no metric scrapes: memory and energy figures are absent")
    elif run.scrapes and not a.memory:
        out.append("no device-memory metrics (ssm:device_memory_allocated_bytes, DCGM_FI_DEV_FB_USED)")
    if run.scrapes and not a.energy:
        out.append("no GPU energy or power metrics: energy per request is absent")
    if not a.slos.given():
        out.append("the scenario sets no SLOs: goodput is absent")
    for t in run.targets():
        if not any(r.target == t for r in run.requests):
            out.append(f"target {t} has no request records (it never ran, or crashed at once)")
        elif not any(r.target == t and r.ok for r in run.requests):
            out.append(f"target {t}: every request failed")
    return out


def hardware(run: RunData) -> str:
    gpus = run.env.get("gpus") or []
    if gpus:
        g = gpus[0]
        mem = g.get("memory_total_bytes")
        return f"{len(gpus)}× {g.get('name', 'GPU')}" + (f" ({mem / 1e9:.0f} GB)" if mem else "")
    host = run.env.get("host") or {}
    if host:
        return f"CPU only ({host.get('cpu_count', '?')} cores, {host.get('platform', '')})".replace(", )", ")")
    return "unknown hardware (no env.json)"


def fastest_by_length(run: RunData, metric: str = "ttft", targets: list[str] | None = None) -> list[tuple[int, str]]:
    """(prompt length, fastest target) at every length where at least two of ``targets``
    (default: all) were served."""
    targets = run.targets() if targets is None else targets
    curves = {t: dict(zip(*scaling.curve(run, t, metric))) for t in targets}
    lengths = sorted({n for c in curves.values() for n in c})
    out = []
    for n in lengths:
        have = {t: c[n] for t, c in curves.items() if n in c}
        if len(have) >= 2:
            out.append((n, min(have, key=have.get)))
    return out


def _ranges(pairs: list[tuple[int, str]]) -> list[tuple[int, int, str]]:
    out: list[list] = []
    for n, t in pairs:
        if out and out[-1][2] == t:
            out[-1][1] = n
        else:
            out.append([n, n, t])
    return [tuple(x) for x in out]


def _classes(a: Analysis) -> list[tuple[str, list[str]]]:
    """Targets grouped by engine class (run order), the unknown ones left out."""
    out: dict[str, list[str]] = {}
    for t in a.run.targets():
        k = a.engines[t].klass if t in a.engines else engines_mod.UNKNOWN
        if k != engines_mod.UNKNOWN:
            out.setdefault(k, []).append(t)
    return list(out.items())


def _reuse_lines(a: Analysis) -> list[str]:
    """Per target with prefix-cache figures: how much of its prompts the cache served, and
    where it could not reuse what was shared."""
    out = []
    for t in dict.fromkeys(r.target for r in a.reuse):
        mine = [r for r in a.reuse if r.target == t]
        n, prompt, cached = sum(r.requests for r in mine), sum(r.prompt_tokens for r in mine), sum(r.cached_tokens for r in mine)
        shared = sum(r.shared_tokens or 0 for r in mine)
        of_shared = f"{cached / shared:.0%} of the shared tokens, " if shared else ""
        why = "" if cached or a.engines.get(t) is None or "ssm-server" not in a.engines[t].label else \
            " (ssm-server keeps no prefix cache)"
        setting = engines_mod.prefix_caching(a.run.target_info(t).get("launch_args") or [])
        out.append(f"{engines_mod.tag(t, a.engines)}: its prefix cache served {of_shared}{cached / prompt:.0%} of all "
                   f"prompt tokens over {n} request(s){why}" + (f" ({setting})" if setting else "") + ".")
    return out + [f"⚠ {w}" for w in reuse.warnings(a.run, a.reuse)]


def _operator_lines(a: Analysis) -> list[str]:
    """Per profiled target: the paper's three classes' shares of device time, each length and
    phase; and what no rule could place."""
    out = []
    for t in dict.fromkeys(r.target for r in a.operators):
        mine = [r for r in a.operators if r.target == t and r.breakdown is not None]
        if not mine:
            continue
        parts = []
        for phase in ("prefill", "decode"):
            cells = [f"{tokens(r.prompt_tokens)} " + "/".join(f"{r.breakdown.share(c):.0%}" for c in operators_mod.PAPER_CLASSES)
                     for r in mine if r.phase == phase]
            if cells:
                parts.append(f"{phase} " + ", ".join(cells))
        out.append(f"{engines_mod.tag(t, a.engines)}: device time GEMM/SSM scan/non-GEMM — " + "; ".join(parts) + ".")
        unplaced = sorted({n for r in mine for n, _ in r.breakdown.unclassified})
        if unplaced:
            share = max(r.breakdown.unclassified_s / r.breakdown.total_s for r in mine if r.breakdown.total_s)
            out.append(f"{t}: {len(unplaced)} kernel name(s) no rule places (up to {share:.0%} of a trace's time; "
                       f"listed under the operator table): " + ", ".join(n[:60] for n in unplaced[:3])
                       + (" …" if len(unplaced) > 3 else "") + ".")
    return out


def verdict(a: Analysis) -> list[str]:
    run = a.run
    tag = lambda t: engines_mod.tag(t, a.engines)  # noqa: E731
    lines = [f"Hardware: {hardware(run)}; {len(run.targets())} target(s): "
             + ", ".join(f"{tag(t)} ({run.family_of(t)})" for t in run.targets()) + "."]
    if not run.requests:
        return lines + ["No request was recorded: nothing to decide from."]
    classes = _classes(a)
    for metric, what in (("ttft", "Fastest time to first token"), ("tpot", "Fastest decoding (TPOT)")):
        for klass, members in classes:
            rng = _ranges(fastest_by_length(run, metric, members))
            if rng:
                parts = [f"{t} ({run.family_of(t)}) for {tokens(lo)}" + (f"–{tokens(hi)}" if hi != lo else "")
                         for lo, hi, t in rng]
                among = f" ({klass})" if len(classes) > 1 or klass == engines_mod.EAGER else ""
                lines.append(f"{what}{among}: " + "; ".join(parts) + " tokens.")
    apart = 0
    for p in a.ttft_pairs:
        if not engines_mod.comparable(p.a, p.b, a.engines)[0]:
            apart += bool(p.crossover_data or p.crossover_fit)
            continue
        if p.crossover_data or p.crossover_fit:
            d = f"~{tokens(round(p.crossover_data))} tokens measured" if p.crossover_data else "no crossing in the data"
            f = f", ~{tokens(round(p.crossover_fit))} from the fits" if p.crossover_fit else ""
            lines.append(f"TTFT crossover {p.a} ({p.family_a}) / {p.b} ({p.family_b}): {d}{f}.")
    if apart:
        lines.append(f"{apart} TTFT crossover(s) between targets on different engine classes are not "
                     "read as family differences (see the crossover table).")
    for c in a.limits:
        if c.max_ok is None:
            info = a.run.target_info(c.target)
            if info and not info.get("started_at") and not c.cause:
                lines.append(f"{c.target}: not run" + (f" ({info['error']})." if info.get("error")
                                                        else " (the run ended before it)."))
                continue
            lines.append(f"{c.target}: no successful request"
                         + (f" (errors: {c.cause})." if c.cause else "."))
        elif c.reached:
            lines.append(f"{c.target} context limit: served {tokens(c.max_ok)}, failed from "
                         f"{tokens(c.first_failed)} ({c.cause}" + (f": {c.why}" if c.why else "") + ").")
        else:
            lines.append(f"{c.target} served every length up to {tokens(c.max_ok)} (limit not reached).")
    for m in a.memory:
        if m.fit and m.fit.points >= 2:
            per_k = m.fit.coef[1] * 1024 / 2**20
            per_k = 0.0 if abs(per_k) < 0.005 else per_k
            lines.append(f"{m.target} peak memory {size(m.peak_bytes[0])} at {tokens(m.lengths[0])} → "
                         f"{size(m.peak_bytes[-1])} at {tokens(m.lengths[-1])} tokens "
                         f"(fit: {sig(per_k)} MiB per 1K tokens; {m.source} metrics).")
    lines += _reuse_lines(a)
    lines += _operator_lines(a)
    held = sum(c.verdict == claims_mod.HOLDS for c in a.claims)
    differ = sum(c.verdict == claims_mod.DIFFERS for c in a.claims)
    lines.append(f"Paper claims: {held} hold, {differ} differ, "
                 f"{len(a.claims) - held - differ} could not be measured on this run.")
    if a.run.problems or a.missing:
        lines.append(f"Data caveats: {len(a.run.problems)} malformed record(s) skipped, "
                     f"{len(a.missing)} missing item(s) (see the end of the report).")
    return lines
