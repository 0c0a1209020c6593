"""Several runs side by side: each run's plots in one row per figure, and relative differences
of every target × stage they share against the first run (the baseline)."""

from __future__ import annotations

import csv
from pathlib import Path

from analysis import engines as eng
from analysis import plots, render, units
from analysis.analyze import Analysis, analyze
from analysis.records import load_run
from analysis.tables import Table

FIGURES = (("ttft", "p50", "TTFT p50"), ("tpot", "p50", "TPOT p50"), ("itl", "p99", "ITL p99"),
           ("e2e", "p50", "e2e p50"))


def relative(base: float | None, other: float | None) -> float | None:
    """(other − base) / base; None when either is missing or the base is zero."""
    if base is None or other is None or base == 0:
        return None
    return (other - base) / base


def _pct(x: float | None) -> str:
    return units.percent(x, signed=True)


def differences(runs: list[Analysis]) -> Table:
    base = runs[0]
    base_stages = {(s.target, s.stage): s for s in base.stages}
    rows = []
    for other in runs[1:]:
        for s in other.stages:
            b = base_stages.get((s.target, s.stage))
            if b is None:
                continue
            be, oe = base.engines.get(s.target), other.engines.get(s.target)
            engine = (oe.label if oe else "?") if (be and oe and be.label == oe.label) else \
                f"{be.label if be else '?'} → {oe.label if oe else '?'}"
            row = [other.run.run_id, s.target, s.stage, engine]
            for tag, stat, _label in FIGURES:
                bv, ov = getattr(b.latency[tag], stat), getattr(s.latency[tag], stat)
                row += [units.duration(bv), units.duration(ov), _pct(relative(bv, ov))]
            row += [units.rate(b.output_token_throughput), units.rate(s.output_token_throughput),
                    _pct(relative(b.output_token_throughput, s.output_token_throughput))]
            rows.append(row)
    headers = ["run", "target", "stage", "engine"]
    for _t, _s, label in FIGURES:
        headers += [f"{label} base", f"{label} run", "Δ"]
    headers += ["output tok/s base", "output tok/s run", "Δ"]
    return Table("differences", f"Relative differences against {base.run.run_id}", headers, rows,
                 note="Δ = (run − baseline) / baseline: negative latency and positive throughput "
                      "are improvements.", empty="no target × stage is shared with the baseline")


def limits_side_by_side(runs: list[Analysis]) -> Table:
    targets = []
    for a in runs:
        targets += [t for t in a.run.targets() if t not in targets]
    rows = []
    for t in targets:
        row = [t]
        for a in runs:
            c = next((x for x in a.limits if x.target == t), None)
            row.append("—" if c is None else f"{units.tokens(c.max_ok)} ({c.cause or 'not reached'}) "
                       f"· {eng.tag(t, a.engines).split(' · ', 1)[-1]}")
        rows.append(row)
    return Table("limits", "Context limits per run (longest ok, cause)",
                 ["target"] + [a.run.run_id for a in runs], rows)


def claims_side_by_side(runs: list[Analysis]) -> Table:
    titles = []
    for a in runs:
        titles += [c.claim for c in a.claims if c.claim not in titles]
    rows = []
    for title in titles:
        row = [title]
        for a in runs:
            vs = sorted({c.verdict for c in a.claims if c.claim == title})
            row.append(", ".join(vs) or "—")
        rows.append(row)
    return Table("claims", "Paper claims per run", ["claim"] + [a.run.run_id for a in runs], rows)


def write_compare(run_dirs: list[str | Path], out_dir: str | Path) -> Path:
    """Write ``out_dir/compare.html``, ``compare.md``, ``compare.csv`` and per-run PNGs."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [analyze(load_run(d)) for d in run_dirs]
    ids = [a.run.run_id for a in runs]
    if len(set(ids)) != len(ids):  # the same id twice: tell them apart by position
        for i, a in enumerate(runs):
            a.run.env["run_id"] = f"{i + 1}:{a.run.run_id}"
    per_run = []
    for i, a in enumerate(runs):
        d = out_dir / f"run{i + 1}"
        d.mkdir(exist_ok=True)
        per_run.append(plots.save_all(a, d))
    tables = [differences(runs), limits_side_by_side(runs), claims_side_by_side(runs)]
    grid = []
    for stem, caption, _b in plots.PLOTS:
        cells = "".join(render.plot_html(stem, f"{caption} — {a.run.run_id}", paths[stem])
                        for a, paths in zip(runs, per_run))
        grid.append(f'<h3>{render._e(caption)}</h3><div class="row" style="display:grid;'
                    f'grid-template-columns:repeat({len(runs)},1fr);gap:1em">{cells}</div>')
    verdicts = "".join(f"<h3>{render._e(a.run.run_id)}</h3><ul>"
                       + "".join(f"<li>{render._e(v)}</li>" for v in a.verdict) + "</ul>" for a in runs)
    n_plots = sum(p is not None for paths in per_run for p in paths.values())
    page = "\n".join([
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        f"<title>ctxload compare — {render._e(', '.join(a.run.run_id for a in runs))}</title>",
        f"<style>{render.CSS}</style></head><body data-plots=\"{n_plots}\">",
        f"<h1>ctxload compare</h1><p class=\"sub\">baseline {render._e(runs[0].run.run_id)}; "
        f"{len(runs)} runs</p>",
        *(['<section class="notes">' + "".join(f"<p>{render._e(a.run.run_id)}: {render._e(n)}</p>"
                                                for a in runs for n in a.notes) + "</section>"]
          if any(a.notes for a in runs) else []),
        '<section class="verdict"><h2>Verdicts</h2>', verdicts, "</section>",
        *(render.table_html(t) for t in tables), "<h2>Plots side by side</h2>", *grid, "</body></html>"])
    (out_dir / "compare.html").write_text(page, encoding="utf-8")
    md = ["# ctxload compare", "", f"Baseline: {runs[0].run.run_id}", ""]
    md += [f"> **{a.run.run_id}: {n}**\n" for a in runs for n in a.notes]
    md += [render.table_md(t) for t in tables]
    (out_dir / "compare.md").write_text("\n".join(md), encoding="utf-8")
    with open(out_dir / "compare.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(tables[0].headers)
        w.writerows(tables[0].rows)
    return out_dir / "compare.html"
