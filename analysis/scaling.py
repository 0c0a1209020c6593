"""How figures scale with prompt length: fits, crossovers, speed ratios, context limits.

Curves are per target: one point per prompt length (the median over its requests).
``fit_poly`` fits y = a + b·n (+ c·n²) by least squares and reports R²; ``crossovers``
finds where two targets' curves cross, from the data (log-linear interpolation between
the two measured lengths that bracket the sign change) and from the fits (the smallest
positive root of their difference).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from analysis.records import RunData


@dataclass(frozen=True)
class Fit:
    coef: tuple[float, ...]
    """(a, b) or (a, b, c): y = a + b·n + c·n²."""
    r2: float | None
    points: int
    n_min: float
    n_max: float

    def __call__(self, n):
        n = np.asarray(n, dtype=float)
        return sum(c * n**i for i, c in enumerate(self.coef))

    def formula(self, show=None) -> str:
        """The fit in display units with n in thousands of tokens, k = n / 1,024:
        ``24.8 ms + 26.1 ms·k + 0.12 ms·k²`` (``show`` formats a value; default: a time)."""
        from analysis.units import duration

        show = show or duration
        names = ["", "·k", "·k²"]
        terms = [(c * 1024**i, names[i]) for i, c in enumerate(self.coef)]
        out = show(terms[0][0]) + terms[0][1]
        for c, name in terms[1:]:
            out += (" − " if c < 0 else " + ") + show(abs(c)) + name
        return out


def fit_poly(n: Sequence[float], y: Sequence[float], degree: int) -> Fit | None:
    """Least-squares polynomial fit with R²; None with fewer distinct lengths than terms."""
    n = np.asarray(n, dtype=float)
    y = np.asarray(y, dtype=float)
    keep = np.isfinite(n) & np.isfinite(y)
    n, y = n[keep], y[keep]
    if len(np.unique(n)) < degree + 1:
        return None
    scale = float(np.max(np.abs(n))) or 1.0  # conditioning: fit in n/scale, then rescale
    x = n / scale
    design = np.vander(x, degree + 1, increasing=True)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    coef = tuple(float(c) / scale**i for i, c in enumerate(coef))
    pred = design @ (np.asarray(coef) * scale ** np.arange(degree + 1))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    ss_res = float(np.sum((y - pred) ** 2))
    r2 = (1.0 - ss_res / ss_tot) if ss_tot > 0 else None
    return Fit(coef, r2, int(len(n)), float(n.min()), float(n.max()))


def crossover_from_data(n: Sequence[float], a: Sequence[float], b: Sequence[float]) -> float | None:
    """First prompt length where a − b changes sign, interpolated linearly in log n.

    ``n`` ascending, ``a`` and ``b`` measured at the same lengths. None when no sign change.
    An exact tie at a measured length is that length.
    """
    d = np.asarray(a, float) - np.asarray(b, float)
    n = np.asarray(n, float)
    for i in range(len(d)):
        if d[i] == 0 and (i > 0 or len(d) == 1):
            return float(n[i])
        if i + 1 < len(d) and d[i] * d[i + 1] < 0:
            t = d[i] / (d[i] - d[i + 1])
            lo, hi = np.log(n[i]), np.log(n[i + 1])
            return float(np.exp(lo + t * (hi - lo)))
    return None


def crossover_from_fits(fa: Fit, fb: Fit, n_max: float | None = None,
                        n_min: float = 0.0) -> float | None:
    """Smallest n > ``n_min`` (≥ 0) where two fits are equal, optionally no larger than ``n_max``.
    Roots far below the measured lengths are artefacts of the fits, not crossovers."""
    k = max(len(fa.coef), len(fb.coef))
    diff = [(fa.coef[i] if i < len(fa.coef) else 0.0) - (fb.coef[i] if i < len(fb.coef) else 0.0)
            for i in range(k)]
    while len(diff) > 1 and diff[-1] == 0:
        diff.pop()
    if len(diff) < 2:
        return None
    roots = np.roots(diff[::-1])
    real = sorted(float(r.real) for r in roots if abs(r.imag) <= 1e-9 * max(1.0, abs(r.real)) and r.real > 0)
    real = [r for r in real if r > n_min and (n_max is None or r <= n_max)]
    return real[0] if real else None


# ---- curves per target -------------------------------------------------------------------


def points(run: RunData, target: str, field: str) -> dict[int, list[float]]:
    """Every value of ``field`` (``ttft``/``tpot``/``e2e``) per prompt length: ok requests of
    the context sweep only. What :func:`curve` summarises, and how many requests it had."""
    from analysis.stats import tpot

    by_n: dict[int, list[float]] = {}
    for r in run.requests:
        if r.target != target or not r.ok or r.prompt_length is None or not run.in_sweep(r):
            continue
        v = {"ttft": r.ttft_s, "tpot": tpot(r), "e2e": r.e2e_s}[field]
        if v is not None:
            by_n.setdefault(r.prompt_length, []).append(v)
    return by_n


def curve(run: RunData, target: str, field: str, q: float = 50) -> tuple[list[int], list[float]]:
    """The ``q``-th percentile (default: the median) of ``field`` per prompt length
    (:func:`points`)."""
    by_n = points(run, target, field)
    ns = sorted(by_n)
    return ns, [float(np.percentile(by_n[n], q)) for n in ns]


@dataclass
class PairCompare:
    a: str
    b: str
    family_a: str
    family_b: str
    metric: str
    common: list[int]
    ratio: list[float]
    """a / b at each common length: above 1 means b is faster."""
    crossover_data: float | None
    crossover_fit: float | None


def compare_pair(run: RunData, a: str, b: str, metric: str, fits: dict) -> PairCompare:
    na, ya = curve(run, a, metric)
    nb, yb = curve(run, b, metric)
    common = sorted(set(na) & set(nb))
    va = [ya[na.index(n)] for n in common]
    vb = [yb[nb.index(n)] for n in common]
    ratio = [x / y if y > 0 else float("nan") for x, y in zip(va, vb)]
    fa, fb = fits.get((a, metric)), fits.get((b, metric))
    cf = None
    if fa and fb:
        cf = crossover_from_fits(fa, fb, n_max=4 * max(fa.n_max, fb.n_max),
                                 n_min=min(fa.n_min, fb.n_min))
        if cf is not None and not _data_allows(common, va, vb, cf):
            cf = None
    return PairCompare(a, b, run.family_of(a), run.family_of(b), metric, common, ratio,
                       crossover_from_data(common, va, vb) if len(common) >= 1 else None, cf)


def latency_fits(run: RunData) -> dict[tuple[str, str], Fit]:
    """TTFT(n) = a + b·n + c·n² and TPOT(n) = a + b·n per target."""
    out = {}
    for t in run.targets():
        for metric, degree in (("ttft", 2), ("tpot", 1)):
            n, y = curve(run, t, metric)
            f = fit_poly(n, y, degree)
            if f is not None:
                out[(t, metric)] = f
    return out


def family_pairs(run: RunData, metric: str, fits: dict) -> list[PairCompare]:
    """Every pair of targets from different families (transformer before ssm before hybrid)."""
    order = {"transformer": 0, "ssm": 1, "hybrid": 2}
    targets = sorted(run.targets(), key=lambda t: order.get(run.family_of(t), 9))
    out = []
    for i, a in enumerate(targets):
        for b in targets[i + 1:]:
            if run.family_of(a) != run.family_of(b):
                out.append(compare_pair(run, a, b, metric, fits))
    return out


def _data_allows(n: list[int], a: list[float], b: list[float], root: float) -> bool:
    """A fit crossover inside the lengths both targets measured stands only where the data
    crosses too, between the two lengths around it: a quadratic fitted over 1K–1M misses a
    fixed cost of 0.1 s at 1K by more than the gap between the targets (H200: Qwen 27 ms vs
    Mamba2 on vLLM 108 ms at 1K and 2K, its fit crossing at ~1.5K). Beyond them, the fits
    are all there is."""
    if len(n) < 2 or not n[0] <= root <= n[-1]:
        return True
    i = max(j for j in range(len(n)) if n[j] <= root)
    k = min(i + 1, len(n) - 1)
    d0, d1 = a[i] - b[i], a[k] - b[k]
    return d0 == 0 or d1 == 0 or (d0 < 0) != (d1 < 0)


# ---- context limits ----------------------------------------------------------------------


@dataclass
class ContextLimit:
    target: str
    family: str
    max_ok: int | None
    """The longest prompt length with a successful request."""
    first_failed: int | None
    """The shortest length beyond ``max_ok`` where every request failed."""
    cause: str | None
    """Most common error kind at ``first_failed``, the length that ended it (None: the limit was
    not reached); longer lengths may have failed otherwise (a sweep's over-long stage rejected
    while a probe just past ``max_ok`` timed out)."""
    message: str | None
    max_tested: int | None
    reached: bool
    why: str | None = None
    """What set the limit, in words, where the server says (e.g. vLLM's max_model_len against
    its KV cache capacity under the memory budget)."""


def context_limits(run: RunData) -> list[ContextLimit]:
    out = []
    for t in run.targets():
        reqs = [r for r in run.requests if r.target == t and r.prompt_length is not None and r.turn is None]
        ok_lengths = [r.prompt_length for r in reqs if r.ok]
        max_ok = max(ok_lengths) if ok_lengths else None
        beyond = [r for r in reqs if not r.ok and (max_ok is None or r.prompt_length > max_ok)]
        first_failed = min((r.prompt_length for r in beyond), default=None)
        at_first = [r for r in beyond if r.prompt_length == first_failed]
        kinds = Counter(r.error_kind or "unknown" for r in at_first)
        cause = kinds.most_common(1)[0][0] if kinds else None
        msg = next((r.error_message for r in at_first if (r.error_kind or "unknown") == cause), None)
        out.append(ContextLimit(
            target=t, family=run.family_of(t), max_ok=max_ok, first_failed=first_failed,
            cause=cause, message=(msg or "")[:200] or None,
            max_tested=max((r.prompt_length for r in reqs), default=None), reached=bool(beyond),
            why=limit_reason(run, t) if cause == "rejected" else
            _stalled_at_edge(run, t, first_failed) if cause == "timeout" else None))
    return out


def _stalled_at_edge(run: RunData, target: str, first_failed: int | None) -> str | None:
    """A timeout within 1% of the server's declared max_model_len: accepted, never finished.
    (vLLM 0.26, H200: a Llama prompt filling its auto-fitted KV cache exactly was prefilled,
    preempted and left waiting; 1% shorter was served.)"""
    mml = run.target_info(target).get("max_model_len")
    if not (mml and first_failed) or first_failed < 0.99 * int(mml):
        return None
    return (f"accepted and not finished within the request timeout, at the edge of the server's "
            f"max_model_len {int(mml):,} (a server that cannot fit the request's last blocks may "
            f"preempt it and leave it waiting)")


def kv_cache_tokens(run: RunData, target: str) -> int | None:
    """The tokens a vLLM server's KV cache holds (``vllm:cache_config_info``'s
    ``kv_cache_size_tokens``), or None."""
    lab = run.latest_labels(target, "vllm:cache_config_info",
                            where=lambda lab: str(lab.get("kv_cache_size_tokens", "")).isdigit())
    return int(lab["kv_cache_size_tokens"]) if lab else None


def limit_reason(run: RunData, target: str) -> str | None:
    """Why a server rejects longer prompts: its max_model_len, and what bounds that — the
    KV cache it holds under its memory share (vLLM's ``kv_cache_size_tokens``) or the model's
    position limit."""
    info = run.target_info(target)
    mml = info.get("max_model_len")
    if not mml:
        return None
    cap = kv_cache_tokens(run, target)
    text = f"the server's max_model_len {int(mml):,}"
    if run.family_of(target) == "ssm":  # nothing in the model bounds it: its launch profile does
        return f"{text} (set at launch: a pure SSM has no position limit and its state does not grow)"
    if cap is None:
        return text
    if cap <= int(mml):
        return f"{text}: its KV cache holds {cap:,} tokens under its memory share"
    return f"{text}, the model's position limit (its KV cache would hold {cap:,} tokens)"
