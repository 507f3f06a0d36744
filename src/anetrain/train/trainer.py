"""The training loop (:class:`Trainer`) and its logs."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from .. import __version__
from ..checkpoint import (
    Checkpoint,
    checkpoint_name,
    config_difference,
    load_latest,
    prune_checkpoints,
    save_checkpoint,
)
from ..config import make_config
from ..data.compaction import VocabCompaction
from ..data.sampler import eval_windows, make_sampler
from ..distributed import GradSync, World, check_in_sync
from ..errors import AnetrainError, ConfigError, InputError
from ..fsutil import atomic_write_text
from ..optim import (
    AdamState,
    AdamW,
    DynamicLossScaler,
    clip_divisor,
    global_grad_norm,
    lr_at,
)
from ..params import ModelParams
from ..pipeline.base import Pipeline
from ..pipeline.factory import PipelineChoice, describe, make_pipeline
from ..telemetry.flops import training_flops_per_sequence
from ..telemetry.metrics import MetricsWriter
from ..telemetry.peak import peak_tflops
from ..telemetry.report import build_report, format_report
from ..timing import PHASES
from .options import TrainOptions
from .resolve import config_of_spec, resolve_data, resolve_model

# ------------------------------------------------------------------------------------------------
# The trainer


class Stop(Exception):
    pass


#: data-parallel: a second stop signal this soon after the first is the same request delivered twice (the
#: terminal's Ctrl-C reaches every rank, and torchrun forwards the one it got), not an urgent "stop now"
DUPLICATE_SIGNAL_S = 2.0


class NullMetrics:
    """The metrics writer of a rank other than 0: records are built (the loop reads them) but not written."""

    def __init__(self) -> None:
        self.listeners: list[Any] = []

    def write(self, record_type: str, **fields: Any) -> dict[str, Any]:
        return {"type": record_type, **fields}

    def close(self) -> None:
        pass


class Trainer:
    def __init__(
        self,
        opts: TrainOptions,
        run_dir: Path,
        log: Any,
        model_check: str | None = None,
        world: World | None = None,
    ) -> None:
        self.opts = opts
        self.model_check = model_check  # a --model given with --resume: must match the checkpoint
        self.run_dir = run_dir
        self.log = log
        self.world = world or World()
        self.stop_signal: int | None = None  # the agreed request to stop (every rank acts on it)
        self.pending_stop: int | None = None  # a data-parallel rank's own request, until the ranks agree
        self.t_start = time.time()

    # ---- setup ---------------------------------------------------------------------------------
    def _load_model(self) -> dict[str, Any]:
        """Rank 0 (or the single process): the fresh, pretrained or resumed model; its tensors are kept in
        ``self._loaded`` and a JSON description is returned for the other ranks."""
        o = self.opts
        resumed: Checkpoint | None = None
        if o.resume:
            resumed = load_latest(self.run_dir)
            if resumed is None:
                raise InputError(self.run_dir, "no complete checkpoint to resume from")
            self.log(f"resuming from {resumed.path} (step {resumed.step})")
        if resumed is None:
            cfg, params, opt_state, what = resolve_model(o)
        else:
            cfg, params, opt_state = resumed.cfg, resumed.params, resumed.optimizer
            what = f"{cfg.name} resumed at step {resumed.step}"
            if self.model_check is not None:
                diff = config_difference(config_of_spec(self.model_check, o.residual_scale), cfg)
                if diff:
                    raise ConfigError(f"cannot resume {self.run_dir}: the model config differs ({diff})")
        assert cfg is not None and params is not None
        self._loaded = (params, opt_state)
        return {
            "model": cfg.to_dict(),
            "what": what,
            "manifest": resumed.manifest if resumed is not None else None,
            "adam_t": opt_state.t if opt_state is not None else None,
        }

    def setup(self) -> None:
        o, world = self.opts, self.world
        head = world.from_main(self._load_model, "loading the model")
        if world.is_main:
            params, opt_state = self._loaded
            cfg = params.cfg
            del self._loaded
        else:  # rank 0's tensors arrive by broadcast once the pipeline exists
            cfg = make_config(**head["model"])
            params = ModelParams.zeros(cfg)
            t = head["adam_t"]
            opt_state = None if t is None else AdamState(params.like(), params.like(), int(t))
        manifest: dict[str, Any] | None = head["manifest"]
        what = head["what"]
        self.cfg = cfg
        if o.seq > cfg.seq_len:
            self.log(
                f"note: --seq {o.seq} is longer than the model's seq_len {cfg.seq_len}; RoPE extrapolates"
            )
        world.agree(lambda: self._setup_data_and_pipeline(params, opt_state), "reading the data")
        if world.active:  # every rank starts from rank 0's weights and optimizer state
            for t in (self.pipe.params.flat, self.optimizer.state.m.flat, self.optimizer.state.v.flat):
                world.broadcast_(t, "sending rank 0's weights")
            self.pipe.after_update()
        self.sync = GradSync(world, self.pipe) if world.active else None

        # sampler
        self.sampler: Any = make_sampler(
            o.sampler,
            self.data.train.tokens,
            self.data.n_train,
            o.seq,
            o.batch,
            o.seed,
            world.rank,
            world.world_size,
        )
        self.eval_set = []
        if self.data.val is not None and o.eval_every > 0 and o.eval_batches > 0:
            lo, hi = self.data.val_range  # type: ignore[misc]
            self.eval_set = eval_windows(self.data.val.tokens, lo, hi, o.seq, o.batch, o.eval_batches)

        # counters (cumulative across resumes)
        self.step = 0
        self.best_val: float | None = None
        self.counters = {
            "tokens": 0,
            "train_s": 0.0,
            "wall_s": 0.0,
            "compile_s": 0.0,
            "eval_s": 0.0,
            "phase_ms": dict.fromkeys(PHASES, 0.0),
            "steps_timed": 0,
            "flops": 0.0,
            "allreduce_ms": 0.0,
            "allreduce_total_ms": 0.0,
        }
        if manifest is not None:
            m = manifest
            self.step = int(m["step"])
            self.best_val = m.get("best_val_loss")
            self.counters.update(m.get("counters", {}))
            if "sampler" in m:
                if m["sampler"]["name"] != self.sampler.name:
                    raise ConfigError(f"cannot resume: the run used the {m['sampler']['name']} sampler")
                saved_world = int(m["sampler"].get("world_size", 1))
                if saved_world != world.world_size and self.sampler.per_rank:
                    self.log(
                        f"note: the checkpoint was written by {saved_world} rank(s) and this job has "
                        f"{world.world_size}: each rank's random stream is re-derived from (seed, step, rank)"
                    )
                self.sampler.restore(m["sampler"], step=self.step)
            saved_batch = int(m.get("world_size", 1)) * int(m.get("train_options", {}).get("accum", o.accum))
            if saved_batch != world.world_size * o.accum:
                self.log(
                    f"note: the global batch changes from {saved_batch * o.batch} to "
                    f"{world.world_size * o.accum * o.batch} sequences per step (ranks x batch x accum); "
                    "pass --accum to keep it"
                )
            if self.scaler is not None and m.get("loss_scaler"):
                self.scaler.restore(m["loss_scaler"])
        self.resumed = manifest is not None
        ranks = world.world_size
        self.global_batch = o.batch * o.accum * ranks
        self.tokens_per_step = o.batch * o.seq * o.accum * ranks
        vocab_eff = self.compaction.size if self.compaction else None
        self.flops_per_step = training_flops_per_sequence(cfg, o.seq, vocab_eff) * o.batch * o.accum * ranks
        labels = describe(self.pipe)
        self.labels = labels
        note = getattr(self.pipe, "fusion_note", "")
        if note:
            self.log(note)
        self.peak = 0.0
        # the run directory: rank 0 only; the other ranks keep their records to themselves
        self.metrics: Any = NullMetrics()
        world.agree(lambda: self._open_run_dir(what, labels) if world.is_main else None, "writing the run")

    def _setup_data_and_pipeline(self, params: ModelParams, opt_state: AdamState | None) -> None:
        """Tokenizer, data, vocabulary compaction, pipeline and optimizer (on every rank)."""
        o, cfg = self.opts, self.cfg
        # tokenizer (optional; rank 0 samples text and checks the token file's sidecar with it)
        self.tokenizer = None
        tok_fp = None
        if o.tokenizer and self.world.is_main:
            from ..tokenizer import load_tokenizer

            self.tokenizer = load_tokenizer(o.tokenizer, vocab_size=cfg.vocab_size)
            tok_fp = self.tokenizer.fingerprint()
        self.data = resolve_data(o, cfg, tok_fp)
        self.compaction = None
        if o.compact_vocab:
            self.compaction = VocabCompaction.from_tokens(np.asarray(self.data.train.tokens), cfg.vocab_size)
            self.log(
                f"vocabulary compaction: {cfg.vocab_size} -> {self.compaction.size} active tokens "
                "(the loss is over the active tokens only)"
            )
            if self.data.val is not None:
                lo, hi = self.data.val_range  # type: ignore[misc]
                val_ids = np.unique(np.asarray(self.data.val.tokens[lo:hi]))
                missing = np.setdiff1d(val_ids, self.compaction.ids.numpy())
                if missing.size:
                    raise InputError(
                        self.data.val.path,
                        f"{missing.size} validation token ids never occur in the "
                        "training data, so --compact-vocab cannot score them",
                    )

        # pipeline and optimizer
        choice = PipelineChoice(
            pipeline=o.pipeline,
            backend=o.backend,
            dtype=o.dtype,
            dw_device=o.dw_device,
            fusion=o.fusion,
            ane_chip=o.ane_chip,
            ane_programs=o.ane_programs,
            ane_inputs=o.ane_inputs,
            ane_runtime=o.ane_runtime,
            seq=o.seq,
        )
        self.pipe: Pipeline = make_pipeline(params, choice, self.compaction)
        if self.world.backend == "nccl" and self.pipe.params.flat.device.type != "cuda":
            raise ConfigError(
                f"the pipeline runs on {self.pipe.params.flat.device.type} but the ranks talk over NCCL; "
                "use --dist-backend gloo or --backend cuda"
            )
        self.opt_cfg = o.optimizer_config()
        if opt_state is not None and opt_state.m.flat.device != self.pipe.params.flat.device:
            opt_state = AdamState(
                opt_state.m.to(device=self.pipe.params.flat.device),
                opt_state.v.to(device=self.pipe.params.flat.device),
                opt_state.t,
            )
        self.optimizer = AdamW(self.pipe.params, self.opt_cfg, opt_state)
        self.scaler = DynamicLossScaler() if self.pipe.needs_loss_scaling else None

    def _open_run_dir(self, what: str, labels: dict[str, str]) -> None:
        """Rank 0: the peak probe, metrics.jsonl, trackers, config.json and the "run" record."""
        o, cfg, world = self.opts, self.cfg, self.world
        dev = self.pipe.params.flat.device
        peak_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(labels["precision"], torch.float32)
        on_torch = labels["backend"] in ("cpu", "cuda")  # the ANE's peak cannot be probed from here
        self.peak = o.peak_tflops or (peak_tflops(dev, peak_dtype) if on_torch else 0.0)
        self.metrics = MetricsWriter(self.run_dir / "metrics.jsonl", start_time=self.t_start)
        self._attach_trackers()
        self.write_config()
        self.log(f"model: {what}; {cfg.shape_line()}; {cfg.param_count():,} parameters")
        ranks = (
            f", {world.world_size} ranks over {world.backend} (global batch {self.global_batch} sequences)"
            if world.active
            else ""
        )
        self.log(
            f"pipeline: {labels['pipeline']} on {labels['backend']} in {labels['precision']}"
            + (f" ({labels['fusion']} fusion)" if "fusion" in labels else "")
            + "; batch "
            f"{o.batch}x{o.seq}, accum {o.accum}{ranks} ({self.tokens_per_step:,} tokens/step); "
            f"{o.optimizer} lr {o.lr:g}"
        )
        if "ane" in labels:
            self.log(labels["ane"])
        if world.active and self.sync is not None and not self.sync.overlap:
            self.log(
                "note: this pipeline announces no gradient buckets; the all-reduce runs after the backward"
            )
        self.metrics.write(
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
            start_step=self.step,
            lr=o.lr,
            min_lr=self.opt_cfg.min_lr if self.opt_cfg.min_lr is not None else o.lr / 10,
            warmup=self.opt_cfg.warmup,
            optimizer=o.optimizer,
            tokens_per_step=self.tokens_per_step,
            flops_per_step=self.flops_per_step,
            peak_tflops=self.peak,
            compact_vocab=self.compaction.size if self.compaction else None,
            resumed=self.resumed,
        )

    def _attach_trackers(self) -> None:
        o = self.opts
        if not (o.wandb or o.tensorboard):
            return
        try:
            from ..ui.trackers import make_trackers
        except ImportError as e:
            raise AnetrainError(f"experiment tracking is unavailable: {e}") from None
        self.metrics.listeners += make_trackers(
            self.run_dir,
            wandb=o.wandb,
            wandb_project=o.wandb_project,
            wandb_name=o.wandb_name,
            wandb_mode=o.wandb_mode,
            tensorboard=o.tensorboard,
        )

    def write_config(self) -> None:
        doc = {
            "model": self.cfg.to_dict(),
            "train": asdict(self.opts),
            "tokenizer": str(Path(self.opts.tokenizer).resolve()) if self.opts.tokenizer else None,
            "data": str(Path(self.opts.data).resolve()) if self.opts.data else None,
            "val_data": str(Path(self.opts.val_data).resolve()) if self.opts.val_data else None,
            "world_size": self.world.world_size,
            "anetrain_version": __version__,
        }
        atomic_write_text(self.run_dir / "config.json", json.dumps(doc, indent=1))

    # ---- pieces of the loop -----------------------------------------------------------------------
    def evaluate(self) -> float | None:
        """The mean validation loss (each rank scores its share of the batches; every rank gets the mean)."""
        if not self.eval_set:
            return None
        world = self.world
        t0 = time.perf_counter()
        if world.active:
            mine = [self.pipe.loss(w) for w in self.eval_set[world.rank :: world.world_size]]
            total, count = world.sum_values([math.fsum(mine), len(mine)], "the validation loss reduction")
            loss = total / count
        else:
            loss = float(np.mean([self.pipe.loss(w) for w in self.eval_set]))
        self.counters["eval_s"] += time.perf_counter() - t0
        self.metrics.write("eval", step=self.step, val_loss=loss, val_ppl=math.exp(min(loss, 50.0)))
        self.log(f"step {self.step}: val loss {loss:.4f} (ppl {math.exp(min(loss, 50.0)):.2f})")
        if self.best_val is None or loss < self.best_val:
            first = self.best_val is None
            self.best_val = loss
            if not first or self.step > 0:
                self.checkpoint("best")
        return loss

    def manifest(self, kind: str, sampler_state: dict[str, Any] | None = None) -> dict[str, Any]:
        return {
            "step": self.step,
            "total_steps": self.opts.steps,
            "kind": kind,
            "sampler": sampler_state or self.sampler.job_state([self.sampler.state()]),
            "world_size": self.world.world_size,
            "loss_scaler": self.scaler.state() if self.scaler else None,
            "best_val_loss": self.best_val,
            "counters": self.counters,
            "train_options": asdict(self.opts),
            "last_loss": getattr(self, "last_loss", None),
            "anetrain_version": __version__,
        }

    def sampler_job_state(self) -> dict[str, Any]:
        """The samplers' state for a checkpoint (every rank's, where each rank has its own stream)."""
        world, own = self.world, self.sampler.state()
        if world.active and self.sampler.per_rank:
            states = world.gather_json(own, "collecting the samplers' states")
        else:
            states = [own] * world.world_size
        return self.sampler.job_state(states)

    def checkpoint(self, kind: str) -> None:
        """Every rank calls this at the same step; rank 0 writes the checkpoint."""
        sampler_state = self.sampler_job_state()
        if not self.world.is_main:
            return
        self.counters["wall_s"] = self.wall_before + (time.time() - self.t_start)
        name = checkpoint_name(self.step) if kind != "best" else "best_" + checkpoint_name(self.step)
        pointers = ("best",) if kind == "best" else ("latest",)
        try:
            path = save_checkpoint(
                self.run_dir,
                name,
                self.pipe.params,
                self.optimizer.state,
                self.manifest(kind, sampler_state),
                pointers=pointers,
            )
        except AnetrainError as e:
            if kind in ("final", "interrupt"):
                raise
            self.log(f"warning: {e}; training continues")
            return
        prune_checkpoints(self.run_dir, self.opts.keep_checkpoints)
        self.metrics.write("checkpoint", step=self.step, path=str(path), kind=kind)

    def sample(self) -> None:
        if self.tokenizer is None or not self.world.is_main:
            return
        try:
            from ..generate import generate
        except ImportError:
            return
        params = (
            self.pipe.params
            if self.pipe.params.flat.device.type == "cpu"
            else self.pipe.params.to(device="cpu")
        )
        res = generate(
            params,
            self.tokenizer,
            prompt="",
            steps=self.opts.sample_tokens,
            temperature=0.8,
            top_p=0.9,
            seed=self.step,
        )
        self.metrics.write("sample", step=self.step, text=res.text)
        self.log(f"sample at step {self.step}:\n{res.text.strip()}")

    def control(self) -> None:
        """Requests from a dashboard (RUN_DIR/control/*) and signals (rank 0 watches the run directory)."""
        if not self.world.is_main:
            return
        ctl = self.run_dir / "control"
        if (ctl / "generate").exists():
            (ctl / "generate").unlink(missing_ok=True)
            self.sample()
        if (ctl / "stop").exists():
            (ctl / "stop").unlink(missing_ok=True)
            self.request_stop(signal.SIGINT)
        with contextlib.suppress(OSError):
            (self.run_dir / "trainer.pid").touch()

    def request_stop(self, signum: int) -> None:
        """Stop after this step: at once for a single process; data-parallel, once the ranks agree (the
        request travels with the next step's reduction, so every rank stops after the same step)."""
        if self.world.active:
            self.pending_stop = self.pending_stop or signum
        else:
            self.stop_signal = self.stop_signal or signum

    def _reduce_step(self, losses: list[float]) -> float:
        """Data-parallel: the mean loss over every rank's micro-batches, and the agreed stop request."""
        pending = self.pending_stop
        total, n_int, n_term = self.world.sum_values(
            [math.fsum(losses), float(pending == signal.SIGINT), float(pending == signal.SIGTERM)],
            "the step's loss reduction",
        )
        if n_term or n_int:
            self.stop_signal = signal.SIGTERM if n_term else signal.SIGINT
        return total / (len(losses) * self.world.world_size)

    def train_step(self) -> dict[str, Any]:
        o, pipe, world = self.opts, self.pipe, self.world
        t0 = time.perf_counter()
        pipe.times.reset()
        pipe.zero_grad()
        scale = self.scaler.scale if self.scaler else 1.0
        # each rank's share of the average over every rank's micro-batches: the all-reduced sum is the mean
        divisor = o.accum * world.world_size
        losses = []
        for i in range(o.accum):
            with pipe.times.phase("io"):
                window = self.sampler.next_batch()
            if self.sync is not None:
                self.sync.arm(i == o.accum - 1)
            losses.append(pipe.forward_backward(window, scale / divisor))
        comm_ms = comm_total_ms = 0.0
        if self.sync is not None:
            comm_ms, comm_total_ms = self.sync.finish()
            t_reduce = time.perf_counter()
            loss = self._reduce_step(losses)
            reduce_ms = (time.perf_counter() - t_reduce) * 1e3  # the loss and the stop request: exposed too
            comm_ms += reduce_ms
            comm_total_ms += reduce_ms
        else:
            loss = float(np.mean(losses))
        with pipe.times.phase("optimizer"):
            grads = pipe.grads
            # identical on every rank (the gradients are), so clipping and fp16 skips agree everywhere
            norm = global_grad_norm(grads) / scale  # before clipping, without the loss scale
            apply = math.isfinite(norm)
            if self.scaler is not None:
                apply = self.scaler.update(apply)
            elif not apply:
                raise AnetrainError(
                    f"step {self.step + 1}: the gradient is not finite (loss {loss:.4g}); "
                    "lower --lr or use --clip"
                )
            lr = lr_at(self.step, self.opt_cfg)
            if apply:
                # loss-scale removal and clipping happen inside the fused update
                self.optimizer.step(grads, lr, scale * clip_divisor(norm, self.opt_cfg.clip))
                pipe.after_update()
        ms = (time.perf_counter() - t0) * 1e3
        self.step += 1
        phases = pipe.times.reset()
        self.last_loss = loss
        c = self.counters
        c["tokens"] += self.tokens_per_step
        c["train_s"] += ms / 1e3
        c["steps_timed"] += 1
        c["flops"] += self.flops_per_step
        c["allreduce_ms"] = c.get("allreduce_ms", 0.0) + comm_ms
        c["allreduce_total_ms"] = c.get("allreduce_total_ms", 0.0) + comm_total_ms
        for k, v in phases.items():
            c["phase_ms"][k] = c["phase_ms"].get(k, 0.0) + v
        tflops = self.flops_per_step / (ms / 1e3) / 1e12
        extra: dict[str, Any] = {}
        if self.sync is not None:
            extra = {
                "allreduce_ms": comm_ms,
                "allreduce_total_ms": comm_total_ms,
                "allreduce_buckets": self.sync.buckets_reduced,
            }
        return self.metrics.write(
            "step",
            step=self.step,
            loss=loss,
            lr=lr,
            grad_norm=norm,
            ms=ms,
            tokens_per_s=self.tokens_per_step / (ms / 1e3),
            tflops=tflops,
            utilization=tflops / (self.peak * world.world_size) if self.peak else None,
            phases=phases,
            **extra,
            tokens=c["tokens"],
            skipped=not apply,
            loss_scale=self.scaler.scale if self.scaler else None,
            rss_mb=psutil.Process().memory_info().rss / 2**20,
        )

    # ---- the run ---------------------------------------------------------------------------------
    def run(self) -> int:
        o, world = self.opts, self.world
        self.wall_before = float(self.counters.get("wall_s", 0.0))
        pid_file = self.run_dir / "trainer.pid"
        if world.is_main:
            atomic_write_text(pid_file, f"{os.getpid()}\n")
        handlers = self._install_signals()
        end = o.steps if o.stop_at is None else min(o.steps, o.stop_at)
        exit_code = 0
        try:
            warm = getattr(self.pipe, "warmup", None)
            if warm is not None and self.step < end:
                t0 = time.perf_counter()
                warm(o.batch, o.seq)
                secs = time.perf_counter() - t0
                self.counters["compile_s"] += secs
                self.metrics.write("compile", seconds=secs, what=self.labels["pipeline"])
            if not self.resumed or self.step == 0:
                self.evaluate()
            progress = self._progress(end)
            while self.step < end:
                rec = self.train_step()
                progress(rec)
                if o.eval_every and self.step % o.eval_every == 0 and self.step < o.steps:
                    self.evaluate()
                if o.ckpt_every and self.step % o.ckpt_every == 0 and self.step < end:
                    self.checkpoint("periodic")
                if o.sample_every and self.step % o.sample_every == 0:
                    self.sample()
                if o.dist_check_every and self.step % o.dist_check_every == 0:
                    check_in_sync(world, self.pipe.params.flat, self.step)
                self.control()
                if self.stop_signal is not None:
                    raise Stop
            if self.step >= o.steps:
                if o.eval_every and self.eval_set:
                    self.evaluate()
                self.checkpoint("final")
                self.sample()
            else:
                self.log(
                    f"stopping at step {self.step} (--stop-at); resume with: anetrain train --resume "
                    f"{self.run_dir}"
                )
                self.checkpoint("interrupt")
        except Stop:
            name = signal.Signals(self.stop_signal).name if self.stop_signal else "stop"
            self.log(
                f"{name}: checkpointing at step {self.step}; resume with: "
                f"anetrain train --resume {self.run_dir}"
            )
            self.checkpoint("interrupt")
            exit_code = 130 if self.stop_signal == signal.SIGINT else 143
        finally:
            self._restore_signals(handlers)
            if world.is_main:
                pid_file.unlink(missing_ok=True)
        self.report()
        self.pipe.close()
        self.metrics.close()
        return exit_code

    def _progress(self, end: int) -> Any:
        """A callback for each step record: a progress bar on a terminal, plain lines otherwise (and in
        train.log every --log-every steps). Rank 0 only."""
        from ..ui.progress import ConsoleProgress

        o, log = self.opts, self.log
        if not self.world.is_main:
            return lambda rec: None
        stream = sys.stderr
        bar = ConsoleProgress(end, start_step=self.step, stream=stream, log_every=o.log_every)
        if isinstance(log, RunLog) and log.sink is None:
            log.progress = bar

        def update(rec: dict[str, Any]) -> None:
            bar.update_record(rec)
            if rec["step"] % max(1, o.log_every) == 0 or rec["step"] == end:
                line = bar.format_line(rec["step"], rec["loss"], rec["tokens_per_s"], rec["lr"], rec["ms"])
                if isinstance(log, RunLog) and log.sink is None:
                    log.file_only(line)  # the console already shows it (bar or plain line)
                else:
                    log(line)

        return update

    def report(self) -> None:
        if not self.world.is_main:
            return
        c = self.counters
        wall = self.wall_before + (time.time() - self.t_start)
        rep = build_report(
            total_steps=int(c["steps_timed"]),
            wall_s=wall,
            compile_s=c["compile_s"],
            train_s=c["train_s"],
            phase_ms=c["phase_ms"],
            tokens=int(c["tokens"]),
            flops=c["flops"],
            peak_tflops=self.peak,
            best_val_loss=self.best_val,
            final_loss=getattr(self, "last_loss", None),
            world_size=self.world.world_size,
            global_batch=self.global_batch,
            allreduce_ms=float(c.get("allreduce_ms", 0.0)),
            allreduce_total_ms=float(c.get("allreduce_total_ms", 0.0)),
            loss_compacted=self.compaction is not None,
        )
        self.metrics.write("report", **rep)
        atomic_write_text(self.run_dir / "report.json", json.dumps(rep, indent=1))
        self.log(format_report(rep))

    def _install_signals(self) -> dict[int, Any]:
        first_at: list[float] = []

        def handler(signum: int, frame: Any) -> None:
            if self.stop_signal is not None or self.pending_stop is not None:  # second signal: stop now
                # except under torchrun, which passes on the Ctrl-C the terminal already sent every rank
                if self.world.active and time.monotonic() - first_at[0] < DUPLICATE_SIGNAL_S:
                    return
                raise KeyboardInterrupt
            first_at[:] = [time.monotonic()]
            self.request_stop(signum)
            self.log(f"{signal.Signals(signum).name} received: finishing this step, then checkpointing")

        old = {}
        for s in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread
                old[s] = signal.signal(s, handler)
        return old

    @staticmethod
    def _restore_signals(old: dict[int, Any]) -> None:
        for s, h in old.items():
            signal.signal(s, h)


class RunLog:
    """The run's log: lines go to RUN_DIR/train.log and to the console (above the progress bar, if any).

    Under ``anetrain train --dashboard`` the training child's stderr already is train.log (so that tracebacks
    land there too); the parent sets ANETRAIN_STDERR_IS_LOG and the child then writes each line only once.
    """

    def __init__(self, path: Path, sink: Any = None) -> None:
        self.to_file = not os.environ.get("ANETRAIN_STDERR_IS_LOG")
        self.file = open(path, "a", encoding="utf-8") if self.to_file else None  # noqa: SIM115
        self.sink = sink
        self.progress: Any = None

    def __call__(self, line: str) -> None:
        if self.sink is not None:
            self.sink(line)
        elif self.progress is not None:
            self.progress.log(line)
        else:
            print(line, file=sys.stderr, flush=True)
        self.file_only(line)

    def file_only(self, line: str) -> None:
        if self.file is not None:
            self.file.write(line + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None
        if self.file is not None:
            self.file.close()


class RankLog:
    """The log of a data-parallel rank other than 0: only warnings reach stderr, prefixed with the rank
    (rank 0 writes train.log and the console for the job)."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def __call__(self, line: str) -> None:
        if line.lstrip().lower().startswith(("warning", "error")):
            print(f"[rank {self.rank}] {line}", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass
