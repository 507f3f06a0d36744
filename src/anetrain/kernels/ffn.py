"""The feed-forward half of a layer: SwiGLU with its residual, and its dx kernel.

Forward (x2: [B, S, D], the residual stream after attention)::

    xn2, rstd = RMSNorm(x2; g_ffn)
    h1 = xn2 W1^T,  h3 = xn2 W3^T           [B, S, F]     (W1 is the gate, W3 "up")
    g  = silu(h1) * h3,  silu(z) = z * sigmoid(z)
    x' = x2 + alpha * g W2^T                [B, S, D]

Backward (dy = dL/dx')::

    df  = alpha * dy                        [B, S, D]     (dW of W2: df^T g)
    dg  = df W2                             [B, S, F]
    dh3 = dg * silu(h1)
    dh1 = dg * h3 * sigmoid(h1) * (1 + h1 * (1 - sigmoid(h1)))
    dxn2 = dh1 W1 + dh3 W3                  [B, S, D]     (dW of W1, W3: dh1^T xn2, dh3^T xn2)

With LoRA adapters (``kernels/lora.py``) on w1, w3 or w2, each projection adds u B^T in the forward and
du A in the backward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .lora import Adapter, lora_backward_dx, lora_forward
from .norm import rmsnorm_forward, stat_dtype


@dataclass
class FFNTaps:
    """What the FFN backward needs from the forward."""

    x2: torch.Tensor  # [B, S, D]  input (RMSNorm backward)
    rstd: torch.Tensor  # [B, S, 1]
    xn2: torch.Tensor  # [B, S, D] normalized input (dW of w1, w3)
    h1: torch.Tensor  # [B, S, F]  gate pre-activation
    h3: torch.Tensor  # [B, S, F]  up projection
    g: torch.Tensor  # [B, S, F]   silu(h1) * h3 (dW of w2)
    lora_u: dict[str, torch.Tensor] = field(default_factory=dict)  # LoRA: "w1", "w3", "w2" -> [B, S, r]


@dataclass
class FFNGrads:
    """The gradients of the projections' outputs, for the dW GEMMs."""

    df: torch.Tensor  # [B, S, D]
    dh1: torch.Tensor  # [B, S, F]
    dh3: torch.Tensor  # [B, S, F]
    lora_du: dict[str, torch.Tensor] = field(default_factory=dict)  # LoRA: "w1", "w3", "w2" -> [B, S, r]


def swiglu_forward(h1: torch.Tensor, h3: torch.Tensor) -> torch.Tensor:
    """g = silu(h1) * h3, computed in at least float32.  h1, h3: [B, S, F] -> [B, S, F]."""
    acc = stat_dtype(h1.dtype)
    a, b = h1.to(acc), h3.to(acc)
    return (a * torch.sigmoid(a) * b).to(h1.dtype)


def swiglu_backward(
    dg: torch.Tensor, h1: torch.Tensor, h3: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """dh1, dh3 for g = silu(h1) * h3.  All [B, S, F]."""
    acc = stat_dtype(dg.dtype)
    d, a, b = dg.to(acc), h1.to(acc), h3.to(acc)
    sig = torch.sigmoid(a)
    dh3 = d * a * sig  # d/dh3 of silu(h1)*h3 is silu(h1)
    dh1 = d * b * sig * (1 + a * (1 - sig))  # silu'(z) = sig(z) * (1 + z * (1 - sig(z)))
    return dh1.to(dg.dtype), dh3.to(dg.dtype)


def ffn_forward(
    x2: torch.Tensor,
    g_ffn: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor,
    alpha: float,
    eps: float,
    lora: dict[str, Adapter] | None = None,
) -> tuple[torch.Tensor, FFNTaps]:
    """x_out, taps.  x2: [B, S, D]; w1, w3: [F, D]; w2: [D, F] -> x_out: [B, S, D].

    ``lora``: adapters of "w1", "w3", "w2" (any of them)."""
    us: dict[str, torch.Tensor] = {}

    def project(x: torch.Tensor, w: torch.Tensor, name: str) -> torch.Tensor:
        y = x @ w.t()
        if lora and name in lora:
            delta, us[name] = lora_forward(x, lora[name])
            y = y + delta
        return y

    xn2, rstd = rmsnorm_forward(x2, g_ffn, eps)  # [B, S, D]
    h1 = project(xn2, w1, "w1")  # [B, S, F]
    h3 = project(xn2, w3, "w3")  # [B, S, F]
    g = swiglu_forward(h1, h3)  # [B, S, F]
    f = project(g, w2, "w2")  # [B, S, D]
    x_out = x2 + f if alpha == 1.0 else x2 + alpha * f
    return x_out, FFNTaps(x2=x2, rstd=rstd, xn2=xn2, h1=h1, h3=h3, g=g, lora_u=us)


def ffn_backward_dx(
    dy: torch.Tensor,
    taps: FFNTaps,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor,
    alpha: float,
    lora: dict[str, Adapter] | None = None,
) -> tuple[torch.Tensor, FFNGrads]:
    """dxn2, grads.  dy: [B, S, D] -> dxn2: [B, S, D] (gradient w.r.t. the normalized input)."""
    dus: dict[str, torch.Tensor] = {}

    def back(d: torch.Tensor, w: torch.Tensor, name: str) -> torch.Tensor:
        dx = d @ w
        if lora and name in lora:
            dx_l, dus[name] = lora_backward_dx(d, lora[name])
            dx = dx + dx_l
        return dx

    df = dy if alpha == 1.0 else alpha * dy  # [B, S, D]
    dg = back(df, w2, "w2")  # [B, S, F]
    dh1, dh3 = swiglu_backward(dg, taps.h1, taps.h3)  # [B, S, F] each
    dxn2 = back(dh1, w1, "w1") + back(dh3, w3, "w3")  # [B, S, D]
    return dxn2, FFNGrads(df=df, dh1=dh1, dh3=dh3, lora_du=dus)
