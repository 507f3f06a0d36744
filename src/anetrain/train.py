"""The training program: data -> pipeline -> optimizer -> checkpoints, metrics and the Efficiency Report.

``run_training(opts)`` is what ``anetrain train`` calls. One step is one optimizer update over ``accum``
micro-batches of ``batch x seq`` tokens. The loop, per step::

    zero the gradients
    accum times: draw a window batch (io) -> pipeline.forward_backward(window, scale/accum)
    [fp16: unscale, skip the update on overflow]  global-norm clip  optimizer step  pipeline.after_update()
    log a "step" record; evaluate, checkpoint, sample when due; stop cleanly on Ctrl-C / SIGTERM / --stop-at

Data-parallel (under torchrun, see :mod:`anetrain.distributed` and docs/distributed.md): every rank runs this
loop on its own windows, scaling its gradients by 1/(accum x world size); the last micro-step's backward
all-reduces them bucket by bucket, and the trainer waits for that before the norm, so every rank sees the same
averaged gradients and applies the same update. Rank 0 alone reads the run's options and the checkpoint it
resumes from (and hands them to the others), and alone writes config.json, metrics.jsonl, train.log,
checkpoints and report.json; the ranks agree on stopping, evaluation results and checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from . import __version__
from .checkpoint import (
    Checkpoint,
    checkpoint_name,
    config_difference,
    holds_checkpoint,
    load_latest,
    prune_checkpoints,
    save_checkpoint,
)
from .config import PRESETS, ModelConfig, deepnet_alpha, load_config_file, make_config
from .data.compaction import VocabCompaction
from .data.sampler import SAMPLERS, eval_windows, make_sampler
from .data.tokens import TokenFile, check_tokens, open_tokens
from .distributed import BACKENDS, DistributedError, GradSync, World, check_in_sync, init_world, wants_cuda
from .errors import AnetrainError, ConfigError, InputError
from .fsutil import atomic_write_text
from .optim import AdamState, AdamW, DynamicLossScaler, OptimizerConfig, clip_divisor, global_grad_norm, lr_at
from .params import INIT_SCHEMES, ModelParams, init_params
from .pipeline.base import Pipeline
from .pipeline.factory import PipelineChoice, describe, make_pipeline
from .telemetry.flops import training_flops_per_sequence
from .telemetry.metrics import MetricsWriter
from .telemetry.peak import peak_tflops
from .telemetry.report import build_report, format_report
from .timing import PHASES

# ------------------------------------------------------------------------------------------------
# Options


def opt(default: Any, help: str, **kw: Any) -> Any:
    """A training option: its default and its help text (the CLI is generated from these)."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainOptions:
    model: str = opt(
        "stories260K",
        "PRESET name, model CONFIG (.toml/.json), or WEIGHTS file to continue from "
        f"(llama2.c .bin, BLZT checkpoint, HF directory); presets: {', '.join(PRESETS)}",
    )
    data: str | None = opt(
        None,
        "training token file (flat uint16, from `anetrain prepare`); omitted: the "
        "embedded story corpus is generated, tokenized and used",
    )
    val_data: str | None = opt(None, "validation token file (default: a held-out tail of --data)")
    val_fraction: float = opt(
        0.1,
        "fraction of --data held out at its end for validation when --val-data is not "
        "given (training never samples it); 0 disables evaluation",
    )
    tokenizer: str | None = opt(
        None, "tokenizer (.bin or .model) for generated samples and for checking the token file's sidecar"
    )
    out: str | None = opt(None, "run directory (default: runs/<model>-<date>-<time>)")
    batch: int = opt(8, "sequences per micro-batch")
    seq: int = opt(256, "tokens per sequence")
    accum: int = opt(1, "micro-batches per optimizer step (gradient accumulation)")
    steps: int = opt(1000, "optimizer steps in the whole run (the LR schedule spans them)")
    stop_at: int | None = opt(
        None, "end this process at STEP with a checkpoint, as if interrupted; resume later"
    )
    optimizer: str = opt(
        "adamw",
        "adamw (beta2 0.95, decay, warmup+cosine, clipping) or adam (the original's static "
        "pipeline: beta2 0.999, no decay, constant LR)",
        choices=("adamw", "adam"),
    )
    lr: float = opt(5e-4, "peak learning rate")
    min_lr: float | None = opt(None, "learning rate at the end of the cosine decay (default lr/10)")
    warmup: int = opt(100, "linear warmup steps")
    wd: float = opt(0.1, "AdamW weight decay (matrices and embedding only)")
    clip: float | None = opt(
        None, "global gradient-norm clipping threshold; 0 disables (default 1.0 for adamw, 0 for adam)"
    )
    beta1: float = opt(0.9, "Adam beta1")
    beta2: float | None = opt(None, "Adam beta2 (default 0.95 for adamw, 0.999 for adam)")
    eps: float = opt(1e-8, "Adam epsilon")
    seed: int = opt(1337, "seed for initialization and data sampling")
    init: str = opt("llama2c", "initialization when training from scratch", choices=INIT_SCHEMES)
    residual_scale: str | None = opt(
        None,
        "residual branch scale alpha for a new model: a number or 'deepnet' "
        "(1/sqrt(2L), the original dynamic pipeline's); default: the config's",
    )
    sampler: str = opt(
        "random",
        "window order: random (seeded, resumable; each rank its own stream), shared (one seeded stream dealt "
        "to the ranks batch by batch: N ranks train on the windows of 1 process with N x --accum) or drand48 "
        "(the original trainer's exact order, dealt as shared)",
        choices=SAMPLERS,
    )
    compact_vocab: bool = opt(
        False,
        "softmax over the tokens present in the data only (as the original); the "
        "reported loss is then a compacted cross-entropy",
    )
    eval_every: int = opt(100, "evaluate every N steps (and before the first step); 0 disables")
    eval_batches: int = opt(20, "validation batches per evaluation")
    log_every: int = opt(10, "console line every N steps")
    ckpt_every: int = opt(
        500,
        "checkpoint every N steps (also at the end, on a new best validation loss, and on Ctrl-C/SIGTERM)",
    )
    keep_checkpoints: int = opt(2, "periodic checkpoints to keep")
    sample_every: int = opt(
        0, "write a generated sample to metrics every N steps (needs --tokenizer); 0: only at the end"
    )
    sample_tokens: int = opt(120, "tokens per generated sample")
    pipeline: str = opt(
        "optimized",
        "baseline (core kernels, serial fp32) or optimized (16-bit compute, "
        "preallocated buffers, concurrent dW, fused ops)",
        choices=("baseline", "optimized"),
    )
    backend: str = opt(
        "auto",
        "where kernels run: auto, cpu, cuda, ane-sim (the Neural Engine programs run by the "
        "simulator), ane (macOS)",
        choices=("auto", "cpu", "cuda", "ane-sim", "ane"),
    )
    dtype: str = opt(
        "auto",
        "compute precision of the optimized pipeline: auto (bf16 where the hardware has it, "
        "else fp16 with loss scaling), fp32, bf16, fp16",
        choices=("auto", "fp32", "bf16", "fp16"),
    )
    dw_device: str | None = opt(None, "device for the weight-gradient GEMMs (e.g. cpu while dx runs on cuda)")
    fusion: str = opt(
        "auto",
        "how the optimized pipeline fuses its elementwise work: compile (torch.compile'd kernels; "
        "needs a C++ compiler on CPU, Triton on CUDA; compiled in the first step), hand (torch "
        "operators into preallocated buffers), auto (hand on CPU, compile on CUDA)",
        choices=("auto", "compile", "hand"),
    )
    ane_chip: str = opt(
        "auto",
        "Apple chip family whose MIL dialect the ANE programs use: auto (detected on a Mac; m4 for ane-sim), "
        "m1, m2, m3, m4, m5",
        choices=("auto", "m1", "m2", "m3", "m4", "m5"),
    )
    ane_runtime: str | None = opt(
        None,
        "how --backend ane reaches the Neural Engine: private (the in-memory compiler, the original's way; "
        "default), coreml (Core ML with CPU_AND_NE, the sanctioned route) or sim (the simulator, tests)",
        choices=("private", "coreml", "sim"),
    )
    ane_inputs: str = opt(
        "separate",
        "how ANE programs take their weights: separate inputs (faster per the "
        "original's issue #22) or one packed input (the original's)",
        choices=("separate", "packed"),
    )
    threads: int | None = opt(None, "torch intra-op threads (default: torch's choice)")
    peak_tflops: float | None = opt(
        None, "peak TFLOPS for the utilization figure (default: measured once by a GEMM probe and cached)"
    )
    deterministic: bool = opt(False, "use deterministic algorithms (bitwise-reproducible resumes on CPU)")
    resume: str | None = opt(None, "RUN_DIR to resume from its newest complete checkpoint")
    dashboard: bool = opt(False, "show the live dashboard in this terminal while training")
    wandb: bool = opt(
        False, "log to Weights & Biases (pip install anetrain[wandb]; offline: WANDB_MODE=offline)"
    )
    wandb_project: str = opt("anetrain", "W&B project")
    wandb_name: str | None = opt(None, "W&B run name (default: the run directory's name)")
    wandb_mode: str | None = opt(
        None,
        "W&B mode: online, offline (no network needed) or disabled (default: W&B's "
        "own, e.g. from WANDB_MODE)",
        choices=("online", "offline", "disabled"),
    )
    tensorboard: bool = opt(
        False, "write TensorBoard event files to RUN_DIR/tensorboard (pip install anetrain[tensorboard])"
    )
    ddp: bool = opt(
        False,
        "train data-parallel on this machine: anetrain starts itself under torchrun (--standalone) with "
        "--nproc-per-node processes; implied when already launched by torchrun",
    )
    nproc_per_node: int | None = opt(
        None, "processes for --ddp (default: the number of CUDA devices; required without one)"
    )
    dist_timeout: float = opt(
        300.0,
        "seconds a rank waits for the others (joining, each all-reduce) before the job fails with an error",
    )
    dist_backend: str = opt(
        "auto", "torch.distributed backend: auto (nccl for CUDA, gloo for CPU), gloo, nccl", choices=BACKENDS
    )
    dist_check_every: int = opt(
        0, "debug: check every N steps that all ranks hold bit-identical weights; 0 disables"
    )

    def optimizer_config(self) -> OptimizerConfig:
        return OptimizerConfig.for_kind(
            self.optimizer,
            lr=self.lr,
            min_lr=self.min_lr,
            warmup=self.warmup,
            total_steps=self.steps,
            beta1=self.beta1,
            beta2=self.beta2,
            eps=self.eps,
            weight_decay=self.wd if self.optimizer == "adamw" else 0.0,
            clip=self.clip,
        )

    def validate(self) -> None:
        for name in ("batch", "seq", "accum", "steps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise ConfigError(f"--lr must be a positive number, got {self.lr}")
        if self.stop_at is not None and self.stop_at <= 0:
            raise ConfigError(f"--stop-at must be positive, got {self.stop_at}")
        if not self.dist_timeout > 0:
            raise ConfigError(f"--dist-timeout must be positive, got {self.dist_timeout}")
        if self.nproc_per_node is not None and self.nproc_per_node <= 0:
            raise ConfigError(f"--nproc-per-node must be positive, got {self.nproc_per_node}")
        if self.dist_check_every < 0:
            raise ConfigError(f"--dist-check-every must be 0 or positive, got {self.dist_check_every}")


# Options whose change on --resume cannot alter the math of the steps already taken.
RESUME_OVERRIDABLE = {
    "steps",
    "stop_at",
    "eval_every",
    "eval_batches",
    "log_every",
    "ckpt_every",
    "keep_checkpoints",
    "sample_every",
    "sample_tokens",
    "peak_tflops",
    "dashboard",
    "wandb",
    "wandb_project",
    "wandb_name",
    "wandb_mode",
    "tensorboard",
    "threads",
    "resume",
    "out",
    "pipeline",
    "backend",
    "dtype",
    "dw_device",
    "fusion",
    "ane_chip",
    "ane_inputs",
    "ddp",
    "nproc_per_node",
    "dist_timeout",
    "dist_backend",
    "dist_check_every",
}


# ------------------------------------------------------------------------------------------------
# Model and data resolution


def config_of_spec(spec: str, alpha: str | None = None) -> ModelConfig:
    """The config a --model spec describes (a weights file is read for its header)."""
    if spec in PRESETS or (spec.lower().endswith((".toml", ".json")) and not Path(spec).is_dir()):
        cfg = PRESETS[spec] if spec in PRESETS else load_config_file(spec)
        if alpha is not None:
            cfg = cfg.with_(
                residual_scale=deepnet_alpha(cfg.n_layers) if alpha == "deepnet" else float(alpha)
            )
        return cfg
    from .formats import load_model

    return load_model(spec).cfg


def resolve_model(opts: TrainOptions) -> tuple[ModelConfig, ModelParams, AdamState | None, str]:
    """(config, fresh or pretrained fp32 params, optimizer state if the file has one, description)."""
    spec = opts.model
    alpha = opts.residual_scale
    if spec in PRESETS or (spec.lower().endswith((".toml", ".json")) and not Path(spec).is_dir()):
        cfg = PRESETS[spec] if spec in PRESETS else load_config_file(spec)
        if alpha is not None:
            cfg = cfg.with_(
                residual_scale=deepnet_alpha(cfg.n_layers) if alpha == "deepnet" else float(alpha)
            )
        return (
            cfg,
            init_params(cfg, opts.init, opts.seed),
            None,
            f"{cfg.name} from scratch ({opts.init} init)",
        )
    if not Path(spec).exists():
        raise ConfigError(
            f"--model {spec!r} is neither a preset ({', '.join(PRESETS)}), a .toml/.json config nor "
            "an existing weights file"
        )
    if alpha is not None:
        raise ConfigError("--residual-scale applies to new models only; a weights file carries its own")
    from .formats import load_model

    loaded = load_model(spec)
    return loaded.cfg, loaded.params, loaded.optimizer, f"{spec} ({loaded.format})"


@dataclass
class DataSplit:
    train: TokenFile
    n_train: int
    val: TokenFile | None
    val_range: tuple[int, int] | None


def resolve_data(opts: TrainOptions, cfg: ModelConfig, tokenizer_fp: str | None) -> DataSplit:
    assert opts.data is not None
    window = opts.seq + 1
    train = open_tokens(opts.data)
    if opts.val_data:
        val = open_tokens(opts.val_data)
        check_tokens(train, vocab_size=cfg.vocab_size, window=window, tokenizer_fingerprint=tokenizer_fp)
        check_tokens(
            val,
            vocab_size=cfg.vocab_size,
            window=window,
            tokenizer_fingerprint=tokenizer_fp,
            what="validation",
        )
        return DataSplit(train, train.n, val, (0, val.n))
    n_val = int(train.n * opts.val_fraction)
    n_train = train.n - n_val
    check_tokens(
        train,
        vocab_size=cfg.vocab_size,
        window=window,
        tokenizer_fingerprint=tokenizer_fp,
        region=(0, n_train),
    )
    if n_val == 0:
        return DataSplit(train, n_train, None, None)
    if n_val < window:
        raise InputError(
            train.path,
            f"the held-out validation tail ({n_val} tokens, --val-fraction "
            f"{opts.val_fraction}) is shorter than one window of {window} tokens",
        )
    return DataSplit(train, n_train, train, (n_train, train.n))


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
            from .tokenizer import load_tokenizer

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
            ane_inputs=o.ane_inputs,
            ane_runtime=o.ane_runtime,
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
            f"pipeline: {labels['pipeline']} on {labels['backend']} in {labels['precision']}; batch "
            f"{o.batch}x{o.seq}, accum {o.accum}{ranks} ({self.tokens_per_step:,} tokens/step); "
            f"{o.optimizer} lr {o.lr:g}"
        )
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
            from .ui.trackers import make_trackers
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
            from .generate import generate
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
        from .ui.progress import ConsoleProgress

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


# ------------------------------------------------------------------------------------------------
# Entry point


def default_run_dir(model: str) -> Path:
    stem = Path(model).stem if not model in PRESETS else model  # noqa: E713
    return Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def load_resume_options(run_dir: Path, given: dict[str, Any], world_size: int = 1) -> TrainOptions:
    """The run's saved options, with the allowed overrides from the command line; refuses the others.

    ``--accum`` may change together with the number of ranks when ranks x accum (the global batch) stays the
    run's, e.g. a 2-rank run resumed by one process with twice the accumulation.
    """
    try:
        doc = json.loads((run_dir / "config.json").read_text("utf-8"))
        saved = doc["train"]
        saved_world = int(doc.get("world_size") or 1)
    except FileNotFoundError:
        raise InputError(run_dir, "not a run directory (no config.json)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(run_dir / "config.json", f"unreadable ({e})") from None
    known = {f.name for f in fields(TrainOptions)}
    opts = TrainOptions(**{k: v for k, v in saved.items() if k in known})
    opts.stop_at = None  # a --stop-at is for one process only; a plain resume runs to --steps
    # paths as recorded (absolute), so a resume from another directory finds the files
    for key in ("data", "val_data", "tokenizer"):
        if doc.get(key):
            setattr(opts, key, doc[key])
    same_global_batch = (
        "accum" in given
        and world_size != saved_world
        and given["accum"] * world_size == opts.accum * saved_world
    )
    for k, v in given.items():
        if k in RESUME_OVERRIDABLE or k == "model" or (k == "accum" and same_global_batch):
            continue
        if getattr(opts, k) != v:
            hint = ""
            if k == "accum" and world_size != saved_world:
                hint = (
                    f" (the run has {saved_world} rank(s) x accum {opts.accum}; with {world_size} rank(s) an "
                    f"--accum of {opts.accum * saved_world / world_size:g} keeps its global batch)"
                )
            raise ConfigError(
                f"--{k.replace('_', '-')} {v!r} differs from the run's {getattr(opts, k)!r}; a resumed "
                f"run keeps its options (start a new run to change it){hint}"
            )
    for k, v in given.items():
        if k in RESUME_OVERRIDABLE or (k == "accum" and same_global_batch):
            setattr(opts, k, v)
    opts.resume = str(run_dir)
    opts.out = str(run_dir)
    return opts


def _saved_backend(run_dir: str) -> str | None:
    """The --backend a run directory's config.json names, if this process can read it (a peek before the
    process group exists: it decides NCCL or gloo)."""
    try:
        return str(json.loads((Path(run_dir) / "config.json").read_text("utf-8"))["train"]["backend"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def start_world(opts: TrainOptions, given: dict[str, Any]) -> World:
    """The process group for this process (a single-process World unless launched by torchrun)."""
    backend = opts.backend
    if opts.resume and "backend" not in given:
        backend = _saved_backend(opts.resume) or backend
    if not opts.dist_timeout > 0:
        raise ConfigError(f"--dist-timeout must be positive, got {opts.dist_timeout}")
    return init_world(opts.dist_timeout, opts.dist_backend, wants_cuda(backend))


def _prepare_run(
    opts: TrainOptions, given: dict[str, Any], world: World, log: Any
) -> tuple[TrainOptions, Path, Any]:
    """Rank 0 (or the single process): the run's options and directory, its log, the embedded data if no
    --data was given."""
    if opts.resume:
        run_dir = Path(opts.resume)
        opts = load_resume_options(run_dir, given, world.world_size)
    else:
        run_dir = Path(opts.out) if opts.out else default_run_dir(opts.model)
        if holds_checkpoint(run_dir):
            raise ConfigError(
                f"{run_dir} already holds a run; resume it with --resume {run_dir} or choose --out"
            )
    opts.validate()
    run_dir.mkdir(parents=True, exist_ok=True)
    both = RunLog(run_dir / "train.log", sink=log)
    try:
        if opts.data is None and not opts.resume:
            from .data.embedded import EMBEDDED_DEFAULTS, prepare_embedded

            for (
                key,
                value,
            ) in EMBEDDED_DEFAULTS.items():  # settings tuned for the embedded corpus, unless given
                if key not in given:
                    setattr(opts, key, value)
            opts.data, opts.tokenizer = (str(p) for p in prepare_embedded(log=both))
    except BaseException:
        both.close()
        raise
    return opts, run_dir, both


def run_training(opts: TrainOptions, given: dict[str, Any] | None = None, log: Any = None) -> int:
    """Run (or resume) a training run; returns the process exit code.

    Under torchrun every rank calls this; rank 0 prepares the run and hands the options to the others.
    """
    given = given or {}
    world = start_world(opts, given)
    try:
        return _run_ranks(opts, given, log, world)
    except AnetrainError as e:
        if world.active and not world.is_main and not isinstance(e, DistributedError):
            raise AnetrainError(f"rank {world.rank}: {e}") from e
        raise
    finally:
        world.close()


def _run_ranks(opts: TrainOptions, given: dict[str, Any], log: Any, world: World) -> int:
    main_log: Any = None

    def prepare() -> dict[str, Any]:
        nonlocal main_log
        prepared, run_dir, main_log = _prepare_run(opts, given, world, log)
        return {"opts": asdict(prepared), "run_dir": str(run_dir)}

    doc = world.from_main(prepare, "preparing the run")
    opts, run_dir = TrainOptions(**doc["opts"]), Path(doc["run_dir"])
    both = main_log if world.is_main else RankLog(world.rank)
    try:
        opts.validate()
        if opts.threads:
            torch.set_num_threads(opts.threads)
        if opts.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        trainer = Trainer(
            opts, run_dir, both, model_check=given.get("model") if opts.resume else None, world=world
        )
        trainer.setup()
        return trainer.run()
    finally:
        both.close()
