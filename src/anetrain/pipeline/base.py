"""The interface every training pipeline offers to the trainer, the benchmark and the distributed wrapper."""

from __future__ import annotations

from typing import Protocol

import torch

from ..params import ModelParams
from ..timing import PhaseTimes


class Pipeline(Protocol):
    """One model's training step, wherever and however it runs.

    ``params`` are the float32 master weights (the optimizer updates them in place, then calls
    :meth:`after_update` so the pipeline can refresh any compute copy); ``grads`` has the same layout and
    accumulates ``grad_scale`` times the gradient of each micro-batch's mean loss.
    """

    name: str
    params: ModelParams
    grads: ModelParams
    times: PhaseTimes
    #: True when gradients come from 16-bit float arithmetic that can overflow (fp16): the trainer then uses
    #: dynamic loss scaling, passing the scale in ``grad_scale`` and checking the gradients before updating.
    needs_loss_scaling: bool

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
