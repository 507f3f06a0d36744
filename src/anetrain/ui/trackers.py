"""Experiment trackers: Weights & Biases and TensorBoard, as optional extras.

The trainer calls ``tracker.log(record)`` with every metrics record (the same dicts it writes to
``metrics.jsonl``) and ``tracker.close()`` at the end. :func:`record_scalars` maps a record to named scalars
once, for every tracker. The packages are imported only when a tracker is asked for; a missing one is an
:class:`AnetrainError` that says which extra to install.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Protocol

from ..errors import AnetrainError
from .metrics import Record
from .state import number

STEP_FIELDS = (
    "loss",
    "lr",
    "grad_norm",
    "ms",
    "tokens_per_s",
    "tflops",
    "utilization",
    "tokens",
    "rss_mb",
    "loss_scale",
)
REPORT_FIELDS = (
    "ms_per_step",
    "tokens_per_s",
    "tflops",
    "utilization",
    "best_val_loss",
    "final_loss",
    "wall_s",
    "compile_s",
    "train_s",
)


class Tracker(Protocol):
    def log(self, record: Record) -> None: ...

    def close(self) -> None: ...


def record_scalars(record: Record) -> tuple[int | None, dict[str, float]]:
    """The step and the named scalars a metrics record contributes (empty for non-numeric records).

    Names: ``train/<field>`` and ``timing/<phase>_ms`` for steps, ``val/loss`` and ``val/ppl`` for evals,
    ``checkpoint/step``, ``compile/seconds``, ``report/<field>``.
    """
    kind = record.get("type")
    step_v = number(record.get("step"))
    step = int(step_v) if step_v is not None else None
    out: dict[str, float] = {}

    def put(name: str, value: Any) -> None:
        v = number(value)
        if v is not None:
            out[name] = v

    if kind == "step":
        for f in STEP_FIELDS:
            put(f"train/{f}", record.get(f))
        phases = record.get("phases")
        if isinstance(phases, dict):
            for name, ms in phases.items():
                put(f"timing/{name}_ms", ms)
    elif kind == "eval":
        put("val/loss", record.get("val_loss"))
        put("val/ppl", record.get("val_ppl"))
    elif kind == "checkpoint":
        put("checkpoint/step", record.get("step"))
    elif kind == "compile":
        put("compile/seconds", record.get("seconds"))
    elif kind == "report":
        step_v = number(record.get("total_steps"))
        step = int(step_v) if step_v is not None else None
        for f in REPORT_FIELDS:
            put(f"report/{f}", record.get(f))
    return step, out


class WandbTracker:
    """Logs to Weights & Biases; ``mode="offline"`` (or WANDB_MODE=offline) writes under RUN_DIR/wandb."""

    def __init__(
        self, run_dir: Path, project: str = "anetrain", name: str | None = None, mode: str | None = None
    ) -> None:
        try:
            import wandb
        except ImportError:
            raise AnetrainError(
                "W&B logging needs the wandb package: pip install 'anetrain[wandb]'"
            ) from None
        self._wandb = wandb
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(
                project=project,
                name=name or run_dir.resolve().name,
                dir=str(run_dir),
                mode=mode or os.environ.get("WANDB_MODE") or None,
            )
        except Exception as e:  # wandb raises many kinds (auth, network, usage): all are the user's to fix
            raise AnetrainError(f"W&B could not start a run ({type(e).__name__}: {e})") from None
        self._last_step = 0

    def log(self, record: Record) -> None:
        kind = record.get("type")
        if kind == "run":
            cfg = {k: v for k, v in record.items() if k not in ("type", "time")}
            self.run.config.update(cfg, allow_val_change=True)
            return
        if kind == "sample" and isinstance(record.get("text"), str):
            self.run.summary["sample/text"] = record["text"]
            self.run.summary["sample/step"] = record.get("step")
            return
        step, scalars = record_scalars(record)
        if kind == "report":
            self.run.summary.update(scalars)
            return
        if not scalars:
            return
        if step is None or step < self._last_step:
            step = self._last_step  # W&B steps must not go back (a resume redoes steps)
        self._last_step = step
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class TensorBoardTracker:
    """Writes TensorBoard event files to RUN_DIR/tensorboard (needs the ``tensorboard`` package)."""

    def __init__(self, run_dir: Path) -> None:
        try:
            import tensorboard  # noqa: F401  (SummaryWriter needs it; torch alone is not enough)
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise AnetrainError(
                "TensorBoard logging needs the tensorboard package: pip install 'anetrain[tensorboard]'"
            ) from None
        self.log_dir = run_dir / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def log(self, record: Record) -> None:
        kind = record.get("type")
        step, scalars = record_scalars(record)
        if kind == "run":
            cfg = {k: v for k, v in record.items() if k != "type"}
            self.writer.add_text("run", "```\n" + json.dumps(cfg, indent=1, default=str) + "\n```", 0)
        elif kind == "sample" and isinstance(record.get("text"), str):
            self.writer.add_text("sample", record["text"], step or 0)
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step or 0)

    def close(self) -> None:
        self.writer.close()


def make_trackers(
    run_dir: str | os.PathLike[str],
    wandb: bool = False,
    wandb_project: str = "anetrain",
    wandb_name: str | None = None,
    wandb_mode: str | None = None,
    tensorboard: bool = False,
) -> list[Tracker]:
    """The trackers asked for (possibly none); raises :class:`AnetrainError` if a package is missing."""
    trackers: list[Tracker] = []
    path = Path(run_dir)
    if tensorboard:
        trackers.append(TensorBoardTracker(path))
    if wandb:
        try:
            trackers.append(WandbTracker(path, wandb_project, wandb_name, wandb_mode))
        except AnetrainError:
            for t in trackers:
                t.close()
            raise
    return trackers
