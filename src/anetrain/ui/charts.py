"""Text charts for the terminal: a braille line chart with a y axis, and horizontal bars.

Each character cell of the chart holds a 2x4 grid of braille dots, so a W x H cell area draws a
2W x 4H dot curve. Long series are averaged per dot column before drawing (fast on a million steps, and
the curve a human wants to see anyway). Everything returns :class:`rich.text.Text`, ready for any widget.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from rich.text import Text

# Bit of each dot in a braille cell, indexed [dy][dx] (Unicode braille patterns, U+2800 + bits).
_DOT_BITS = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))
_BRAILLE_BASE = 0x2800
_EIGHTHS = " ▏▎▍▌▋▊▉█"


@dataclass
class ChartSeries:
    """One curve: x and y values (equal length) and the rich style it is drawn in."""

    xs: Sequence[float]
    ys: Sequence[float]
    style: str = "white"


@dataclass
class ChartMark:
    """A character drawn over the curves at a data point, e.g. the best loss."""

    x: float
    y: float
    char: str = "●"
    style: str = "bold green"


@dataclass
class _Canvas:
    cols: int
    rows: int
    bits: list[list[int]] = field(init=False)
    styles: list[list[str | None]] = field(init=False)
    chars: dict[tuple[int, int], tuple[str, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.bits = [[0] * self.cols for _ in range(self.rows)]
        self.styles = [[None] * self.cols for _ in range(self.rows)]

    def dot(self, x: int, y: int, style: str) -> None:
        """Set the dot at (x, y), counted from the top-left, in dot units."""
        if 0 <= x < self.cols * 2 and 0 <= y < self.rows * 4:
            row, col = y // 4, x // 2
            self.bits[row][col] |= _DOT_BITS[y % 4][x % 2]
            self.styles[row][col] = style

    def line(self, x0: int, y0: int, x1: int, y1: int, style: str) -> None:
        """Bresenham's line between two dots, both ends included."""
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        while True:
            self.dot(x0, y0, style)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                x0 += sx
            if e2 <= dx:
                err += dx
                y0 += sy

    def text_rows(self) -> list[Text]:
        out = []
        for r in range(self.rows):
            t = Text()
            for c in range(self.cols):
                if (r, c) in self.chars:
                    ch, style = self.chars[(r, c)]
                    t.append(ch, style)
                elif self.bits[r][c]:
                    t.append(chr(_BRAILLE_BASE + self.bits[r][c]), self.styles[r][c] or "")
                else:
                    t.append(" ")
            out.append(t)
        return out


def axis_label(value: float) -> str:
    """A y-axis tick: 4 significant figures, at most 7 characters."""
    if value == 0:
        return "0"
    mag = abs(value)
    if value == round(value) and mag < 1e7:
        return str(int(value))
    if mag >= 1e5 or mag < 1e-3:
        return f"{value:.2e}"
    return f"{value:.{max(0, 3 - math.floor(math.log10(mag)))}f}"[:7]


def _column_means(xs: np.ndarray, ys: np.ndarray, x0: float, x1: float, width: int) -> tuple:
    """Mean y per dot column (columns that hold no point are left out)."""
    span = x1 - x0
    cols = np.zeros(len(xs), dtype=np.int64) if span <= 0 else ((xs - x0) / span * (width - 1)).round()
    cols = np.clip(cols.astype(np.int64), 0, width - 1)
    counts = np.bincount(cols, minlength=width)
    sums = np.bincount(cols, weights=ys, minlength=width)
    present = np.nonzero(counts)[0]
    return present, sums[present] / counts[present]


def line_chart(
    series: Sequence[ChartSeries],
    width: int,
    height: int,
    marks: Sequence[ChartMark] = (),
    x_range: tuple[float, float] | None = None,
    y_range: tuple[float, float] | None = None,
) -> Text:
    """A ``width`` x ``height`` cell chart: y-axis labels on the left, x range on the bottom row."""
    label_w = 8
    plot_w, plot_h = max(1, width - label_w - 1), max(1, height - 1)
    data = [
        (np.asarray(s.xs, dtype=np.float64), np.asarray(s.ys, dtype=np.float64), s.style)
        for s in series
        if len(s.xs)
    ]
    if not data:
        return Text("no data yet", style="dim")
    all_x = np.concatenate([d[0] for d in data])
    all_y = np.concatenate([d[1] for d in data])
    x0, x1 = x_range or (float(all_x.min()), float(all_x.max()))
    y0, y1 = y_range or (float(all_y.min()), float(all_y.max()))
    if y1 - y0 < 1e-12:
        pad = max(abs(y0) * 0.05, 0.5)
        y0, y1 = y0 - pad, y1 + pad
    canvas = _Canvas(plot_w, plot_h)
    dots_w, dots_h = plot_w * 2, plot_h * 4

    def to_dot_y(y: np.ndarray) -> np.ndarray:
        return np.clip(((y1 - y) / (y1 - y0) * (dots_h - 1)).round(), 0, dots_h - 1).astype(np.int64)

    for xs, ys, style in data:
        cols, means = _column_means(xs, ys, x0, x1, dots_w)
        dy = to_dot_y(means)
        if len(cols) == 1:
            canvas.dot(int(cols[0]), int(dy[0]), style)
        for i in range(len(cols) - 1):
            canvas.line(int(cols[i]), int(dy[i]), int(cols[i + 1]), int(dy[i + 1]), style)
    for m in marks:
        span = x1 - x0
        col = 0 if span <= 0 else round((m.x - x0) / span * (dots_w - 1)) // 2
        row = int(to_dot_y(np.array([m.y]))[0]) // 4
        if 0 <= col < plot_w:
            canvas.chars[(row, col)] = (m.char, m.style)

    text = Text(no_wrap=True, overflow="crop")
    rows = canvas.text_rows()
    for r, row in enumerate(rows):
        if r == 0:
            label = axis_label(y1)
        elif r == plot_h - 1:
            label = axis_label(y0)
        elif r == plot_h // 2 and plot_h >= 5:
            label = axis_label((y0 + y1) / 2)
        else:
            label = ""
        text.append(f"{label:>{label_w}}", "dim")
        text.append("┤" if label else "│", "dim")
        text.append_text(row)
        text.append("\n")
    left, right = axis_label(x0), axis_label(x1)
    gap = max(1, plot_w - len(left) - len(right))
    text.append(" " * (label_w + 1) + left + " " * gap + right, "dim")
    return text


def hbar(value: float, max_value: float, width: int) -> str:
    """A horizontal bar of ``width`` cells filled in proportion ``value / max_value`` (eighth-cell steps)."""
    if width <= 0:
        return ""
    frac = 0.0 if max_value <= 0 or not math.isfinite(value) else min(1.0, max(0.0, value / max_value))
    eighths = round(frac * width * 8)
    full, rest = divmod(eighths, 8)
    bar = "█" * full + (_EIGHTHS[rest] if rest else "")
    return bar.ljust(width)


_SPARK = "▁▂▃▄▅▆▇█"


def spark(values: Sequence[float], width: int, low: float | None = None, high: float | None = None) -> str:
    """The last ``width`` values as a block sparkline scaled to [low, high] (default: their range)."""
    vals = [v for v in values[-width:] if math.isfinite(v)] if width > 0 else []
    if not vals:
        return ""
    lo = min(vals) if low is None else low
    hi = max(vals) if high is None else high
    span = hi - lo
    out = []
    for v in vals:
        frac = 0.5 if span <= 0 else min(1.0, max(0.0, (v - lo) / span))
        out.append(_SPARK[round(frac * (len(_SPARK) - 1))])
    return "".join(out)
