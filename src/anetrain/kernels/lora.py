"""LoRA: a low-rank adapter beside a frozen projection, forward, dx and dW.

A projection y = x W^T (W: [out, in], frozen) with an adapter A: [r, in], B: [out, r] and scale
s = alpha / r becomes::

    u = s * x A^T                  [N, r]      (kept for the backward, scale included)
    y = x W^T + u B^T              [N, out]

Backward, with dy the gradient of y::

    dx: du = s * dy B              [N, r]
        dx = dy W + du A           [N, in]     (dy W is the frozen projection's own dx kernel)
    dW: gB = dy^T u                [out, r]
        gA = du^T x                [r, in]     (W itself gets no gradient: its dW product is never formed)

B starts at zero (so the adapted model starts as the base model) and A uniform in +-1/sqrt(in), as
``peft`` initializes them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .weight_grad import weight_grad


@dataclass
class Adapter:
    """One projection's adapter: views of its two matrices and the scale alpha / r."""

    a: torch.Tensor  # [r, in]   lora_A
    b: torch.Tensor  # [out, r]  lora_B
    scale: float


def lora_forward(x: torch.Tensor, ad: Adapter) -> tuple[torch.Tensor, torch.Tensor]:
    """delta, u: the adapter's addition to y and its tap.  x: [..., in] -> delta: [..., out], u: [..., r]."""
    u = (x @ ad.a.t()) * ad.scale  # [..., r]
    return u @ ad.b.t(), u  # [..., out]


def lora_backward_dx(dy: torch.Tensor, ad: Adapter) -> tuple[torch.Tensor, torch.Tensor]:
    """dx, du: the adapter's part of the input gradient.  dy: [..., out] -> dx: [..., in], du: [..., r]."""
    du = (dy @ ad.b) * ad.scale  # [..., r]
    return du @ ad.a, du  # [..., in]


def lora_weight_grad(
    ga: torch.Tensor, gb: torch.Tensor, dy: torch.Tensor, du: torch.Tensor, u: torch.Tensor, x: torch.Tensor
) -> None:
    """gb += dy^T u; ga += du^T x.  ga: [r, in]; gb: [out, r]; dy: [.., out]; du, u: [.., r]; x: [.., in]."""
    weight_grad(gb, dy, u)
    weight_grad(ga, du, x)
