"""Writing the report: a self-contained HTML page (plots inlined as base64 PNG) and Markdown."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from analysis.tables import Table

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;
color:#222;padding:0 1em}
h1{margin-bottom:.2em} .sub{color:#666;margin-top:0}
section.verdict{background:#f4f8ff;border-left:5px solid #1f77b4;padding:.6em 1.2em}
section.verdict li{margin:.25em 0}
section.notes{background:#fff6e5;border-left:5px solid #e69500;padding:.4em 1.2em;margin:1em 0}
table{border-collapse:collapse;font-size:13px;margin:.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f0f0f0} tr:nth-child(even) td{background:#fafafa}
td.holds{color:#176117;font-weight:600} td.differs{color:#a11;font-weight:600}
td.unmeasured{color:#777}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:1em}
figure{margin:0} figure img{max-width:100%;border:1px solid #ddd}
figcaption{font-size:13px;color:#555} .note{font-size:12px;color:#555}
.missing{color:#a60}
.legend span{display:inline-block;width:12px;height:12px;margin:0 4px 0 12px;vertical-align:middle}
"""

VERDICT_CLASS = {"holds": "holds", "differs": "differs", "could not be measured": "unmeasured"}


def _e(x) -> str:
    return html.escape(str(x))


def table_html(t: Table) -> str:
    out = [f'<h3 id="{_e(t.key)}">{_e(t.title)}</h3>']
    if not t.rows:
        out.append(f'<p class="missing">{_e(t.empty)}</p>')
        return "\n".join(out)
    out.append(f'<table data-table="{_e(t.key)}"><thead><tr>'
               + "".join(f"<th>{_e(h)}</th>" for h in t.headers) + "</tr></thead><tbody>")
    for row in t.rows:
        cells = []
        for h, v in zip(t.headers, row):
            cls = f' class="{VERDICT_CLASS[v]}"' if h == "verdict" and v in VERDICT_CLASS else ""
            cells.append(f"<td{cls}>{_e(v)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    if t.note:
        out.append(f'<p class="note">{_e(t.note)}</p>')
    return "\n".join(out)


def plot_html(stem: str, caption: str, path: str | None) -> str:
    if path is None:
        return (f'<figure data-plot-missing="{_e(stem)}"><p class="missing">{_e(caption)}: '
                "no data for this plot in the run</p></figure>")
    b64 = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return (f'<figure data-plot="{_e(stem)}"><img alt="{_e(caption)}" '
            f'src="data:image/png;base64,{b64}"><figcaption>{_e(caption)}</figcaption></figure>')


def html_page(title: str, subtitle: str, verdict: list[str], legend: dict[str, str],
              plots: list[tuple[str, str, str | None]], tables: list[Table],
              caveats: list[str], notes: list[str] = ()) -> str:
    n_plots = sum(p is not None for _s, _c, p in plots)
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)}</title><style>{CSS}</style></head>",
        f'<body data-plots="{n_plots}">', f"<h1>{_e(title)}</h1>", f'<p class="sub">{_e(subtitle)}</p>',
        *([f'<section class="notes" data-notes="{len(notes)}">'
           + "".join(f"<p>{_e(n)}</p>" for n in notes) + "</section>"] if notes else []),
        '<section class="verdict"><h2>Verdict</h2><ul>'
        + "".join(f"<li>{_e(v)}</li>" for v in verdict) + "</ul></section>",
        '<p class="legend">Colours:' + "".join(
            f'<span style="background:{c}"></span>{_e(f)}' for f, c in legend.items()) + "</p>",
        "<h2>Plots</h2>", '<div class="plots">',
        *(plot_html(s, c, p) for s, c, p in plots), "</div>",
        "<h2>Figures</h2>", *(table_html(t) for t in tables),
        "<h2>Data caveats</h2>",
    ]
    if caveats:
        parts.append('<ul class="caveats">' + "".join(f"<li>{_e(c)}</li>" for c in caveats) + "</ul>")
    else:
        parts.append("<p>None: every file was present and every record readable.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _md_cell(v) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def table_md(t: Table) -> str:
    out = [f"### {t.title}", ""]
    if not t.rows:
        return "\n".join(out + [f"_{t.empty}_", ""])
    out.append("| " + " | ".join(_md_cell(h) for h in t.headers) + " |")
    out.append("|" + "---|" * len(t.headers))
    out += ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in t.rows]
    if t.note:
        out += ["", f"_{t.note}_"]
    return "\n".join(out + [""])


def markdown(title: str, subtitle: str, verdict: list[str], plots, tables: list[Table],
             caveats: list[str], notes: list[str] = ()) -> str:
    out = [f"# {title}", "", subtitle, ""]
    for n in notes:
        out += [f"> **{n}**", ""]
    out += ["## Verdict", ""]
    out += [f"- {v}" for v in verdict] + ["", "## Plots", ""]
    for stem, caption, path in plots:
        out.append(f"![{caption}]({stem}.png)" if path else f"- {caption}: no data in this run")
    out += ["", "## Figures", ""] + [table_md(t) for t in tables] + ["## Data caveats", ""]
    out += [f"- {c}" for c in caveats] or ["None."]
    return "\n".join(out) + "\n"
