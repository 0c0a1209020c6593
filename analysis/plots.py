"""The report's plots (matplotlib, Agg): one colour per family in every plot.

Each function takes an :class:`~analysis.analyze.Analysis` and returns a figure, or None when
the run has no data for it (the report then says what is missing).
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from analysis import engines as eng  # noqa: E402
from analysis import scaling, units  # noqa: E402

FAMILY_COLOURS = {"transformer": "#1f77b4", "ssm": "#d62728", "hybrid": "#2ca02c", "unknown": "#7f7f7f"}
MARKERS = ("o", "s", "^", "D", "v", "P")
LINESTYLES = ("-", "--", ":", "-.")


def colour(family: str) -> str:
    return FAMILY_COLOURS.get(family, FAMILY_COLOURS["unknown"])


def _style(a, target):
    """Family colour; marker and line style tell targets of one family apart; the legend
    names the engine (``qwen2.5-0.5b · vLLM (transformer)``) and marks an eager path."""
    run = a.run
    fam = run.family_of(target)
    same = [t for t in run.targets() if run.family_of(t) == fam]
    i = same.index(target) if target in same else 0
    return dict(color=colour(fam), marker=MARKERS[i % len(MARKERS)],
                linestyle=LINESTYLES[i % len(LINESTYLES)], label=f"{eng.tag(target, a.engines)} ({fam})")


def _tokens_fmt(x, _pos=None):
    if x >= 1024:
        return f"{units.sig(x / 1024)}K"
    return units.sig(x)


_TIME = FuncFormatter(lambda x, _p: units.duration(x) if x > 0 else "0")
"""Time axes hold seconds and read 50 ms, 1.5 s."""
_NUMBER = FuncFormatter(lambda x, _p: units.sig(x))


def doubling(lengths) -> bool:
    """Lengths that grow geometrically (each about twice the last) read best on log axes."""
    v = sorted(set(x for x in lengths if x and x > 0))
    return len(v) >= 3 and v[-1] / v[0] >= 4


def _plain(ax, axis="y", fmt=_NUMBER):
    """Plain numbers (0.5, 20, 300 — or 50 ms, 1.5 s) instead of powers of ten."""
    target = ax.yaxis if axis == "y" else ax.xaxis
    target.set_major_formatter(fmt)
    target.set_minor_formatter(FuncFormatter(lambda x, _p: ""))


def _new(title, xlabel, ylabel):
    fig, ax = plt.subplots(figsize=(7.2, 4.4), dpi=100)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    return fig, ax


def _length_axis(ax, lengths, y_positive=True, ys=(), yfmt=_NUMBER):
    if doubling(lengths):
        ax.set_xscale("log", base=2)
        ys = [y for y in ys if y > 0]
        if y_positive and ys and max(ys) / min(ys) >= 10:
            ax.set_yscale("log")
    _plain(ax, "y", yfmt)
    ax.xaxis.set_major_formatter(FuncFormatter(_tokens_fmt))


def latency_vs_prompt(a, metric: str):
    run = a.run
    title = {"ttft": "Time to first token vs prompt length",
             "tpot": "Time per output token vs prompt length"}[metric]
    fig, ax = _new(title, "prompt length (tokens)", f"{metric.upper()} (p50)")
    all_n, all_y = [], []
    for t in run.targets():
        n, y = scaling.curve(run, t, metric)
        if not n:
            continue
        st = _style(a, t)
        ax.plot(n, y, **st)
        _n90, y90 = scaling.curve(run, t, metric, q=90)
        ax.fill_between(n, y, y90, color=st["color"], alpha=0.12, linewidth=0)
        fit = a.fits.get((t, metric))
        if fit and len(n) >= 2:
            xs = np.geomspace(min(n), max(n), 50)
            ax.plot(xs, fit(xs), color=st["color"], alpha=0.35, linewidth=1)
        all_n += n
        all_y += list(y)
    if not all_n:
        plt.close(fig)
        return None
    _length_axis(ax, all_n, ys=all_y, yfmt=_TIME)
    ax.legend(fontsize=8)
    ax.text(0.99, 0.01, "band: p50–p90; faint lines: fitted " + ("a+b·n+c·n²" if metric == "ttft" else "a+b·n"),
            transform=ax.transAxes, ha="right", va="bottom", fontsize=7, alpha=0.7)
    return fig


def memory_vs_prompt(a):
    if not any(m.lengths for m in a.memory):
        return None
    fig, ax = _new("Peak device memory vs prompt length", "prompt length (tokens)", "device memory (GB)")
    all_n, all_y = [], []
    for m in a.memory:
        if not m.lengths:
            continue
        ax.plot(m.lengths, np.asarray(m.peak_bytes) / 1e9, **_style(a, m.target))
        all_n += m.lengths
        all_y += [v / 1e9 for v in m.peak_bytes]
    lines = budget_lines(a)
    for budget, label in lines:
        ax.axhline(budget / 1e9, color="black", linestyle="--", linewidth=1)
        ax.text(0.01, budget / 1e9, f" {label}", va="bottom", fontsize=7, transform=ax.get_yaxis_transform())
    _length_axis(ax, all_n, ys=all_y + [b / 1e9 for b, _l in lines])
    ax.legend(fontsize=8)
    return fig


def budget_lines(a) -> list[tuple[float, str]]:
    """The dashed budget lines of the memory plot: (bytes, label) each — one per distinct
    budget of the targets drawn (their ``serve.memory_budget``), naming the targets when they
    differ; the run's budget (``memory.budget_bytes``) when no target had its own."""
    own: dict[float, list[str]] = {}
    for m in a.memory:
        if m.budget_bytes:
            own.setdefault(m.budget_bytes, []).append(m.target)
    if not own:
        budget, why = a.budget
        return [(budget, f"budget {units.gb(budget)} ({why})")]
    if len(own) == 1:
        (b,) = own
        return [(b, f"budget {units.gb(b)} (each target's memory_budget)")]
    return [(b, f"budget {units.gb(b)} ({', '.join(ts)})") for b, ts in sorted(own.items())]


def throughput_vs_concurrency(a):
    """Output tokens/s against concurrent users; a run with one concurrency level only
    (a context sweep) gets throughput against prompt length instead, which it can show."""
    levels = {s.concurrency for s in a.stages if s.concurrency is not None}
    if len(levels) <= 1:
        return _throughput_vs_prompt(a, levels.pop() if levels else None)
    pts: dict[str, dict[int, tuple[tuple, float]]] = {}
    for s in a.stages:
        if s.concurrency is None or s.output_token_throughput is None:
            continue
        key = (s.prompt_tokens or 0, -s.output_token_throughput)
        cur = pts.setdefault(s.target, {}).get(s.concurrency)
        if cur is None or key < cur[0]:
            pts[s.target][s.concurrency] = (key, s.output_token_throughput)
    fig, ax = _new("Output token throughput vs concurrency", "concurrent users",
                   "output tokens per second")
    for t, d in pts.items():
        cs = sorted(d)
        ax.plot(cs, [d[c][1] for c in cs], **_style(a, t))
    allc = sorted({c for d in pts.values() for c in d})
    if allc[-1] / allc[0] >= 4:
        ax.set_xscale("log", base=2)
    _plain(ax, "x")
    ax.yaxis.set_major_formatter(_NUMBER)
    ax.legend(fontsize=8)
    ax.text(0.99, 0.01, "each target at its shortest prompt per concurrency", transform=ax.transAxes,
            ha="right", va="bottom", fontsize=7, alpha=0.7)
    return fig


def _throughput_vs_prompt(a, level):
    by: dict[str, list[tuple[int, float]]] = {}
    for s in a.stages:
        if s.prompt_tokens is not None and s.output_token_throughput is not None:
            by.setdefault(s.target, []).append((s.prompt_tokens, s.output_token_throughput))
    if not by:
        return None
    users = f"{level} user" + ("s" if level != 1 else "") if level else "one concurrency level"
    fig, ax = _new(f"Output token throughput vs prompt length ({users}: no concurrency sweep)",
                   "prompt length (tokens)", "output tokens per second")
    ns = []
    for t, pts in by.items():
        pts.sort()
        ax.plot([n for n, _ in pts], [v for _, v in pts], **_style(a, t))
        ns += [n for n, _ in pts]
    _length_axis(ax, ns, y_positive=False)
    ax.legend(fontsize=8)
    return fig


def itl_distribution(a):
    run = a.run
    fig, ax = _new("Inter-token latency distribution (all stages)", "inter-token latency",
                   "fraction of gaps ≤ x")
    any_ = False
    for t in run.targets():
        v = np.sort([g for r in run.requests if r.target == t and r.ok for g in r.itl_s])
        v = v[v > 0]
        if v.size == 0:
            continue
        any_ = True
        st = _style(a, t)
        st.pop("marker")
        ax.step(v, np.arange(1, v.size + 1) / v.size, where="post", **st)
    if not any_:
        plt.close(fig)
        return None
    ax.set_xscale("log")
    _plain(ax, "x", _TIME)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    return fig


#: One colour per operator class, SSM scan in the SSM family's red, GEMM in blues.
OPERATOR_COLOURS = {"gemm": "#1f77b4", "attention": "#6baed6", "ssm": "#d62728", "conv1d": "#ff9896",
                    "norm": "#2ca02c", "elementwise": "#98df8a", "memory": "#9467bd", "sampling": "#ff7f0e",
                    "other": "#c7c7c7"}


def operators(a):
    """Share of device time by operator class, a stacked bar per target × length × phase
    (the profile pass); what no rule places is the hatched grey end of its bar."""
    from analysis.operators import FINE

    rows = [r for r in a.operators if r.breakdown is not None and r.breakdown.total_s > 0]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(8.4, 1.6 + 0.32 * len(rows)), dpi=100)
    labels = [f"{eng.tag(r.target, a.engines)} · {units.tokens(r.prompt_tokens)} {r.phase}" for r in rows]
    y = np.arange(len(rows))[::-1]
    left = np.zeros(len(rows))
    for cls in FINE:
        v = np.array([r.breakdown.share(cls) * 100 for r in rows])
        if v.any():
            ax.barh(y, v, left=left, color=OPERATOR_COLOURS[cls], label=cls, height=0.7)
            left += v
    rest = np.array([r.breakdown.unclassified_s / r.breakdown.total_s * 100 for r in rows])
    if rest.any():
        ax.barh(y, rest, left=left, color="#eeeeee", hatch="//", edgecolor="#999999", label="unplaced", height=0.7)
    for yi, r in zip(y, rows):
        ax.text(101, yi, units.duration(r.per_step_s or r.breakdown.total_s)
                + (" a step" if r.per_step_s else ""), va="center", fontsize=7)
    ax.set_yticks(y, labels, fontsize=7)
    ax.set_xlim(0, 100)
    ax.set_xlabel("share of device time (%)")
    ax.set_title("Where the time goes: device time by operator class")
    ax.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.6 / (1 + 0.2 * len(rows))))
    return fig


def ttft_vs_uncached(a):
    """TTFT against the prompt tokens a prefill computed (the prompt less what the prefix cache
    served), every ok request whose server said what it cached, of targets with reuse figures."""
    run = a.run
    keep = {r.target for r in a.reuse}
    fig, ax = _new("TTFT vs the uncached part of the prompt", "uncached prompt tokens", "TTFT")
    all_n, all_y = [], []
    for t in run.targets():
        if t not in keep:
            continue
        pts = [(r.prompt_tokens - r.cached_tokens, r.ttft_s) for r in run.requests
               if r.target == t and r.ok and r.cached_tokens is not None and r.prompt_tokens and r.ttft_s]
        if not pts:
            continue
        n, y = zip(*pts)
        st = _style(a, t)
        st.pop("linestyle")
        ax.scatter(n, y, color=st["color"], marker=st["marker"], label=st["label"], s=14, alpha=0.7)
        all_n += n
        all_y += y
    if not all_n:
        plt.close(fig)
        return None
    ax.set_xscale("symlog", linthresh=64)
    ax.xaxis.set_major_formatter(FuncFormatter(_tokens_fmt))
    _plain(ax, "y", _TIME)
    ax.legend(fontsize=8)
    return fig


#: (file stem, caption, builder) of every plot, in report order.
PLOTS = (
    ("ttft_vs_prompt", "TTFT vs prompt length", lambda a: latency_vs_prompt(a, "ttft")),
    ("tpot_vs_prompt", "TPOT vs prompt length", lambda a: latency_vs_prompt(a, "tpot")),
    ("memory_vs_prompt", "Memory vs prompt length", memory_vs_prompt),
    ("throughput_vs_concurrency", "Throughput vs concurrency", throughput_vs_concurrency),
    ("itl_distribution", "ITL distribution", itl_distribution),
    ("ttft_vs_uncached", "TTFT vs the uncached part of the prompt", ttft_vs_uncached),
    ("operators", "Where the time goes (operator classes)", operators),
)


def save_all(a, out_dir) -> dict[str, str | None]:
    """Write every plot that has data as ``out_dir/<stem>.png``; stem → path (None: no data)."""
    out = {}
    for stem, _caption, build in PLOTS:
        fig = build(a)
        if fig is None:
            out[stem] = None
            continue
        path = out_dir / f"{stem}.png"
        fig.tight_layout()
        fig.savefig(path, format="png")
        plt.close(fig)
        out[stem] = str(path)
    return out
