"""Phase timers: where the milliseconds of a training step go."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

PHASES = ("forward", "backward_dx", "dw", "optimizer", "io", "wait")


class PhaseTimes:
    """Accumulated wall milliseconds per phase since the last :meth:`reset`."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = dict.fromkeys(PHASES, 0.0)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.ms[name] = self.ms.get(name, 0.0) + (time.perf_counter() - t0) * 1e3

    def add(self, name: str, ms: float) -> None:
        self.ms[name] = self.ms.get(name, 0.0) + ms

    def reset(self) -> dict[str, float]:
        """Return the accumulated times and start again from zero."""
        out = dict(self.ms)
        self.ms = dict.fromkeys(PHASES, 0.0)
        return out
