"""When training stops early: SIGINT / SIGTERM / SIGHUP (the terminal closed), the dashboard's
RUN_DIR/control/stop, and, data-parallel, the agreement that makes every rank stop after the same step.

The first signal asks for a stop after the current step (with a checkpoint), as the stop file does; a second
signal stops at once (KeyboardInterrupt), except under torchrun, which passes on the Ctrl-C the terminal
already sent every rank: a second signal within :data:`DUPLICATE_SIGNAL_S` is that same request. A
data-parallel rank's request travels with the next step's loss reduction, so the ranks act on it together.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np

from ..distributed import World

#: data-parallel: a second stop signal this soon after the first is the same request delivered twice (the
#: terminal's Ctrl-C reaches every rank, and torchrun forwards the one it got), not an urgent "stop now"
DUPLICATE_SIGNAL_S = 2.0

#: the signals that ask for a stop with a checkpoint, in the order of precedence when ranks disagree
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
#: the exit status after each (128 + the signal's number, as the shell reports a process it killed)
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}


class Stop(Exception):
    """Raised out of the training loop when the job agreed to stop early."""


class StepAbandoned(Stop):
    """A stop signal arrived between the micro-steps of a single process's step: the step is dropped (its
    gradients are partial and nothing was applied) and the run stops after the step before it."""


class StopController:
    """Collects stop requests; :attr:`signal` is the one every rank acts on (SIGINT, SIGTERM or SIGHUP), or
    None."""

    def __init__(self, world: World, run_dir: Path, log: Any) -> None:
        self.world = world
        self.stop_file = run_dir / "control" / "stop"
        self.log = log
        self.signal: int | None = None  # the agreed request to stop (every rank acts on it)
        self.pending: int | None = None  # a data-parallel rank's own request, until the ranks agree
        self.first_signal_at: float | None = None  # time.monotonic() of the first SIGINT/SIGTERM

    def request(self, signum: int) -> None:
        """Stop after this step: at once for a single process; data-parallel, once the ranks agree."""
        if self.world.active:
            self.pending = self.pending or signum
        else:
            self.signal = self.signal or signum

    def rewind_point(self, sampler: Any, micro_steps: int) -> dict[str, Any] | None:
        """The sampler's state at the start of a step that a stop signal may cut short: a single process
        honours a signal between micro-steps (a long --accum must not make SIGTERM wait); data-parallel ranks
        stop together after the step."""
        if micro_steps > 1 and not self.world.active:
            return dict(sampler.job_state([sampler.state()]))
        return None

    def between_micro_steps(self, sampler: Any, rewind: dict[str, Any] | None, step: int) -> None:
        """Raise :class:`StepAbandoned` when a stop was asked for, with the sampler back at ``rewind`` (where
        the step began), so that its checkpoint resumes exactly."""
        if rewind is not None and self.signal is not None:
            sampler.restore(rewind, step=step)
            raise StepAbandoned

    def poll_control_file(self) -> None:
        """The dashboard's stop request (rank 0 watches the run directory): as SIGINT."""
        if self.world.is_main and self.stop_file.exists():
            self.stop_file.unlink(missing_ok=True)
            self.request(signal.SIGINT)

    def mean_loss(self, losses: list[float]) -> float:
        """The step's mean loss over every rank's micro-batches; data-parallel, the same reduction carries
        each rank's stop request, and a request from any rank stops them all."""
        if not self.world.active:
            return float(np.mean(losses))
        total, *counts = self.world.sum_values(
            [math.fsum(losses), *(float(self.pending == s) for s in STOP_SIGNALS)],
            "the step's loss reduction",
        )
        asked = [s for s, n in zip(STOP_SIGNALS, counts, strict=True) if n]
        if asked:
            self.signal = asked[0]
        return total / (len(losses) * self.world.world_size)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # a second signal: stop now. (Not a signal after the stop file: the dashboard sends both.)
        if self.first_signal_at is not None:
            duplicate = time.monotonic() - self.first_signal_at < DUPLICATE_SIGNAL_S
            if self.world.active and duplicate:
                return
            raise KeyboardInterrupt
        self.first_signal_at = time.monotonic()
        self.request(signum)
        self.log(f"{signal.Signals(signum).name} received: finishing this step, then checkpointing")

    @contextlib.contextmanager
    def watching_signals(self) -> Iterator[None]:
        """SIGINT, SIGTERM and SIGHUP become stop requests while the block runs (the main thread's
        handlers)."""
        old = {}
        for s in STOP_SIGNALS:
            with contextlib.suppress(ValueError):  # not the main thread
                old[s] = signal.signal(s, self._on_signal)
        try:
            yield
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
