"""Numbers as a person reads them: the one place the report formats a figure for display.

Figures stay in base units (seconds, bytes, tokens) until they are shown. Every table, claim,
verdict line, plot axis and legend goes through these functions, so a time is always
"121 ms" or "5.65 s", never ``1.21e+02`` or ``5.6e-09``.
"""

from __future__ import annotations

import math

DASH = "—"


def sig(x: float | None, digits: int = 3) -> str:
    """``x`` to ``digits`` significant digits in positional notation, thousands separated:
    ``0.000123``, ``1.5``, ``76.1``, ``12,288``; trailing zeros after the point dropped."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return DASH
    if math.isinf(x):
        return "∞" if x > 0 else "−∞"
    if x == 0:
        return "0"
    sign = "−" if x < 0 else ""
    a = abs(x)
    places = max(0, digits - 1 - math.floor(math.log10(a)))
    text = f"{round(a, places):,.{places}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return sign + text


def duration(seconds: float | None) -> str:
    """A time in the unit a person reads: ms below 1 s (``121 ms``, ``0.9 ms``), seconds from
    1 s (``5.65 s``, ``76.1 s``, ``1,234 s``); below a microsecond, ``<0.001 ms``."""
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return DASH
    a = abs(seconds)
    if a == 0:
        return "0 ms"
    if a < 1e-6:
        return ("−" if seconds < 0 else "") + "<0.001 ms"
    if round(a, max(0, 2 - math.floor(math.log10(a)))) >= 1.0:  # 0.9996 s reads "1 s"
        return f"{sig(seconds)} s"
    return f"{sig(seconds * 1e3)} ms"


def tokens(n: float | None) -> str:
    """A token count: multiples of 1,024 as ``1K``, ``32K``, ``256K``; others in full with
    separators (``262,000``, ``7,550``)."""
    if n is None:
        return "?"
    if n >= 1024 and float(n).is_integer() and int(n) % 1024 == 0:
        return f"{int(n) // 1024:,}K"
    return f"{n:,.0f}"


def gb(nbytes: float | None) -> str:
    """Bytes as decimal gigabytes with the unit: ``12.6 GB``."""
    return DASH if nbytes is None else f"{sig(nbytes / 1e9)} GB"


def size(nbytes: float | None) -> str:
    """Bytes in the largest decimal unit below the value: ``840 B``, ``12.3 MB``, ``1.45 GB``."""
    if nbytes is None:
        return DASH
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(nbytes) >= scale:
            return f"{sig(nbytes / scale)} {unit}"
    return f"{sig(nbytes)} B"


def rate(x: float | None) -> str:
    """A rate (requests/s, tokens/s) without its unit: ``8,534``, ``12.3``, ``0.25``."""
    return sig(x)


def ratio(x: float | None) -> str:
    """A speed ratio: ``2.65×``, ``38×``."""
    return DASH if x is None else f"{sig(x)}×"


def joules(x: float | None) -> str:
    return DASH if x is None else f"{sig(x)} J"


def percent(x: float | None, signed: bool = False) -> str:
    """A fraction as a percentage: ``64%``, ``+12.5%`` (signed)."""
    if x is None:
        return DASH
    text = sig(abs(x) * 100)
    return (("+" if x >= 0 else "−") if signed else ("−" if x < 0 else "")) + text + "%"
