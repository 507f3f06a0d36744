"""The training program: data -> pipeline -> optimizer -> checkpoints, metrics and the Efficiency Report.

``run_training(opts)`` is what ``anetrain train`` calls. One step is one optimizer update over ``accum``
micro-batches of ``batch x seq`` tokens. The loop, per step::

    zero the gradients
    accum times: draw a window batch (io) -> pipeline.forward_backward(window, scale/accum)
    [fp16: unscale, skip the update on overflow]  global-norm clip  optimizer step  pipeline.after_update()
    log a "step" record; evaluate, checkpoint, sample when due; stop cleanly on Ctrl-C / SIGTERM / --stop-at
"""

from __future__ import annotations

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
    find_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from .config import PRESETS, ModelConfig, deepnet_alpha, load_config_file
from .data.compaction import VocabCompaction
from .data.sampler import Drand48Sampler, RandomSampler, eval_windows
from .data.tokens import TokenFile, check_tokens, open_tokens
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
        "window order: random (seeded, resumable) or drand48 (the original trainer's exact order)",
        choices=("random", "drand48"),
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
    compile: bool = opt(True, "fuse elementwise work with torch.compile (optimized pipeline)")
    dw_device: str | None = opt(None, "device for the weight-gradient GEMMs (e.g. cpu while dx runs on cuda)")
    ane_chip: str = opt("m4", "Apple chip family whose MIL dialect the ANE programs use (ane, ane-sim backends)",
                        choices=("m1", "m2", "m3", "m4", "m5"))
    ane_inputs: str = opt("separate", "how ANE programs take their weights: separate inputs (faster per the "
                          "original's issue #22) or one packed input (the original's)", choices=("separate", "packed"))
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
    wandb_mode: str | None = opt(None, "W&B mode: online, offline (no network needed) or disabled (default: W&B's "
                                 "own, e.g. from WANDB_MODE)", choices=("online", "offline", "disabled"))
    tensorboard: bool = opt(
        False, "write TensorBoard event files to RUN_DIR/tensorboard (pip install anetrain[tensorboard])"
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
    "compile",
    "dw_device",
    "ane_chip",
    "ane_inputs",
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


class Trainer:
    def __init__(self, opts: TrainOptions, run_dir: Path, log: Any, model_check: str | None = None) -> None:
        self.opts = opts
        self.model_check = model_check  # a --model given with --resume: must match the checkpoint
        self.run_dir = run_dir
        self.log = log
        self.stop_signal: int | None = None
        self.t_start = time.time()

    # ---- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        o = self.opts
        resumed: Checkpoint | None = None
        if o.resume:
            path = find_checkpoint(self.run_dir)
            if path is None:
                raise InputError(self.run_dir, "no complete checkpoint to resume from")
            resumed = load_checkpoint(path)
            self.log(f"resuming from {path} (step {resumed.step})")
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
        self.cfg = cfg
        if o.seq > cfg.seq_len:
            self.log(
                f"note: --seq {o.seq} is longer than the model's seq_len {cfg.seq_len}; RoPE extrapolates"
            )

        # tokenizer (optional) and data
        self.tokenizer = None
        tok_fp = None
        if o.tokenizer:
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
            pipeline=o.pipeline, backend=o.backend, dtype=o.dtype, compile=o.compile, dw_device=o.dw_device,
            ane_chip=o.ane_chip, ane_inputs=o.ane_inputs,
        )
        self.pipe: Pipeline = make_pipeline(params, choice, self.compaction)
        self.opt_cfg = o.optimizer_config()
        if opt_state is not None and opt_state.m.flat.device != self.pipe.params.flat.device:
            opt_state = AdamState(
                opt_state.m.to(device=self.pipe.params.flat.device),
                opt_state.v.to(device=self.pipe.params.flat.device),
                opt_state.t,
            )
        self.optimizer = AdamW(self.pipe.params, self.opt_cfg, opt_state)
        self.scaler = DynamicLossScaler() if self.pipe.needs_loss_scaling else None

        # sampler
        tokens = self.data.train.tokens
        if o.sampler == "drand48":
            self.sampler: Any = Drand48Sampler(tokens, self.data.n_train, o.seq, o.batch)
        else:
            self.sampler = RandomSampler(tokens, self.data.n_train, o.seq, o.batch, o.seed)
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
        }
        if resumed is not None:
            m = resumed.manifest
            self.step = int(m["step"])
            self.best_val = m.get("best_val_loss")
            self.counters.update(m.get("counters", {}))
            if "sampler" in m:
                if m["sampler"]["name"] != self.sampler.name:
                    raise ConfigError(f"cannot resume: the run used the {m['sampler']['name']} sampler")
                self.sampler.restore(m["sampler"])
            if self.scaler is not None and m.get("loss_scaler"):
                self.scaler.restore(m["loss_scaler"])
        self.resumed = resumed is not None
        self.tokens_per_step = o.batch * o.seq * o.accum
        vocab_eff = self.compaction.size if self.compaction else None
        self.flops_per_step = training_flops_per_sequence(cfg, o.seq, vocab_eff) * o.batch * o.accum
        labels = describe(self.pipe)
        self.labels = labels
        dev = self.pipe.params.flat.device
        peak_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(labels["precision"], torch.float32)
        on_torch = labels["backend"] in ("cpu", "cuda")  # the ANE's peak cannot be probed from here
        self.peak = o.peak_tflops or (peak_tflops(dev, peak_dtype) if on_torch else 0.0)

        # run directory
        self.metrics = MetricsWriter(self.run_dir / "metrics.jsonl", start_time=self.t_start)
        self._attach_trackers()
        self.write_config()
        self.log(f"model: {what}; {cfg.shape_line()}; {cfg.param_count():,} parameters")
        self.log(
            f"pipeline: {labels['pipeline']} on {labels['backend']} in {labels['precision']}; batch "
            f"{o.batch}x{o.seq}, accum {o.accum} ({self.tokens_per_step:,} tokens/step); "
            f"{o.optimizer} lr {o.lr:g}"
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
            world_size=1,
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
            "tokenizer": os.path.abspath(self.opts.tokenizer) if self.opts.tokenizer else None,
            "data": os.path.abspath(self.opts.data) if self.opts.data else None,
            "val_data": os.path.abspath(self.opts.val_data) if self.opts.val_data else None,
            "anetrain_version": __version__,
        }
        atomic_write_text(self.run_dir / "config.json", json.dumps(doc, indent=1))

    # ---- pieces of the loop -----------------------------------------------------------------------
    def evaluate(self) -> float | None:
        if not self.eval_set:
            return None
        t0 = time.perf_counter()
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

    def manifest(self, kind: str) -> dict[str, Any]:
        return {
            "step": self.step,
            "total_steps": self.opts.steps,
            "kind": kind,
            "sampler": self.sampler.state(),
            "loss_scaler": self.scaler.state() if self.scaler else None,
            "best_val_loss": self.best_val,
            "counters": self.counters,
            "train_options": asdict(self.opts),
            "last_loss": getattr(self, "last_loss", None),
            "anetrain_version": __version__,
        }

    def checkpoint(self, kind: str) -> None:
        self.counters["wall_s"] = self.wall_before + (time.time() - self.t_start)
        name = checkpoint_name(self.step) if kind != "best" else "best_" + checkpoint_name(self.step)
        pointers = ("best",) if kind == "best" else ("latest",)
        try:
            path = save_checkpoint(
                self.run_dir,
                name,
                self.pipe.params,
                self.optimizer.state,
                self.manifest(kind),
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
        if self.tokenizer is None:
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
        """Requests from a dashboard (RUN_DIR/control/*) and signals."""
        ctl = self.run_dir / "control"
        if (ctl / "generate").exists():
            (ctl / "generate").unlink(missing_ok=True)
            self.sample()
        if (ctl / "stop").exists():
            (ctl / "stop").unlink(missing_ok=True)
            self.stop_signal = self.stop_signal or signal.SIGINT
        pid_file = self.run_dir / "trainer.pid"
        try:
            pid_file.touch()
        except OSError:
            pass

    def train_step(self) -> dict[str, Any]:
        o, pipe = self.opts, self.pipe
        t0 = time.perf_counter()
        pipe.times.reset()
        pipe.zero_grad()
        scale = self.scaler.scale if self.scaler else 1.0
        losses = []
        for _ in range(o.accum):
            with pipe.times.phase("io"):
                window = self.sampler.next_batch()
            losses.append(pipe.forward_backward(window, scale / o.accum))
        with pipe.times.phase("optimizer"):
            grads = pipe.grads
            norm = global_grad_norm(grads) / scale  # before clipping, without the loss scale
            apply = math.isfinite(norm)
            if self.scaler is not None:
                apply = self.scaler.update(apply)
            elif not apply:
                raise AnetrainError(
                    f"step {self.step + 1}: the gradient is not finite (loss {np.mean(losses):.4g}); "
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
        loss = float(np.mean(losses))
        self.last_loss = loss
        c = self.counters
        c["tokens"] += self.tokens_per_step
        c["train_s"] += ms / 1e3
        c["steps_timed"] += 1
        c["flops"] += self.flops_per_step
        for k, v in phases.items():
            c["phase_ms"][k] = c["phase_ms"].get(k, 0.0) + v
        tflops = self.flops_per_step / (ms / 1e3) / 1e12
        return self.metrics.write(
            "step",
            step=self.step,
            loss=loss,
            lr=lr,
            grad_norm=norm,
            ms=ms,
            tokens_per_s=self.tokens_per_step / (ms / 1e3),
            tflops=tflops,
            utilization=tflops / self.peak if self.peak else None,
            phases=phases,
            tokens=c["tokens"],
            skipped=not apply,
            loss_scale=self.scaler.scale if self.scaler else None,
            rss_mb=psutil.Process().memory_info().rss / 2**20,
        )

    # ---- the run ---------------------------------------------------------------------------------
    def run(self) -> int:
        o = self.opts
        self.wall_before = float(self.counters.get("wall_s", 0.0))
        pid_file = self.run_dir / "trainer.pid"
        atomic_write_text(pid_file, f"{os.getpid()}\n")
        handlers = self._install_signals()
        end = o.steps if o.stop_at is None else min(o.steps, o.stop_at)
        exit_code = 0
        try:
            warm = getattr(self.pipe, "warmup", None)
            if warm is not None and self.step < end:
                t0 = time.perf_counter()
                warm(torch.zeros(o.batch, o.seq + 1, dtype=torch.long))
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
                f"{name}: checkpointing at step {self.step}; resume with: anetrain train --resume {self.run_dir}"
            )
            self.checkpoint("interrupt")
            exit_code = 130 if self.stop_signal == signal.SIGINT else 143
        finally:
            self._restore_signals(handlers)
            pid_file.unlink(missing_ok=True)
        self.report()
        self.pipe.close()
        self.metrics.close()
        return exit_code

    def _progress(self, end: int) -> Any:
        """A callback for each step record: a progress bar on a terminal, plain lines otherwise (and in
        train.log every --log-every steps)."""
        from .ui.progress import ConsoleProgress

        o, log = self.opts, self.log
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
            world_size=1,
            loss_compacted=self.compaction is not None,
        )
        self.metrics.write("report", **rep)
        atomic_write_text(self.run_dir / "report.json", json.dumps(rep, indent=1))
        self.log(format_report(rep))

    def _install_signals(self) -> dict[int, Any]:
        def handler(signum: int, frame: Any) -> None:
            if self.stop_signal is not None:  # second signal: stop now
                raise KeyboardInterrupt
            self.stop_signal = signum
            self.log(f"{signal.Signals(signum).name} received: finishing this step, then checkpointing")

        old = {}
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                old[s] = signal.signal(s, handler)
            except ValueError:  # not the main thread
                pass
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


# ------------------------------------------------------------------------------------------------
# Entry point


def default_run_dir(model: str) -> Path:
    stem = Path(model).stem if not model in PRESETS else model  # noqa: E713
    return Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def load_resume_options(run_dir: Path, given: dict[str, Any]) -> TrainOptions:
    """The run's saved options, with the allowed overrides from the command line; refuses the others."""
    try:
        doc = json.loads((run_dir / "config.json").read_text("utf-8"))
        saved = doc["train"]
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
    for k, v in given.items():
        if k in RESUME_OVERRIDABLE or k == "model":
            continue
        if getattr(opts, k) != v:
            raise ConfigError(
                f"--{k.replace('_', '-')} {v!r} differs from the run's {getattr(opts, k)!r}; a resumed "
                "run keeps its options (start a new run to change it)"
            )
    for k, v in given.items():
        if k in RESUME_OVERRIDABLE:
            setattr(opts, k, v)
    opts.resume = str(run_dir)
    opts.out = str(run_dir)
    return opts


def run_training(opts: TrainOptions, given: dict[str, Any] | None = None, log: Any = None) -> int:
    """Run (or resume) a training run; returns the process exit code."""
    if opts.resume:
        run_dir = Path(opts.resume)
        opts = load_resume_options(run_dir, given or {})
    else:
        run_dir = Path(opts.out) if opts.out else default_run_dir(opts.model)
        if (run_dir / "checkpoints").exists() and find_checkpoint(run_dir) is not None:
            raise ConfigError(
                f"{run_dir} already holds a run; resume it with --resume {run_dir} or choose --out"
            )
    opts.validate()
    run_dir.mkdir(parents=True, exist_ok=True)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if opts.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    both = RunLog(run_dir / "train.log", sink=log)
    if opts.data is None and not opts.resume:
        from .data.embedded import EMBEDDED_DEFAULTS, prepare_embedded

        for key, value in EMBEDDED_DEFAULTS.items():  # settings tuned for the embedded corpus, unless given
            if key not in (given or {}):
                setattr(opts, key, value)

        opts.data, opts.tokenizer = (str(p) for p in prepare_embedded(run_dir / "data", log=both))
    try:
        trainer = Trainer(
            opts, run_dir, both, model_check=(given or {}).get("model") if opts.resume else None
        )
        trainer.setup()
        return trainer.run()
    finally:
        both.close()
