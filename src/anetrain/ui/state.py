"""What a run's metrics add up to: the latest numbers, the loss history and the derived rates.

:class:`RunState` consumes records (``apply``) in file order and keeps what a display needs: the last
``run`` record (the header), compact histories of the step and eval records, best losses, the latest
sample, compile time, checkpoints and the final report. A resume (a ``run`` record whose ``start_step`` is
below steps already seen) drops the history past that step, so the curves show the run that counts; the
wall-clock axis keeps running across resumes. Unknown record types and fields are ignored.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass, field
from typing import Any

from .metrics import Record

PHASES = ("forward", "backward_dx", "dw", "optimizer", "io", "wait")


def number(value: Any) -> float | None:
    """A finite float from a record field, or None when it is absent, null, non-numeric or not finite."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    v = float(value)
    return v if math.isfinite(v) else None


@dataclass
class Series:
    """Parallel arrays of x positions (step, tokens, wall seconds) and values."""

    step: array = field(default_factory=lambda: array("d"))
    tokens: array = field(default_factory=lambda: array("d"))
    wall_s: array = field(default_factory=lambda: array("d"))
    value: array = field(default_factory=lambda: array("d"))

    def append(self, step: float, tokens: float, wall_s: float, value: float) -> None:
        self.step.append(step)
        self.tokens.append(tokens)
        self.wall_s.append(wall_s)
        self.value.append(value)

    def truncate_after(self, step: float) -> None:
        """Drop the points with a step above ``step`` (they are redone after a resume)."""
        n = len(self.step)
        while n and self.step[n - 1] > step:
            n -= 1
        for arr in (self.step, self.tokens, self.wall_s, self.value):
            del arr[n:]

    def __len__(self) -> int:
        return len(self.step)


@dataclass
class Best:
    value: float | None = None
    step: int | None = None

    def offer(self, value: float, step: int) -> None:
        if self.value is None or value < self.value:
            self.value, self.step = value, step


class RunState:
    """The aggregate of a run's metrics records (see the module docstring)."""

    def __init__(self, rate_window: int = 20) -> None:
        self.run: Record | None = None
        self.last_step: Record | None = None
        self.last_eval: Record | None = None
        self.last_sample: Record | None = None
        self.last_checkpoint: Record | None = None
        self.report: Record | None = None
        self.train_loss = Series()
        self.val_loss = Series()
        self.ms = Series()
        self.tokens_per_s = Series()
        self.phase_ms: dict[str, Series] = {p: Series() for p in PHASES}
        self.rss_mb = Series()
        self.best_train = Best()
        self.best_val = Best()
        self.compile_s = 0.0
        self.records = 0
        self.samples_seen = 0
        self.rate_window = rate_window
        self._wall_offset = 0.0
        self._last_elapsed = 0.0
        self._last_tokens = 0.0

    # ---- consuming records -------------------------------------------------------------------------
    def apply_all(self, records: list[Record]) -> None:
        for rec in records:
            self.apply(rec)

    def apply(self, rec: Record) -> None:
        handler = getattr(self, f"_on_{rec.get('type')}", None)
        self.records += 1
        if handler is not None:
            handler(rec)

    def _wall(self, rec: Record) -> float:
        """Seconds of run time across resumes: ``elapsed_s`` restarts with each process."""
        elapsed = number(rec.get("elapsed_s"))
        if elapsed is None:
            return self._wall_offset + self._last_elapsed
        if elapsed < self._last_elapsed:
            self._wall_offset += self._last_elapsed
        self._last_elapsed = elapsed
        return self._wall_offset + elapsed

    def _on_run(self, rec: Record) -> None:
        self.run = rec
        self.report = None
        start = number(rec.get("start_step"))
        if start is not None and self.train_loss and self.train_loss.step[-1] > start:
            for s in (self.train_loss, self.val_loss, self.ms, self.tokens_per_s, self.rss_mb):
                s.truncate_after(start)
            for s in self.phase_ms.values():
                s.truncate_after(start)
            self.best_train = _best_of(self.train_loss)
            self.best_val = _best_of(self.val_loss)
        if self._last_elapsed:
            self._wall_offset += self._last_elapsed
            self._last_elapsed = 0.0

    def _on_step(self, rec: Record) -> None:
        step = number(rec.get("step"))
        if step is None:
            return
        self.last_step = rec
        wall = self._wall(rec)
        tokens = number(rec.get("tokens"))
        if tokens is None:
            tokens = self._last_tokens + (number((self.run or {}).get("tokens_per_step")) or 0.0)
        self._last_tokens = tokens
        loss = number(rec.get("loss"))
        if loss is not None and not rec.get("skipped"):
            self.train_loss.append(step, tokens, wall, loss)
            self.best_train.offer(loss, int(step))
        for name, series in (("ms", self.ms), ("tokens_per_s", self.tokens_per_s), ("rss_mb", self.rss_mb)):
            v = number(rec.get(name))
            if v is not None:
                series.append(step, tokens, wall, v)
        phases = rec.get("phases")
        if isinstance(phases, dict):
            for name, series in self.phase_ms.items():
                v = number(phases.get(name))
                if v is not None:
                    series.append(step, tokens, wall, v)

    def _on_eval(self, rec: Record) -> None:
        step, loss = number(rec.get("step")), number(rec.get("val_loss"))
        if step is None or loss is None:
            return
        self.last_eval = rec
        wall = self._wall(rec)
        self.val_loss.append(step, self._last_tokens, wall, loss)
        self.best_val.offer(loss, int(step))

    def _on_sample(self, rec: Record) -> None:
        if isinstance(rec.get("text"), str):
            self.last_sample = rec
            self.samples_seen += 1

    def _on_compile(self, rec: Record) -> None:
        self.compile_s += number(rec.get("seconds")) or 0.0

    def _on_checkpoint(self, rec: Record) -> None:
        self.last_checkpoint = rec

    def _on_report(self, rec: Record) -> None:
        self.report = rec

    # ---- derived numbers ---------------------------------------------------------------------------
    @property
    def step(self) -> int:
        return int(number((self.last_step or {}).get("step")) or 0)

    @property
    def total_steps(self) -> int | None:
        v = number((self.run or {}).get("steps"))
        return int(v) if v is not None else None

    @property
    def finished(self) -> bool:
        """The trainer exited cleanly (it wrote its report), at the end or interrupted."""
        return self.report is not None

    @property
    def complete(self) -> bool:
        """Finished with every planned step done (not interrupted)."""
        total = self.total_steps
        return self.finished and (total is None or self.step >= total)

    def latest(self, name: str) -> float | None:
        """A numeric field of the latest step record."""
        return number((self.last_step or {}).get(name))

    def seconds_per_step(self) -> float | None:
        """Recent wall seconds per step (from ``elapsed_s`` over the last steps, else mean ``ms``)."""
        w = self.train_loss.wall_s
        s = self.train_loss.step
        n = min(self.rate_window, len(s) - 1)
        if n >= 1 and s[-1] > s[-1 - n] and w[-1] > w[-1 - n]:
            return (w[-1] - w[-1 - n]) / (s[-1] - s[-1 - n])
        ms = self.ms.value[-self.rate_window :]
        return sum(ms) / len(ms) / 1000.0 if ms else None

    def ms_per_step(self) -> float | None:
        ms = self.ms.value[-self.rate_window :]
        return sum(ms) / len(ms) if ms else None

    def eta_s(self) -> float | None:
        total, sps = self.total_steps, self.seconds_per_step()
        if total is None or sps is None or self.finished:
            return None
        return max(0, total - self.step) * sps

    def mean_phases(self) -> dict[str, float]:
        """Recent mean ms per phase (the phases the trainer reports)."""
        out = {}
        for name, series in self.phase_ms.items():
            vals = series.value[-self.rate_window :]
            if vals:
                out[name] = sum(vals) / len(vals)
        return out


def _best_of(series: Series) -> Best:
    best = Best()
    for s, v in zip(series.step, series.value, strict=True):
        best.offer(v, int(s))
    return best
