"""Choose and build a pipeline from the user's options: which schedule, on which device, in what precision.

This module sits above both pipeline families, the torch ones (``anetrain.pipeline``) and the Neural Engine's
(``anetrain.ane``), so that neither package imports the other's factory: ``ane`` uses ``pipeline``'s dW
executors, and only this module knows both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data.compaction import VocabCompaction
from .errors import AnetrainError, ConfigError
from .lora import LoraParams
from .params import ModelParams
from .pipeline.base import Pipeline
from .pipeline.baseline import BaselinePipeline

PIPELINES = ("baseline", "optimized")
BACKENDS = ("auto", "cpu", "cuda", "ane-sim", "ane")
DTYPES = ("auto", "fp32", "bf16", "fp16")


@dataclass
class PipelineChoice:
    pipeline: str = "optimized"
    backend: str = "auto"
    dtype: str = "auto"
    dw_device: str | None = None
    fusion: str = "auto"  # optimized pipeline's elementwise work: auto, compile (torch.compile), hand
    loss_chunk: int | None = None
    ane_chip: str = "auto"
    ane_programs: str = "original"  # the original trainer's programs, or anetrain's own forms
    ane_inputs: str = "packed"
    ane_runtime: str | None = None  # private (default on macOS), coreml, or sim
    seq: int | None = None  # the training sequence length (the ANE builds and checks its programs for it)


def resolve_device(backend: str) -> torch.device:
    if backend in ("auto",):
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if backend == "cuda":
        if not torch.cuda.is_available():
            raise AnetrainError("--backend cuda: no CUDA device is available to torch on this machine")
        return torch.device("cuda")
    return torch.device("cpu")


def check_dw_device(spec: str | None) -> None:
    """Refuse a --dw-device that is not a device torch has here (one line, before anything is built)."""
    if spec is None:
        return
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise AnetrainError(f"--dw-device {spec!r} is not a device name (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cpu":
        return
    if device.type != "cuda":
        raise AnetrainError(f"--dw-device {spec}: only cpu and cuda devices can run the weight gradients")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise AnetrainError(f"--dw-device {spec}: no CUDA device is available to torch on this machine")
    if device.index is not None and device.index >= count:
        raise AnetrainError(f"--dw-device {spec}: the CUDA devices here are cuda:0..{count - 1}")


def cpu_has_bf16() -> bool:
    """True when this CPU multiplies bf16 natively (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:
        return False


def resolve_dtype(choice: PipelineChoice, device: torch.device) -> str:
    """The compute precision: baseline is always fp32; optimized uses bf16 where the hardware has it."""
    if choice.pipeline == "baseline":
        if choice.dtype not in ("auto", "fp32"):
            raise AnetrainError(f"--pipeline baseline runs in fp32 only (got --dtype {choice.dtype})")
        return "fp32"
    if choice.dtype != "auto":
        return choice.dtype
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_bf16() else "fp16"


def refuse_on_ane(params: ModelParams, lora: LoraParams | None, backend: str) -> None:
    """The Neural Engine programs implement neither QK-norm nor LoRA adapters: such a model is refused
    there with one line, before anything is built (docs/ane.md)."""
    what = []
    if params.cfg.qk_norm:
        what.append("QK-norm (Qwen3's q_norm/k_norm)")
    if lora is not None:
        what.append("LoRA adapters")
    if what:
        raise ConfigError(
            f"--backend {backend}: the Neural Engine programs do not implement {' or '.join(what)}; "
            "train this model with --backend cpu or cuda"
        )


def make_pipeline(
    params: ModelParams,
    choice: PipelineChoice,
    compaction: VocabCompaction | None = None,
    lora: LoraParams | None = None,
) -> Pipeline:
    """Build the pipeline; ``params`` are float32 master weights (moved to the chosen device). With ``lora``
    (the adapters, float32), ``params`` is the frozen base (any float dtype) and only the adapters train."""
    if choice.backend in ("ane-sim", "ane"):
        refuse_on_ane(params, lora, choice.backend)
    check_dw_device(choice.dw_device)
    if choice.backend == "ane-sim":
        from .ane.pipeline import AneSimPipeline

        return AneSimPipeline(
            params,
            chip=choice.ane_chip,
            programs=choice.ane_programs,
            inputs=choice.ane_inputs,
            compaction=compaction,
            loss_chunk=choice.loss_chunk,
            seq=choice.seq,
        )
    if choice.backend == "ane":
        from .ane.runtime import make_runtime_pipeline

        return make_runtime_pipeline(
            params,
            chip=choice.ane_chip,
            programs=choice.ane_programs,
            inputs=choice.ane_inputs,
            compaction=compaction,
            loss_chunk=choice.loss_chunk,
            runtime=choice.ane_runtime,
            seq=choice.seq,
        )
    device = resolve_device(choice.backend)
    if params.flat.device != device:
        params = params.to(device=device)
    if lora is not None and lora.flat.device != device:
        lora = lora.to(device=device)
    dtype = resolve_dtype(choice, device)
    if choice.pipeline == "baseline":
        if lora is not None and params.flat.dtype != lora.flat.dtype:
            params = params.to(dtype=lora.flat.dtype)  # the baseline computes in the adapters' float32
        return BaselinePipeline(params, lora=lora, compaction=compaction, loss_chunk=choice.loss_chunk)
    if choice.pipeline == "optimized":
        from .pipeline.optimized import OptimizedPipeline

        return OptimizedPipeline(
            params,
            lora=lora,
            dtype=dtype,
            dw_device=choice.dw_device,
            compaction=compaction,
            loss_chunk=choice.loss_chunk,
            fusion=choice.fusion,
        )
    raise AnetrainError(f"unknown pipeline {choice.pipeline!r} (known: {', '.join(PIPELINES)})")
