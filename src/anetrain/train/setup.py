"""What the trainer starts from: the model (fresh, pretrained or resumed; with LoRA, the frozen base and the
adapters), the tokenizer and data, the vocabulary compaction, the pipeline, the optimizer and the loss
scaler, on every rank of the job."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import MANIFEST, base_reference, config_difference, load_base, load_latest
from ..config import ModelConfig, make_config
from ..data.compaction import VocabCompaction
from ..distributed import World
from ..errors import ConfigError, InputError
from ..lora import LoraConfig, LoraParams, init_lora
from ..optim import AdamState, AdamW, DynamicLossScaler, OptimizerConfig
from ..params import ModelParams
from ..pipeline.base import Pipeline
from ..pipeline_factory import PipelineChoice, make_pipeline, resolve_device, resolve_dtype
from ..tokenizer.base import Tokenizer
from .options import TrainOptions
from .resolve import DataSplit, config_of_spec, is_config_spec, resolve_data, resolve_model


@dataclass
class Start:
    """The weights and optimizer state a run starts from, and the checkpoint manifest when it resumes.

    With LoRA, ``params`` is the frozen base, ``lora`` the adapters (which the optimizer state is for) and
    ``base_ref`` what the checkpoints record about the base. ``source``: the Hugging Face model the run
    started from (an hf export keeps its token ids and tokenizer files)."""

    params: ModelParams
    optimizer: AdamState | None
    manifest: dict[str, Any] | None
    what: str  # for the log: "stories15M from scratch (llama2c init)", "... resumed at step 300", ...
    lora: LoraParams | None = None
    base_ref: dict[str, Any] | None = None
    source: dict[str, Any] | None = None
    manifest_file: str | None = None  # the manifest's file, when resuming (named by errors about its content)

    @property
    def cfg(self) -> ModelConfig:
        return self.params.cfg

    def summary(self) -> dict[str, Any]:
        """What the other ranks need to build the same model (JSON; rank 0's tensors follow by broadcast)."""
        return {
            "model": self.cfg.to_dict(),
            "what": self.what,
            "manifest": self.manifest,
            "manifest_file": self.manifest_file,
            "adam_t": self.optimizer.t if self.optimizer is not None else None,
            "lora": self.lora.lora.to_dict() if self.lora is not None else None,
            "base_ref": self.base_ref,
            "source": self.source,
        }

    @classmethod
    def placeholder(cls, summary: dict[str, Any], base_dtype: torch.dtype = torch.float32) -> Start:
        """A rank other than 0's start: zeros of the right shapes, overwritten by rank 0's broadcast. With
        LoRA this rank reads the frozen base itself (it is not broadcast), checked by its fingerprint."""
        cfg = make_config(**summary["model"])
        t = summary["adam_t"]
        if summary.get("lora"):
            base = load_base({"base": summary["base_ref"], "model": summary["model"]}, "the run", base_dtype)
            lora = LoraParams.zeros(cfg, LoraConfig.from_dict(summary["lora"]))
            optimizer = None if t is None else AdamState(lora.like(), lora.like(), int(t))
            return cls(base, optimizer, summary["manifest"], summary["what"], lora, summary["base_ref"])
        params = ModelParams.zeros(cfg)
        optimizer = None if t is None else AdamState(params.like(), params.like(), int(t))
        return cls(
            params,
            optimizer,
            summary["manifest"],
            summary["what"],
            source=summary.get("source"),
            manifest_file=summary.get("manifest_file"),
        )


def base_dtype(opts: TrainOptions) -> torch.dtype:
    """The dtype a LoRA run reads its frozen base into: bfloat16 when the pipeline computes in bf16 (the
    base is never needed wider), else float32."""
    if not opts.lora_rank or opts.pipeline != "optimized" or opts.backend in ("ane", "ane-sim"):
        return torch.float32
    choice = PipelineChoice(pipeline=opts.pipeline, backend=opts.backend, dtype=opts.dtype)
    dtype = resolve_dtype(choice, resolve_device(opts.backend))
    return torch.bfloat16 if dtype == "bf16" else torch.float32


def load_start(opts: TrainOptions, run_dir: Path, model_check: str | None, log: Any) -> Start:
    """Rank 0 (or the single process): the fresh, pretrained or resumed model. ``model_check``: a --model
    given with --resume, whose config must be the checkpoint's."""
    lc = opts.lora_config()
    if not opts.resume:
        if lc is not None and is_config_spec(opts.model):
            raise ConfigError(
                f"--lora-rank adapts a pretrained model, and --model {opts.model} is a new one: give a "
                "weights file, a Hugging Face directory or a Hub id (or leave out --lora-rank to train all "
                "weights)"
            )
        r = resolve_model(opts, base_dtype(opts))
        if lc is None:
            return Start(r.params, r.optimizer, None, r.what, source=r.source)
        if r.optimizer is not None:
            log("note: the file's optimizer state is for its weights, not for LoRA adapters; not used")
        ref = base_reference(opts.model, r.path, r.params)
        adapters = init_lora(r.cfg, lc, opts.seed)
        return Start(r.params, None, None, r.what, adapters, ref, r.source)
    resumed = load_latest(run_dir, warn=log)
    if resumed is None:
        raise InputError(run_dir, "no complete checkpoint to resume from")
    log(f"resuming from {resumed.path} (step {resumed.step})")
    if model_check is not None:
        diff = config_difference(config_of_spec(model_check, opts.residual_scale), resumed.cfg)
        if diff:
            raise ConfigError(f"cannot resume {run_dir}: the model config differs ({diff})")
    what = f"{resumed.cfg.name} resumed at step {resumed.step}"
    source = resumed.manifest.get("hf_source")
    manifest_file = str(resumed.path / MANIFEST)
    if resumed.lora is not None:
        assert isinstance(resumed.params, LoraParams)
        base = load_base(resumed.manifest, resumed.path, base_dtype(opts))
        ref = resumed.manifest["base"]
        return Start(
            base, resumed.optimizer, resumed.manifest, what, resumed.params, ref, source, manifest_file
        )
    assert isinstance(resumed.params, ModelParams)
    return Start(
        resumed.params, resumed.optimizer, resumed.manifest, what, source=source, manifest_file=manifest_file
    )


def start_on_every_rank(
    world: World, opts: TrainOptions, run_dir: Path, model_check: str | None, log: Any
) -> Start:
    """Rank 0 loads the model; the other ranks get its description (and its tensors later, by broadcast)."""
    loaded: list[Start] = []

    def load() -> dict[str, Any]:
        loaded.append(load_start(opts, run_dir, model_check, log))
        return loaded[0].summary()

    summary = world.from_main(load, "loading the model")
    return loaded[0] if loaded else Start.placeholder(summary, base_dtype(opts))


@dataclass
class Parts:
    """The data, the pipeline and the optimizer, built on every rank."""

    tokenizer: Tokenizer | None  # rank 0 only: it samples text and checks the token file's sidecar
    data: DataSplit
    compaction: VocabCompaction | None
    pipe: Pipeline
    optimizer: AdamW
    opt_cfg: OptimizerConfig
    scaler: DynamicLossScaler | None  # fp16 pipelines only
    lora: LoraConfig | None  # LoRA's settings (None: full fine-tuning)


def build_parts(opts: TrainOptions, start: Start, world: World, log: Any) -> Parts:
    cfg = start.cfg
    if opts.seq > cfg.seq_len:
        log(f"note: --seq {opts.seq} is longer than the model's seq_len {cfg.seq_len}; RoPE extrapolates")
    tokenizer = None
    if opts.tokenizer and world.is_main:
        from ..tokenizer import load_tokenizer

        tokenizer = load_tokenizer(opts.tokenizer, vocab_size=cfg.vocab_size)
    data = resolve_data(opts, cfg, tokenizer.fingerprint() if tokenizer is not None else None)
    compaction = make_compaction(data, cfg, log) if opts.compact_vocab else None
    choice = PipelineChoice(
        pipeline=opts.pipeline,
        backend=opts.backend,
        dtype=opts.dtype,
        dw_device=opts.dw_device,
        fusion=opts.fusion,
        ane_chip=opts.ane_chip,
        ane_programs=opts.ane_programs,
        ane_inputs=opts.ane_inputs,
        ane_runtime=opts.ane_runtime,
        seq=opts.seq,
    )
    if data.masked and opts.backend in ("ane", "ane-sim"):
        raise ConfigError(
            f"{data.train.path} has a loss mask (instruction data), which the Neural Engine pipelines do not "
            "support; use --backend cpu or cuda"
        )
    pipe = make_pipeline(start.params, choice, compaction, lora=start.lora)
    device = pipe.params.flat.device
    if world.backend == "nccl" and device.type != "cuda":
        raise ConfigError(
            f"the pipeline runs on {device.type} but the ranks talk over NCCL; "
            "use --dist-backend gloo or --backend cuda"
        )
    opt_state = start.optimizer
    if opt_state is not None and opt_state.m.flat.device != device:
        opt_state = AdamState(opt_state.m.to(device=device), opt_state.v.to(device=device), opt_state.t)
    opt_cfg = opts.optimizer_config()
    optimizer = AdamW(pipe.params, opt_cfg, opt_state)
    scaler = DynamicLossScaler(init_scale=opts.loss_scale) if pipe.needs_loss_scaling else None
    lora = start.lora.lora if start.lora is not None else None
    return Parts(tokenizer, data, compaction, pipe, optimizer, opt_cfg, scaler, lora)


def make_compaction(data: DataSplit, cfg: ModelConfig, log: Any) -> VocabCompaction:
    """--compact-vocab: the tokens of the training data; the validation data must not need others."""
    compaction = VocabCompaction.from_tokens(np.asarray(data.train.tokens), cfg.vocab_size)
    log(
        f"vocabulary compaction: {cfg.vocab_size} -> {compaction.size} active tokens "
        "(the loss is over the active tokens only)"
    )
    if data.val is not None and data.val_range is not None:
        lo, hi = data.val_range
        missing = np.setdiff1d(np.unique(np.asarray(data.val.tokens[lo:hi])), compaction.ids.numpy())
        if missing.size:
            raise InputError(
                data.val.path,
                f"{missing.size} validation token ids never occur in the training data, so --compact-vocab "
                "cannot score them",
            )
    return compaction
