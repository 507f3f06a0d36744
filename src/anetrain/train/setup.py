"""What the trainer starts from: the model (fresh, pretrained or resumed), the tokenizer and data, the
vocabulary compaction, the pipeline, the optimizer and the loss scaler, on every rank of the job."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import MANIFEST, config_difference, load_latest
from ..config import ModelConfig, make_config
from ..data.compaction import VocabCompaction
from ..distributed import World
from ..errors import ConfigError, InputError
from ..optim import AdamState, AdamW, DynamicLossScaler, OptimizerConfig
from ..params import ModelParams
from ..pipeline.base import Pipeline
from ..pipeline_factory import PipelineChoice, make_pipeline
from ..tokenizer.base import Tokenizer
from .options import TrainOptions
from .resolve import DataSplit, config_of_spec, resolve_data, resolve_model


@dataclass
class Start:
    """The weights and optimizer state a run starts from, and the checkpoint manifest when it resumes."""

    params: ModelParams
    optimizer: AdamState | None
    manifest: dict[str, Any] | None
    what: str  # for the log: "stories15M from scratch (llama2c init)", "... resumed at step 300", ...
    source: str | None = None  # the manifest's file, when resuming (named by errors about its content)

    @property
    def cfg(self) -> ModelConfig:
        return self.params.cfg

    def summary(self) -> dict[str, Any]:
        """What the other ranks need to build the same model (JSON; rank 0's tensors follow by broadcast)."""
        return {
            "model": self.cfg.to_dict(),
            "what": self.what,
            "manifest": self.manifest,
            "source": self.source,
            "adam_t": self.optimizer.t if self.optimizer is not None else None,
        }

    @classmethod
    def placeholder(cls, summary: dict[str, Any]) -> Start:
        """A rank other than 0's start: zeros of the right shapes, overwritten by rank 0's broadcast."""
        params = ModelParams.zeros(make_config(**summary["model"]))
        t = summary["adam_t"]
        optimizer = None if t is None else AdamState(params.like(), params.like(), int(t))
        return cls(params, optimizer, summary["manifest"], summary["what"], summary["source"])


def load_start(opts: TrainOptions, run_dir: Path, model_check: str | None, log: Any) -> Start:
    """Rank 0 (or the single process): the fresh, pretrained or resumed model. ``model_check``: a --model
    given with --resume, whose config must be the checkpoint's."""
    if not opts.resume:
        _, params, opt_state, what = resolve_model(opts)
        return Start(params, opt_state, None, what)
    resumed = load_latest(run_dir, warn=log)
    if resumed is None:
        raise InputError(run_dir, "no complete checkpoint to resume from")
    log(f"resuming from {resumed.path} (step {resumed.step})")
    if model_check is not None:
        diff = config_difference(config_of_spec(model_check, opts.residual_scale), resumed.cfg)
        if diff:
            raise ConfigError(f"cannot resume {run_dir}: the model config differs ({diff})")
    what = f"{resumed.cfg.name} resumed at step {resumed.step}"
    return Start(resumed.params, resumed.optimizer, resumed.manifest, what, str(resumed.path / MANIFEST))


def start_on_every_rank(
    world: World, opts: TrainOptions, run_dir: Path, model_check: str | None, log: Any
) -> Start:
    """Rank 0 loads the model; the other ranks get its description (and its tensors later, by broadcast)."""
    loaded: list[Start] = []

    def load() -> dict[str, Any]:
        loaded.append(load_start(opts, run_dir, model_check, log))
        return loaded[0].summary()

    summary = world.from_main(load, "loading the model")
    return loaded[0] if loaded else Start.placeholder(summary)


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


def build_parts(opts: TrainOptions, start: Start, world: World, log: Any) -> Parts:
    cfg = start.cfg
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
    pipe = make_pipeline(start.params, choice, compaction)
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
    return Parts(tokenizer, data, compaction, pipe, optimizer, opt_cfg, scaler)


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
