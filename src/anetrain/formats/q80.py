"""Q8_0 quantization as llama2.c's ``export.py`` (version 2) and ``runq.c`` do it.

Symmetric, in groups of ``group_size`` consecutive elements of the flattened row-major tensor::

    scale = max|w| / 127        q = round(w / scale)  (int8 in [-127, 127], ties to even)
    dequantized w = q * scale

An all-zero group has scale 0; llama2.c would divide by zero there, we store q = 0 (which dequantizes to 0).
"""

from __future__ import annotations

import torch


def q80_group_size(dim: int, start: int = 64) -> int:
    """The group size llama2.c's exporter picks: 64, halved while it does not divide ``dim``."""
    gs = start
    while dim % gs:
        gs //= 2
    return gs


def quantize_q80(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(int8 values [numel], float32 scales [numel/group_size], the largest absolute error)."""
    if w.numel() % group_size:
        raise ValueError(f"tensor of {w.numel()} elements is not a whole number of groups of {group_size}")
    g = w.detach().float().reshape(-1, group_size)
    scale = g.abs().amax(dim=1) / 127.0
    divisor = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(g / divisor[:, None]).to(torch.int8)
    err = float((q.float() * scale[:, None] - g).abs().max()) if g.numel() else 0.0
    return q.reshape(-1), scale, err


def dequantize_q80(q: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    """float32 values q * scale, flattened (as ``runq.c``'s ``dequantize``)."""
    return (q.float().reshape(-1, group_size) * scale.float()[:, None]).reshape(-1)
