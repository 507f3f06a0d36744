"""`anetrain train`'s options: one dataclass whose fields (with their help and choices) generate the CLI, and
the rules for what may change on --resume."""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field, fields
from typing import Any

from ..config import PRESETS
from ..data.sampler import SAMPLERS
from ..distributed import BACKENDS
from ..errors import ConfigError
from ..lora import LoraConfig, parse_targets
from ..optim import OptimizerConfig
from ..params import INIT_SCHEMES

# ------------------------------------------------------------------------------------------------
# Options


def opt(default: Any, help: str, **kw: Any) -> Any:
    """A training option: its default and its help text (the CLI is generated from these)."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainOptions:
    model: str = opt(
        "stories260K",
        "PRESET name, model CONFIG (.toml/.json), or WEIGHTS to fine-tune or continue from (llama2.c .bin, "
        "BLZT checkpoint, Hugging Face Llama/Qwen3 directory or Hub id such as Qwen/Qwen3-0.6B); presets: "
        f"{', '.join(PRESETS)}",
    )
    data: str | None = opt(
        None,
        "training token file (flat uint16, from `anetrain prepare`); omitted: the embedded TinyStories "
        "excerpt is tokenized and used",
    )
    val_data: str | None = opt(None, "validation token file (default: a held-out tail of --data)")
    val_fraction: float = opt(
        0.1,
        "fraction of --data held out at its end for validation when --val-data is not "
        "given (training never samples it); 0 disables evaluation",
    )
    tokenizer: str | None = opt(
        None,
        "tokenizer (.bin, .model, or a tokenizer.json / model directory / Hub id) for generated samples and "
        "for checking the token file's sidecar",
    )
    lora_rank: int = opt(
        0,
        "LoRA: train rank-R adapters beside the frozen --model (kept in 16 bits, no gradients, no optimizer "
        "state) instead of all its weights; 0: full fine-tuning",
    )
    lora_alpha: float | None = opt(None, "LoRA scale numerator: adapters add (alpha/R) B A x (default 2R)")
    lora_targets: str = opt(
        "all",
        "LoRA: the projections to adapt, comma-separated from wq,wk,wv,wo,w1,w2,w3 (or q_proj, ..., "
        "gate_proj, up_proj, down_proj), or all",
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
    loss_scale: float = opt(
        32768.0,
        "initial loss scale of fp16 training (dynamic: halved, and the update skipped, when the gradients "
        "overflow; doubled after 1000 clean steps)",
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
        "Apple chip family whose MIL dialect the ANE programs use: auto (this Mac's chip; m4, the M3-M5 "
        "dialect, for ane-sim on any other machine), m1, m2, m3, m4, m5",
        choices=("auto", "m1", "m2", "m3", "m4", "m5"),
    )
    ane_runtime: str | None = opt(
        None,
        "how --backend ane reaches the Neural Engine: private (the in-memory compiler, the original's way; "
        "default), coreml (Core ML with CPU_AND_NE, the sanctioned route) or sim (the simulator, tests)",
        choices=("private", "coreml", "sim"),
    )
    ane_programs: str = opt(
        "original",
        "which ANE programs: original (the original trainer's ten programs, byte for byte its text, "
        "one packed input each; the GQA head mapping corrected) or anetrain (this project's own forms; "
        "never run on hardware)",
        choices=("original", "anetrain"),
    )
    ane_inputs: str = opt(
        "packed",
        "how ANE programs take their operands: packed (one input surface, as the original) or separate "
        "(one surface per operand; --ane-programs anetrain only; never run on hardware)",
        choices=("packed", "separate"),
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

    def type_problem(self) -> str | None:
        """The first option whose value has the wrong type (options read back from a run's config.json),
        or None."""
        hints = typing.get_type_hints(TrainOptions)
        for f in fields(self):
            value = getattr(self, f.name)
            allowed = tuple(a for a in typing.get_args(hints[f.name]) or (hints[f.name],) if a is not Any)
            if value is None and type(None) in allowed:
                continue
            if isinstance(value, bool) and bool not in allowed:
                return f"{f.name} is {value!r}"
            if isinstance(value, int) and float in allowed:
                continue
            if not isinstance(value, tuple(a for a in allowed if a is not type(None))):
                return f"{f.name} is {value!r}"
        return None

    def validate(self) -> None:
        """Refuse (ConfigError, one line naming the option) any option value training cannot use."""
        for name in ("batch", "seq", "accum", "steps", "sample_tokens"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("eval_every", "eval_batches", "log_every", "ckpt_every", "sample_every", "warmup"):
            if getattr(self, name) < 0:
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be 0 or positive, got {getattr(self, name)}"
                )
        if self.keep_checkpoints < 1:
            raise ConfigError(f"--keep-checkpoints must be at least 1, got {self.keep_checkpoints}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise ConfigError(f"--lr must be a positive number, got {self.lr}")
        if self.min_lr is not None and not (0 <= self.min_lr <= self.lr):
            raise ConfigError(f"--min-lr must be between 0 and --lr ({self.lr:g}), got {self.min_lr}")
        if not (0 <= self.wd < math.inf):
            raise ConfigError(f"--wd must be a number >= 0, got {self.wd}")
        if not 0 <= self.beta1 < 1:
            raise ConfigError(f"--beta1 must be in [0, 1), got {self.beta1}")
        if self.beta2 is not None and not 0 <= self.beta2 < 1:
            raise ConfigError(f"--beta2 must be in [0, 1), got {self.beta2}")
        if not (0 < self.eps < math.inf):
            raise ConfigError(f"--eps must be a positive number, got {self.eps}")
        if self.clip is not None and not (0 <= self.clip < math.inf):
            raise ConfigError(f"--clip must be a number >= 0 (0 disables clipping), got {self.clip}")
        if self.threads is not None and self.threads <= 0:
            raise ConfigError(f"--threads must be positive, got {self.threads}")
        if self.peak_tflops is not None and not (0 < self.peak_tflops < math.inf):
            raise ConfigError(f"--peak-tflops must be a positive number, got {self.peak_tflops}")
        if self.stop_at is not None and self.stop_at <= 0:
            raise ConfigError(f"--stop-at must be positive, got {self.stop_at}")
        if not (0 < self.dist_timeout < math.inf):
            raise ConfigError(f"--dist-timeout must be positive, got {self.dist_timeout}")
        if self.nproc_per_node is not None and self.nproc_per_node <= 0:
            raise ConfigError(f"--nproc-per-node must be positive, got {self.nproc_per_node}")
        if not (self.loss_scale >= 1 and math.isfinite(self.loss_scale)):
            raise ConfigError(f"--loss-scale must be a number >= 1, got {self.loss_scale}")
        if self.dist_check_every < 0:
            raise ConfigError(f"--dist-check-every must be 0 or positive, got {self.dist_check_every}")
        if self.lora_rank < 0:
            raise ConfigError(f"--lora-rank must be 0 (full fine-tuning) or positive, got {self.lora_rank}")
        if self.lora_rank == 0 and (self.lora_alpha is not None or self.lora_targets != "all"):
            raise ConfigError("--lora-alpha and --lora-targets need --lora-rank R > 0")
        if self.lora_rank:
            self.lora_config()  # validates alpha and the targets

    def lora_config(self) -> LoraConfig | None:
        """The LoRA settings (None: full fine-tuning)."""
        if not self.lora_rank:
            return None
        alpha = self.lora_alpha if self.lora_alpha is not None else 2.0 * self.lora_rank
        return LoraConfig(self.lora_rank, alpha, parse_targets(self.lora_targets))


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
    "ane_programs",
    "ane_inputs",
    "ddp",
    "nproc_per_node",
    "dist_timeout",
    "dist_backend",
    "dist_check_every",
}
