"""``write_report(run_dir)``: read a run directory, derive the figures, write ``report/``.

Outputs: ``report.html`` (self-contained), ``report.md``, one PNG per plot, ``summary.csv``
and ``summary.parquet`` (one row per target × stage, base units).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterable

from analysis import plots, render, tables
from analysis.analyze import Analysis, analyze
from analysis.records import Scrape, load_run


def write_summary(a: Analysis, out_dir: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for s in a.stages:
        row = s.row()
        e = a.engines.get(s.target)
        row = {"target": row.pop("target"), "engine": e.label if e else "",
               "engine_class": e.klass if e else "", **row}
        rows.append(row)
    headers = list(rows[0]) if rows else ["target", "engine", "engine_class", "family", "stage"]
    with open(out_dir / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=headers)
        w.writeheader()
        w.writerows(rows)
    table = pa.Table.from_pylist(rows) if rows else pa.table({h: pa.array([], pa.string()) for h in headers})
    pq.write_table(table, out_dir / "summary.parquet")


def caveats(a: Analysis) -> list[str]:
    return list(a.missing) + list(a.run.problems)


def build(a: Analysis, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = plots.save_all(a, out_dir)
    plot_list = [(stem, caption, paths[stem]) for stem, caption, _b in plots.PLOTS]
    tabs = [f(a) for f in tables.ALL]
    run = a.run
    title = f"ctxload report — {run.run_id}"
    state = "finished" if run.finished else "partial (no finished_at)"
    warm = f" (+{len(run.warmup)} warm-up, not counted)" if run.warmup else ""
    sub = (f"{run.scenario.get('name', 'scenario ?')} · {len(run.requests)} requests{warm} · "
           f"{len(run.scrapes)} metric scrapes ({run.metrics_source}) · started "
           f"{run.env.get('started_at', '?')} · {state}")
    legend = {f: plots.colour(f) for f in ("transformer", "ssm", "hybrid")}
    cav = caveats(a)
    page = render.html_page(title, sub, a.verdict, legend, plot_list, tabs, cav, a.notes)
    (out_dir / "report.html").write_text(page, encoding="utf-8")
    (out_dir / "report.md").write_text(render.markdown(title, sub, a.verdict, plot_list, tabs, cav, a.notes),
                                       encoding="utf-8")
    write_summary(a, out_dir)
    return out_dir / "report.html"


def write_report(run_dir: str | Path, scrapes: Iterable[Scrape] | None = None,
                 out_dir: str | Path | None = None) -> Path:
    """Write ``run_dir/report/`` (or ``out_dir``) and return the path of ``report.html``.

    ``scrapes`` (e.g. from :func:`analysis.prometheus.fetch`) replace metrics.jsonl.
    """
    run = load_run(run_dir, scrapes=scrapes)
    out = Path(out_dir) if out_dir else Path(run_dir) / "report"
    return build(analyze(run), out)
