"""The weight-gradient GEMMs, separate from the dx kernels so a pipeline can run them elsewhere and later.

For a projection y = x W^T over N = B*S tokens, dL/dW = dy^T x, summed over tokens::

    gW[o, i] += sum_n dy[n, o] * x[n, i]        gW: [out, in], dy: [N, out], x: [N, in]

Gradients accumulate (+=) so that micro-batches add up without an extra buffer; the accumulator may be
wider than the operands (fp32 gradients from bf16 activations).
"""

from __future__ import annotations

import torch


def weight_grad(gw: torch.Tensor, dy: torch.Tensor, x: torch.Tensor) -> None:
    """gw += dy^T x.  gw: [out, in]; dy: [..., out]; x: [..., in] (leading axes are summed over)."""
    dy2 = dy.reshape(-1, dy.shape[-1])  # [N, out]
    x2 = x.reshape(-1, x.shape[-1])  # [N, in]
    if dy2.dtype == gw.dtype:
        gw.addmm_(dy2.t(), x2)
    else:
        gw.add_(dy2.t() @ x2)  # product in the operands' precision, accumulated in gw's


def scattered_weight_grad(gw: torch.Tensor, rows: torch.Tensor, dy: torch.Tensor, x: torch.Tensor) -> None:
    """gw[rows] += dy^T x: the gradient of a weight restricted to ``rows`` (a compacted classifier) added into
    the full table.  gw: [V, in]; rows: [V'] int64; dy: [..., V']; x: [..., in]."""
    part = torch.zeros(rows.numel(), gw.shape[1], dtype=gw.dtype, device=gw.device)  # [V', in]
    weight_grad(part, dy, x)
    gw.index_add_(0, rows.to(gw.device), part)
