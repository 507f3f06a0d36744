"""QK-norm (Qwen3): RMSNorm over each attention head's vector of the queries and of the keys, before RoPE.

With q: [B, S, H, dh] the query projection split into heads (k: [B, S, Hkv, dh] likewise) and a gain
g: [dh] shared by all heads (one for q, one for k)::

    rstd[b,s,h] = 1 / sqrt(mean_i q[b,s,h,i]^2 + eps)
    qn[b,s,h,i] = q[b,s,h,i] * rstd[b,s,h] * g[i]

Backward, with qhat = q * rstd and dqn the gradient of the normalized heads (after RoPE's inverse)::

    dx:  dq[b,s,h,i] = rstd * (dqn*g - qhat * mean_j(dqn[b,s,h,j] * g[j] * qhat[b,s,h,j]))
    dW:  dg[i]       = sum_{b,s,h} dqn[b,s,h,i] * qhat[b,s,h,i]

It is :mod:`anetrain.kernels.norm`'s RMSNorm with the head as the normalized row; the gain's gradient (a
reduction over every token and head) is its own kernel, so a pipeline schedules it like a weight gradient.

Layout note: anetrain rotates interleaved pairs (2i, 2i+1), Hugging Face half-split pairs (i, i + dh/2), and
the HF import permutes each head's rows of wq/wk. RMSNorm over a head does not depend on the order of the
head's elements, so it commutes with that permutation as long as the gain is permuted the same way
(``anetrain.formats.hf`` does both).
"""

from __future__ import annotations

import torch

from .norm import stat_dtype


def qk_norm_forward(x: torch.Tensor, g: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """y, rstd.  x: [B, S, n, dh] (n heads); g: [dh] -> y: [B, S, n, dh] (x's dtype), rstd: [B, S, n, 1]."""
    xs = x.to(stat_dtype(x.dtype))  # [B, S, n, dh]
    rstd = torch.rsqrt(xs.pow(2).mean(dim=-1, keepdim=True) + eps)  # [B, S, n, 1]
    y = (xs * rstd * g.to(xs.dtype)).to(x.dtype)  # [B, S, n, dh]
    return y, rstd


def qk_norm_backward_dx(
    dy: torch.Tensor, x: torch.Tensor, rstd: torch.Tensor, g: torch.Tensor
) -> torch.Tensor:
    """dx.  dy, x: [B, S, n, dh]; rstd: [B, S, n, 1]; g: [dh] -> dx: [B, S, n, dh] (dy's dtype)."""
    acc = stat_dtype(dy.dtype)
    xhat = x.to(acc) * rstd.to(acc)  # [B, S, n, dh]
    dxhat = dy.to(acc) * g.to(acc)  # [B, S, n, dh]
    proj = (dxhat * xhat).mean(dim=-1, keepdim=True)  # [B, S, n, 1]
    return (rstd.to(acc) * (dxhat - xhat * proj)).to(dy.dtype)


def qk_norm_weight_grad(gg: torch.Tensor, dy: torch.Tensor, x: torch.Tensor, rstd: torch.Tensor) -> None:
    """gg += sum over tokens and heads of dy * xhat.  gg: [dh]; dy, x: [B, S, n, dh]; rstd: [B, S, n, 1]."""
    acc = stat_dtype(dy.dtype)
    xhat = x.to(acc) * rstd.to(acc)  # [B, S, n, dh]
    gg.add_((dy.to(acc) * xhat).reshape(-1, x.shape[-1]).sum(dim=0).to(gg.dtype))  # [dh]
