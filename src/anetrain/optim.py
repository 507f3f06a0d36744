"""Optimizers over the flat parameter set: AdamW and Adam, the LR schedule, clipping, loss scaling.

AdamW, per element (bias corrections bc1 = 1 - beta1^t, bc2 = 1 - beta2^t)::

    m = beta1 m + (1 - beta1) g
    v = beta2 v + (1 - beta2) g^2
    w = w - lr * ( (m / bc1) / (sqrt(v / bc2) + eps) + wd * w )          (decoupled decay, pre-update w)

Weight decay applies to the matrices and the embedding and never to the RMSNorm gains: the parameter set
keeps those in two contiguous slices, so the update is two calls of torch's fused multi-tensor kernel over
two flat tensors. ``adam`` is the original static pipeline's variant: beta2 0.999, no decay, constant LR.

Schedule (the original dynamic pipeline's): linear warmup ``lr * (step+1) / warmup`` for the first
``warmup`` steps, then cosine decay from ``lr`` to ``min_lr`` at the last step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.optim.adam import adam as torch_adam

from .params import ModelParams


@dataclass
class AdamState:
    """Adam/AdamW moments in the parameters' layout, and the update counter t (for bias correction)."""

    m: ModelParams
    v: ModelParams
    t: int = 0

    @classmethod
    def zeros_like(cls, params: ModelParams) -> AdamState:
        return cls(params.like(), params.like(), 0)


@dataclass
class OptimizerConfig:
    kind: str = "adamw"  # "adamw" | "adam"
    lr: float = 3e-4
    min_lr: float | None = None  # default lr / 10
    warmup: int = 100
    total_steps: int = 1000
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip: float = 1.0  # global-norm clipping threshold; 0 disables

    @classmethod
    def for_kind(cls, kind: str, **over: float | int | None) -> OptimizerConfig:
        """Defaults per kind: adamw as the dynamic pipeline, adam as the static one."""
        if kind == "adam":
            base = cls(kind="adam", beta2=0.999, weight_decay=0.0, warmup=0, clip=0.0)
        elif kind == "adamw":
            base = cls(kind="adamw")
        else:
            raise ValueError(f"unknown optimizer {kind!r}")
        for k, v in over.items():
            if v is not None:
                setattr(base, k, v)
        return base


def lr_at(step: int, cfg: OptimizerConfig) -> float:
    """Learning rate for 0-based optimizer step ``step``."""
    if cfg.kind == "adam":
        return cfg.lr
    min_lr = cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.total_steps - 1 - cfg.warmup)
    r = min(1.0, (step - cfg.warmup) / span)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * r)) * (cfg.lr - min_lr)


def global_grad_norm(grads: ModelParams) -> float:
    """L2 norm over every gradient element: one dot product of the flat buffer with itself (BLAS; on the
    2-core development machine 9.3 ms for stories110M's 110M gradients against 12.9 ms for
    ``torch.linalg.vector_norm``). Inf or NaN anywhere gives an inf or NaN norm (the loss scaler's test)."""
    flat = grads.flat
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    return math.sqrt(float(torch.dot(flat, flat)))


def clip_grads(grads: ModelParams, max_norm: float, norm: float) -> None:
    """Scale every gradient by max_norm / norm when the global norm exceeds max_norm."""
    if max_norm > 0 and norm > max_norm:
        grads.flat.mul_(max_norm / (norm + 1e-6))


class AdamW:
    """AdamW (or Adam) on a flat parameter set, with torch's fused kernel where it is available."""

    def __init__(self, params: ModelParams, cfg: OptimizerConfig, state: AdamState | None = None) -> None:
        self.params = params
        self.cfg = cfg
        self.state = state or AdamState.zeros_like(params)

    def step(self, grads: ModelParams, lr: float, grad_divisor: float = 1.0) -> None:
        """One update of ``params`` in place from ``grads / grad_divisor``.

        The divisor carries loss-scale removal and global-norm clipping into the fused kernel, which
        divides as it reads, so neither needs a pass of its own over the gradients (the kernel leaves the
        divided values in ``grads``).
        """
        p, s, c = self.params, self.state, self.cfg
        groups = [
            (p.decay, grads.decay, s.m.decay, s.v.decay, c.weight_decay),
            (p.no_decay, grads.no_decay, s.m.no_decay, s.v.no_decay, 0.0),
        ]
        fused = p.flat.device.type in ("cpu", "cuda") and p.flat.dtype in (torch.float32, torch.float64)
        scale = None
        if grad_divisor != 1.0:
            if fused:
                scale = torch.tensor(grad_divisor, dtype=torch.float32, device=p.flat.device)
            else:
                grads.flat.div_(grad_divisor)
        for w, g, m, v, wd in groups:
            if w.numel() == 0:
                continue
            step = torch.tensor(float(s.t), dtype=torch.float32)
            torch_adam(
                [w],
                [g],
                [m],
                [v],
                [],
                [step],
                fused=fused,
                foreach=None if fused else False,
                grad_scale=scale,
                decoupled_weight_decay=True,
                amsgrad=False,
                maximize=False,
                beta1=c.beta1,
                beta2=c.beta2,
                lr=lr,
                weight_decay=wd,
                eps=c.eps,
            )
        s.t += 1


def clip_divisor(norm: float, max_norm: float) -> float:
    """The factor to divide gradients by so their global norm is at most ``max_norm`` (1 when it is)."""
    return norm / max_norm if max_norm > 0 and norm > max_norm else 1.0


class DynamicLossScaler:
    """fp16 loss scaling: grow after ``growth_interval`` clean steps, back off and skip on overflow."""

    def __init__(
        self,
        init_scale: float = 2.0**15,
        growth_interval: int = 1000,
        factor: float = 2.0,
        min_scale: float = 1.0,
        max_scale: float = 2.0**24,
    ) -> None:
        self.scale = init_scale
        self.growth_interval = growth_interval
        self.factor = factor
        self.min_scale = min_scale
        self.max_scale = max_scale
        self.clean_steps = 0
        self.skipped = 0

    def update(self, grads_finite: bool) -> bool:
        """Record a step's outcome; returns True when the update should be applied."""
        if not grads_finite:
            self.scale = max(self.min_scale, self.scale / self.factor)
            self.clean_steps = 0
            self.skipped += 1
            return False
        self.clean_steps += 1
        if self.clean_steps >= self.growth_interval:
            self.scale = min(self.max_scale, self.scale * self.factor)
            self.clean_steps = 0
        return True

    def state(self) -> dict[str, float | int]:
        return {"scale": self.scale, "clean_steps": self.clean_steps, "skipped": self.skipped}

    def restore(self, st: dict[str, float | int]) -> None:
        self.scale = float(st["scale"])
        self.clean_steps = int(st["clean_steps"])
        self.skipped = int(st["skipped"])
