"""Evaluation: the mean validation loss over a fixed set of windows, before the first step, every
--eval-every steps and after the last one."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch

from ..distributed import World
from ..pipeline.base import Pipeline
from .rundir import RunFiles
from .state import RunState


class Evaluator:
    """Scores the validation windows (each rank its share of them; every rank gets the mean)."""

    def __init__(
        self,
        pipe: Pipeline,
        world: World,
        batches: list[tuple[torch.Tensor, torch.Tensor | None]],
        every: int,
        steps: int,
        files: RunFiles,
        log: Any,
    ) -> None:
        self.pipe = pipe
        self.world = world
        # (window, loss mask or None) pairs; empty: no validation data, or evaluation disabled
        self.batches = batches
        self.every = every
        self.steps = steps
        self.files = files
        self.log = log

    def _loss(self, window: torch.Tensor, mask: torch.Tensor | None) -> float:
        return self.pipe.loss(window) if mask is None else self.pipe.loss(window, loss_mask=mask)

    def due_at_start(self, state: RunState, resumed: bool) -> bool:
        """Before the first step of a run (not again when it resumes, unless it resumes at step 0)."""
        return bool(self.batches) and (not resumed or state.step == 0)

    def due(self, step: int) -> bool:
        """After ``step`` of the loop (the last step's evaluation is :meth:`due_at_end`)."""
        return bool(self.batches) and self.every > 0 and step % self.every == 0 and step < self.steps

    def due_at_end(self) -> bool:
        return bool(self.batches) and self.every > 0

    def evaluate(self, state: RunState) -> bool:
        """Write an "eval" record; returns True when the loss is a new best after the first step (worth a
        "best" checkpoint)."""
        t0 = time.perf_counter()
        world = self.world
        pairs = self.batches
        if world.active:
            mine = [self._loss(w, m) for w, m in pairs[world.rank :: world.world_size]]
            total, count = world.sum_values([math.fsum(mine), len(mine)], "the validation loss reduction")
            loss = total / count
        else:
            loss = float(np.mean([self._loss(w, m) for w, m in pairs]))
        state.counters.eval_s += time.perf_counter() - t0
        ppl = math.exp(min(loss, 50.0))
        masked = any(m is not None for _, m in self.batches)
        self.files.write("eval", step=state.step, val_loss=loss, val_ppl=ppl, loss_masked=masked)
        note = ", completion tokens only" if masked else ""
        self.log(f"step {state.step}: val loss {loss:.4f} (ppl {ppl:.2f}{note})")
        if state.best_val_loss is not None and loss >= state.best_val_loss:
            return False
        first = state.best_val_loss is None
        state.best_val_loss = loss
        return not first or state.step > 0
