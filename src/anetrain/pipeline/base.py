"""The interface every training pipeline offers to the trainer, the benchmark and the distributed wrapper.

Every pipeline (baseline, optimized, the Neural Engine's) implements all of it, so callers never probe for a
member: a pipeline with nothing to warm up has a ``warmup`` that does nothing, one without a fusion choice
says ``fusion = None``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from ..params import FlatParams
from ..timing import PhaseTimes

#: called with a bucket of ``grads.buckets()`` whose gradients for this micro-step are complete
GradReadyHook = Callable[[torch.Tensor], None]


class Pipeline(Protocol):
    """One model's training step, wherever and however it runs.

    ``params`` are the float32 master weights of what trains (the optimizer updates them in place, then
    calls :meth:`after_update` so the pipeline can refresh any compute copy): the whole model (a
    :class:`~anetrain.params.ModelParams`), or with LoRA the adapters (a :class:`~anetrain.lora.LoraParams`,
    whose ``base`` is the frozen model); ``grads`` has the same layout and accumulates ``grad_scale`` times
    the gradient of each micro-batch's mean loss.

    The torch pipelines also take ``loss_mask`` ([B, S] bool: the targets the mean loss is over, for
    instruction data) in :meth:`forward_backward` and :meth:`loss`; the trainer passes it only for masked
    data, which the Neural Engine pipelines refuse at setup.
    """

    #: the schedule: "baseline", "optimized", "ane-sim", "ane"
    name: str
    #: where the kernels run: "cpu", "cuda", "ane-sim", "ane"
    backend: str
    #: the compute precision: "fp32", "bf16", "fp16" ("fp64" for the baseline in tests)
    precision: str
    #: how the elementwise work is fused ("hand" or "compile"), None where the pipeline has no such choice
    fusion: str | None
    #: a line for the run's log about a choice made for the user (e.g. a fallback), "" when there is none
    note: str
    params: FlatParams
    grads: FlatParams
    times: PhaseTimes
    #: True when gradients come from 16-bit float arithmetic that can overflow (fp16): the trainer then uses
    #: dynamic loss scaling, passing the scale in ``grad_scale`` and checking the gradients before updating.
    needs_loss_scaling: bool
    #: set by the distributed wrapper; the pipeline calls it (from its dW executor) with each bucket of
    #: ``grads.buckets()`` once that bucket's gradients for this micro-step are complete
    grad_ready_hook: GradReadyHook | None
    #: whether this pipeline calls ``grad_ready_hook`` at all (when not, the all-reduce waits for the whole
    #: backward)
    announces_buckets: bool

    def warmup(self, batch: int, seq: int) -> None:
        """Allocate, compile and stage whatever a [batch, seq] step needs, then forget what that did to the
        gradients and timings (the trainer reports its time as compile time)."""
        ...

    def forward_backward(self, window: torch.Tensor, grad_scale: float = 1.0) -> float:
        """Forward and backward of a [B, S+1] int64 window batch; returns the mean loss (unscaled)."""
        ...

    def loss(self, window: torch.Tensor) -> float:
        """Mean loss of a [B, S+1] window batch without touching gradients (evaluation)."""
        ...

    def zero_grad(self) -> None: ...

    def after_update(self) -> None:
        """The optimizer has changed ``params``: refresh whatever the pipeline derived from them."""
        ...

    def close(self) -> None:
        """Release threads and other resources."""
        ...


def pipeline_labels(pipe: Pipeline) -> dict[str, str]:
    """Labels for the run record, the log and the dashboard header."""
    labels = {"pipeline": pipe.name, "backend": pipe.backend, "precision": pipe.precision}
    if pipe.fusion is not None:
        labels["fusion"] = pipe.fusion
    return labels


def precision_of(dtype: torch.dtype) -> str:
    """The precision label of a tensor dtype."""
    return {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16"}[
        dtype
    ]
