"""The training loop (:class:`Trainer`): one optimizer step on one screen, and the components it asks, after
each step, whether they have work: the evaluator, the checkpointer, the sample writer and the stop
controller (torchtitan's ``Trainer.train`` asks its checkpointer and validator the same way)."""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import torch

from ..distributed import GradSync, World, check_in_sync
from ..errors import AnetrainError
from ..optim import clip_divisor, global_grad_norm, lr_at
from ..pipeline.base import Pipeline, pipeline_labels
from ..telemetry.flops import training_flops_per_sequence
from ..telemetry.peak import peak_tflops
from ..telemetry.report import build_report, format_report
from .checkpointer import Checkpointer, resume_state
from .evaluator import Evaluator
from .options import TrainOptions
from .rundir import (
    RunFiles,
    fine_tuning_fields,
    fine_tuning_lines,
    next_steps,
    pipeline_lines,
    progress_printer,
)
from .samples import SampleWriter
from .setup import build_parts, start_on_every_rank
from .state import CommTimes, RunState, WallClock
from .stop import EXIT_CODES, Stop, StopController


class Trainer:
    """Everything one rank needs for a run, built here; :meth:`run` trains."""

    def __init__(
        self,
        opts: TrainOptions,
        run_dir: Path,
        log: Any,
        model_check: str | None = None,
        world: World | None = None,
    ) -> None:
        world = world or World()
        self.opts, self.run_dir, self.log, self.world = opts, run_dir, log, world
        started = time.time()
        # the model (rank 0 reads it), then the data, pipeline and optimizer on every rank
        start = start_on_every_rank(world, opts, run_dir, model_check, log)
        self.cfg = start.cfg
        parts = world.agree(lambda: build_parts(opts, start, world, log), "reading the data")
        self.data, self.compaction, self.pipe = parts.data, parts.compaction, parts.pipe
        self.lora = parts.lora
        self.optimizer, self.opt_cfg, self.scaler = parts.optimizer, parts.opt_cfg, parts.scaler
        if world.active:  # every rank starts from rank 0's weights and optimizer state
            for t in (self.pipe.params.flat, self.optimizer.state.m.flat, self.optimizer.state.v.flat):
                world.broadcast_(t, "sending rank 0's weights")
            self.pipe.after_update()
        self.grad_sync = GradSync(world, self.pipe)
        self.sampler = parts.data.sampler(opts, world)
        batches = parts.data.eval_batches(opts)  # (refuses more windows than the data holds: before writing)
        self.resumed = start.manifest is not None
        self.state = RunState()
        if start.manifest is not None:
            self.state = resume_state(start, opts, world, self.sampler, self.scaler, log)
        self.clock = WallClock(started, self.state.counters.wall_s)
        # the step's size: each rank's gradients are scaled by 1/micro_batches, so their all-reduced sum is
        # the mean over the job's micro-batches
        self.micro_batches = opts.accum * world.world_size
        self.global_batch = opts.batch * self.micro_batches
        self.tokens_per_step = self.global_batch * opts.seq
        v, lora = self.compaction.size if self.compaction else None, self.lora
        self.flops_per_step = self.global_batch * training_flops_per_sequence(self.cfg, opts.seq, v, lora)
        self.labels = pipeline_labels(self.pipe)
        if self.pipe.note:
            log(self.pipe.note)
        self.peak = 0.0  # TFLOPS of one device, for the utilization (rank 0 measures it)
        # the run directory (rank 0 writes it) and the components the loop asks after each step
        self.files = RunFiles(run_dir, world, started, log)
        world.agree(lambda: self._open_run_dir(start.what), "writing the run")
        self.checkpointer = Checkpointer(
            run_dir,
            opts,
            world,
            self.pipe,
            self.optimizer,
            self.scaler,
            self.sampler,
            self.files,
            self.clock,
            log,
            {"base": start.base_ref, "hf_source": start.source},
        )
        self.evaluator = Evaluator(self.pipe, world, batches, opts.eval_every, opts.steps, self.files, log)
        self.samples = SampleWriter(
            self.pipe, parts.tokenizer, world, run_dir, opts.sample_every, opts.sample_tokens, self.files, log
        )
        self.stop = StopController(world, run_dir, log)

    # ---- one optimizer step ------------------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        """--accum micro-batches forward and backward, gradients averaged over the ranks, clipped, applied."""
        o, pipe, state = self.opts, self.pipe, self.state
        t0 = time.perf_counter()
        pipe.times.reset()
        pipe.zero_grad()
        scale = self.scaler.scale if self.scaler else 1.0  # fp16: the loss scale
        rewind = self.stop.rewind_point(self.sampler, o.accum)  # a stop between micro-steps goes back here
        losses = []
        for i in range(o.accum):
            self.stop.between_micro_steps(self.sampler, rewind, state.step)
            with pipe.times.phase("io"):
                window = self.sampler.next_batch()
                mask = self.data.loss_mask(self.sampler, o.seq)
            self.grad_sync.arm(last_micro_step=i == o.accum - 1)
            losses.append(micro_step(pipe, window, scale / self.micro_batches, mask))
        loss, comm = self._mean_loss_and_gradients(losses)  # the same gradients on every rank from here
        with pipe.times.phase("optimizer"):
            norm = global_grad_norm(pipe.grads) / scale  # before clipping, without the loss scale
            apply = math.isfinite(norm)
            if self.scaler is not None:  # fp16: an overflow lowers the scale and skips the update
                apply = self.scaler.update(apply)
            elif not apply:
                raise AnetrainError(
                    f"step {state.step + 1}: the gradient is not finite (loss {loss:.4g}); "
                    "lower --lr or use --clip"
                )
            lr = lr_at(state.step, self.opt_cfg)
            if apply:  # the loss scale is removed and the gradients clipped inside the fused update
                self.optimizer.step(pipe.grads, lr, scale * clip_divisor(norm, self.opt_cfg.clip))
                pipe.after_update()
        ms = (time.perf_counter() - t0) * 1e3
        phases = pipe.times.reset()
        state.step += 1
        state.last_loss = loss
        state.counters.add_step(ms, self.tokens_per_step, self.flops_per_step, phases, comm)
        return self._step_record(loss, lr, norm, ms, phases, comm, skipped=not apply)

    def _mean_loss_and_gradients(self, losses: list[float]) -> tuple[float, CommTimes]:
        """Data-parallel: wait for the gradients' all-reduce, then the mean loss over every rank's
        micro-batches (the reduction that also carries the ranks' stop requests); single process: the mean."""
        if not self.world.active:
            return self.stop.mean_loss(losses), CommTimes()
        exposed_ms, total_ms = self.grad_sync.finish()
        t0 = time.perf_counter()
        loss = self.stop.mean_loss(losses)
        reduce_ms = (time.perf_counter() - t0) * 1e3  # the loss and the stop request: exposed too
        return loss, CommTimes(exposed_ms + reduce_ms, total_ms + reduce_ms, self.grad_sync.buckets_reduced)

    def _step_record(
        self,
        loss: float,
        lr: float,
        norm: float,
        ms: float,
        phases: dict[str, float],
        comm: CommTimes,
        skipped: bool,
    ) -> dict[str, Any]:
        tflops = self.flops_per_step / (ms / 1e3) / 1e12
        comm_fields = {}
        if self.world.active:
            comm_fields = {
                "allreduce_ms": comm.exposed_ms,
                "allreduce_total_ms": comm.total_ms,
                "allreduce_buckets": comm.buckets,
            }
        return self.files.write(
            "step",
            step=self.state.step,
            loss=loss,
            lr=lr,
            grad_norm=norm,
            ms=ms,
            tokens_per_s=self.tokens_per_step / (ms / 1e3),
            tflops=tflops,
            utilization=tflops / (self.peak * self.world.world_size) if self.peak else None,
            phases=phases,
            **comm_fields,
            tokens=self.state.counters.tokens,
            skipped=skipped,
            loss_scale=self.scaler.scale if self.scaler else None,
            rss_mb=psutil.Process().memory_info().rss / 2**20,
        )

    # ---- the run ------------------------------------------------------------------------------------
    def run(self) -> int:
        """Train to --steps (or --stop-at, or a stop request); returns the process's exit status."""
        o, state = self.opts, self.state
        end = o.steps if o.stop_at is None else min(o.steps, o.stop_at)
        exit_code = 0
        with self.stop.watching_signals(), self.files.live():
            try:
                self._warm_up(end)
                if self.evaluator.due_at_start(state, self.resumed):
                    self._evaluate()
                progress = progress_printer(self.log, end, state.step, o.log_every, self.world.is_main)
                while state.step < end:
                    progress(self.train_step())
                    self._after_step(end)
                    if self.stop.signal is not None:
                        raise Stop
                self._finish(end)
            except Stop:
                exit_code = self._interrupted()
            self._report()
        self.pipe.close()
        self.files.close()
        return exit_code

    def _after_step(self, end: int) -> None:
        """Ask each component whether it has work after this step."""
        step = self.state.step
        if self.evaluator.due(step):
            self._evaluate()
        if self.checkpointer.periodic_due(step, end):
            self.checkpointer.save("periodic", self.state)
        if self.samples.due(step):
            self.samples.write(step)
        if self.opts.dist_check_every and step % self.opts.dist_check_every == 0:
            check_in_sync(self.world, self.pipe.params.flat, step)
        self.stop.poll_control_file()
        self.files.heartbeat()

    def _warm_up(self, end: int) -> None:
        """The pipeline's allocation and compilation, timed as compile time (skipped with nothing to do)."""
        if self.state.step >= end:
            return
        t0 = time.perf_counter()
        with out_of_memory_as_error(self.opts):
            self.pipe.warmup(self.opts.batch, self.opts.seq)
        seconds = time.perf_counter() - t0
        self.state.counters.compile_s += seconds
        self.files.write("compile", seconds=seconds, what=self.labels["pipeline"])

    def _evaluate(self) -> None:
        if self.evaluator.evaluate(self.state):  # a new best validation loss
            self.checkpointer.save("best", self.state)

    def _finish(self, end: int) -> None:
        """The last step (evaluation, final checkpoint, a sample) or --stop-at (an interrupt checkpoint)."""
        state = self.state
        if state.step >= self.opts.steps:
            if self.evaluator.due_at_end():
                self._evaluate()
            self.checkpointer.save("final", state)
            self.samples.write(state.step, final=True)
            return
        self.log(
            f"stopping at step {state.step} (--stop-at); resume with: anetrain train --resume {self.run_dir}"
        )
        self.checkpointer.save("interrupt", state)

    def _interrupted(self) -> int:
        """A stop request was agreed: checkpoint; the signal's exit status (130 for SIGINT, 143 SIGTERM,
        129 SIGHUP)."""
        signum = self.stop.signal
        name = signal.Signals(signum).name if signum else "stop"
        resume = f"resume with: anetrain train --resume {self.run_dir}"
        self.log(f"{name}: checkpointing at step {self.state.step}; {resume}")
        self.checkpointer.save("interrupt", self.state)
        return EXIT_CODES.get(signum, 130) if signum else 130

    # ---- the run directory -------------------------------------------------------------------------
    def _open_run_dir(self, what: str) -> None:
        """Rank 0: the peak probe, metrics.jsonl (and trackers), config.json, the log's header, the "run"
        record."""
        if not self.world.is_main:
            return
        o, cfg, world, labels = self.opts, self.cfg, self.world, self.labels
        self.peak = o.peak_tflops or device_peak(self.pipe)
        self.files.open(o)
        self.files.write_config(cfg, o, world.world_size)
        self.log(f"model: {what}; {cfg.shape_line()}; {cfg.param_count():,} parameters")
        trainable = self.pipe.params.numel()
        for line in fine_tuning_lines(self.lora, trainable, cfg.param_count(), self.data.masked):
            self.log(line)
        for line in pipeline_lines(labels, o, world, self.global_batch, self.tokens_per_step, self.grad_sync):
            self.log(line)
        self.files.write(
            "run",
            model=cfg.to_dict(),
            model_name=cfg.name,
            params=cfg.param_count(),
            **labels,
            batch=o.batch,
            seq=o.seq,
            accum=o.accum,
            world_size=world.world_size,
            global_batch=self.global_batch,
            dist_backend=world.backend,
            steps=o.steps,
            start_step=self.state.step,
            lr=o.lr,
            min_lr=self.opt_cfg.min_lr if self.opt_cfg.min_lr is not None else o.lr / 10,
            warmup=self.opt_cfg.warmup,
            optimizer=o.optimizer,
            tokens_per_step=self.tokens_per_step,
            flops_per_step=self.flops_per_step,
            peak_tflops=self.peak,
            compact_vocab=self.compaction.size if self.compaction else None,
            **fine_tuning_fields(self.lora, trainable, self.data.masked),
            resumed=self.resumed,
        )

    def _report(self) -> None:
        """The Efficiency Report: report.json, the "report" record and the log (rank 0)."""
        if not self.world.is_main:
            return
        c = self.state.counters
        report = build_report(
            total_steps=c.steps_timed,
            wall_s=self.clock.total_s(),
            compile_s=c.compile_s,
            train_s=c.train_s,
            phase_ms=c.phase_ms,
            tokens=c.tokens,
            flops=c.flops,
            peak_tflops=self.peak,
            best_val_loss=self.state.best_val_loss,
            final_loss=self.state.last_loss,
            world_size=self.world.world_size,
            global_batch=self.global_batch,
            allreduce_ms=c.allreduce_ms,
            allreduce_total_ms=c.allreduce_total_ms,
            loss_compacted=self.compaction is not None,
            loss_masked=self.data.masked,
        )
        self.files.write_report(report)
        self.log.result(format_report(report))  # the run's result, then where it is and what next
        unfinished = self.state.step < self.opts.steps
        self.log.result(next_steps(self.run_dir, unfinished, self.opts.tokenizer is not None))


@contextlib.contextmanager
def out_of_memory_as_error(opts: TrainOptions) -> Iterator[None]:
    """An allocation that fails (the micro-batch's buffers) as one line saying which options to lower."""
    try:
        yield
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if not isinstance(e, MemoryError) and "alloc" not in str(e).lower():
            raise
        raise AnetrainError(
            f"not enough memory for micro-batches of --batch {opts.batch} x --seq {opts.seq} on this model; "
            "lower --batch or --seq (--accum keeps the step's size)"
        ) from None


def micro_step(pipe: Pipeline, window: torch.Tensor, grad_scale: float, mask: torch.Tensor | None) -> float:
    """One micro-batch's forward and backward; with instruction data's loss mask, the loss covers the
    completion tokens only (the Neural Engine pipelines, which take no mask, refuse such data at setup)."""
    if mask is None:
        return pipe.forward_backward(window, grad_scale)
    return pipe.forward_backward(window, grad_scale, loss_mask=mask)  # type: ignore[call-arg]


def device_peak(pipe: Pipeline) -> float:
    """The measured peak TFLOPS of the pipeline's device in its precision (0 where it cannot be probed:
    the Neural Engine)."""
    if pipe.backend not in ("cpu", "cuda"):
        return 0.0
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(pipe.precision, torch.float32)
    return peak_tflops(pipe.params.flat.device, dtype)
