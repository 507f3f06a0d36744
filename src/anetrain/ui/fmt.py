"""Short human-readable numbers for narrow displays: durations, SI-scaled rates, losses, n/a."""

from __future__ import annotations

import math

NA = "n/a"


def duration(seconds: float | None) -> str:
    """``1:02:03`` for an hour and more, ``2:03`` for minutes, ``4.2s`` under a minute; n/a for None."""
    if seconds is None or not math.isfinite(seconds):
        return NA
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    total = round(seconds)
    h, rem = divmod(total, 3600)
    m, s = divmod(rem, 60)
    if h >= 24:
        d, h = divmod(h, 24)
        return f"{d}d{h:02d}:{m:02d}:{s:02d}"
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def si(value: float | None, digits: int = 3) -> str:
    """``35.2k``, ``1.50M``, ``812``: a value scaled by powers of 1000 to ``digits`` significant figures."""
    if value is None or not math.isfinite(value):
        return NA
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{_sig(value / factor, digits)}{suffix}"
    return _sig(value, digits)


def _sig(v: float, digits: int) -> str:
    if v == 0:
        return "0"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(v))))
    return f"{v:.{decimals}f}"


def num(value: float | None, fmt: str = ".4f") -> str:
    """``format(value, fmt)``, or n/a for None."""
    if value is None or not math.isfinite(value):
        return NA
    return format(value, fmt)


def percent(fraction: float | None, fmt: str = ".1f") -> str:
    return NA if fraction is None else f"{fraction * 100:{fmt}}%"
