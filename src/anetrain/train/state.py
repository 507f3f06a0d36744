"""What a run has done so far: the step, the losses, and the totals behind the Efficiency Report. Saved in
every checkpoint's manifest and restored on resume, so the report covers every process that worked on the
run."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..timing import PHASES


@dataclass
class CommTimes:
    """One step's data-parallel communication (all zero for a single process)."""

    exposed_ms: float = 0.0  # how long the trainer waited for the all-reduces and the step's reductions
    total_ms: float = 0.0  # from the first bucket's launch until the trainer held them all
    buckets: int = 0  # gradient buckets all-reduced


@dataclass
class Counters:
    """Totals over the whole run (``checkpoint manifest["counters"]``)."""

    tokens: int = 0  # trained, all ranks
    train_s: float = 0.0  # inside training steps
    wall_s: float = 0.0  # wall clock, as of the last checkpoint (see WallClock)
    compile_s: float = 0.0  # pipeline warm-up (allocation, compilation)
    eval_s: float = 0.0
    phase_ms: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    steps_timed: int = 0
    flops: float = 0.0
    allreduce_ms: float = 0.0  # exposed communication
    allreduce_total_ms: float = 0.0  # communication in flight, hidden or not

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> Counters:
        """Counters from a manifest (fields it lacks start at zero; unknown ones are ignored; a value that is
        not a number is a ValueError)."""
        known = {f.name for f in fields(cls)}
        counters = cls(**{k: v for k, v in saved.items() if k in known})
        counters.phase_ms = {**dict.fromkeys(PHASES, 0.0), **counters.phase_ms}
        values = [(k, getattr(counters, k)) for k in known - {"phase_ms"}] + list(counters.phase_ms.items())
        for name, value in values:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"counter {name} is {value!r}, not a number")
        return counters

    def add_step(
        self, ms: float, tokens: int, flops: float, phases: dict[str, float], comm: CommTimes
    ) -> None:
        self.tokens += tokens
        self.train_s += ms / 1e3
        self.steps_timed += 1
        self.flops += flops
        self.allreduce_ms += comm.exposed_ms
        self.allreduce_total_ms += comm.total_ms
        for name, value in phases.items():
            self.phase_ms[name] = self.phase_ms.get(name, 0.0) + value


@dataclass
class RunState:
    """The run's position and results; what a checkpoint saves besides the tensors and the sampler."""

    step: int = 0  # optimizer steps completed
    best_val_loss: float | None = None
    last_loss: float | None = None  # the last step's training loss
    counters: Counters = field(default_factory=Counters)

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> RunState:
        for key in ("best_val_loss", "last_loss"):
            value = manifest.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise ValueError(f"{key} is {value!r}, not a number")
        return cls(
            step=int(manifest["step"]),
            best_val_loss=manifest.get("best_val_loss"),
            last_loss=manifest.get("last_loss"),
            counters=Counters.from_dict(manifest.get("counters", {})),
        )

    def to_manifest(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "best_val_loss": self.best_val_loss,
            "last_loss": self.last_loss,
            "counters": asdict(self.counters),
        }


class WallClock:
    """Wall-clock seconds of the whole run: the earlier processes' (from the checkpoint) plus this one's."""

    def __init__(self, started: float, before_s: float) -> None:
        self.started = started  # time.time() when this process began working on the run
        self.before_s = before_s

    def total_s(self) -> float:
        return self.before_s + (time.time() - self.started)
