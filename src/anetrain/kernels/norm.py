"""RMSNorm forward and backward.

Forward, per token t (x: [..., D], usually [B, S, D])::

    rstd[t] = 1 / sqrt(mean_i x[t,i]^2 + eps)
    y[t,i]  = x[t,i] * rstd[t] * g[i]

Backward. With xhat = x * rstd (so y = xhat * g), and dy the upstream gradient::

    dg[i]   = sum_t dy[t,i] * xhat[t,i]
    dxhat   = dy * g
    dx[t,i] = rstd[t] * (dxhat[t,i] - xhat[t,i] * mean_j(dxhat[t,j] * xhat[t,j]))

which is the same as ``rstd * (g*dy - x * rstd^2/D * sum_j dy_j g_j x_j)``. The original's CPU version
multiplies that second term by g_i once more (docs/original.md section 9); this one does not.

Statistics are computed in at least float32 (float64 stays float64) whatever the activation dtype.
"""

from __future__ import annotations

import torch


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype for reductions and statistics: float32 for 16-bit inputs, else the input's own."""
    return torch.promote_types(dtype, torch.float32)


def rmsnorm_forward(x: torch.Tensor, g: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """y = x * rstd * g.  x: [B, S, D], g: [D] -> y: [B, S, D] (x's dtype), rstd: [B, S, 1] (stat dtype)."""
    xs = x.to(stat_dtype(x.dtype))  # [B, S, D]
    rstd = torch.rsqrt(xs.pow(2).mean(dim=-1, keepdim=True) + eps)  # [B, S, 1]
    y = (xs * rstd * g.to(xs.dtype)).to(x.dtype)  # [B, S, D]
    return y, rstd


def rmsnorm_backward(
    dy: torch.Tensor, x: torch.Tensor, rstd: torch.Tensor, g: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """dx, dg for y = RMSNorm(x; g).  dy, x: [B, S, D]; rstd: [B, S, 1]; g: [D] -> dx: [B, S, D], dg: [D]."""
    acc = stat_dtype(dy.dtype)
    xhat = x.to(acc) * rstd.to(acc)  # [B, S, D]
    dys = dy.to(acc)  # [B, S, D]
    dg = (dys * xhat).flatten(0, -2).sum(dim=0)  # [D]: summed over every token
    dxhat = dys * g.to(acc)  # [B, S, D]
    proj = (dxhat * xhat).mean(dim=-1, keepdim=True)  # [B, S, 1]
    dx = rstd.to(acc) * (dxhat - xhat * proj)  # [B, S, D]
    return dx.to(dy.dtype), dg
