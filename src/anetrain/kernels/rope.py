"""Rotary position embedding on interleaved pairs, exactly as llama2.c.

Inside each head, the pair (2i, 2i+1) at position p is rotated by the angle p * theta^(-2i/dh)::

    out[2i]   = x[2i] * cos - x[2i+1] * sin
    out[2i+1] = x[2i+1] * cos + x[2i] * sin

The backward applies the inverse rotation (the transpose of the rotation matrix) to the gradient::

    dx[2i]   =  d[2i] * cos + d[2i+1] * sin
    dx[2i+1] = -d[2i] * sin + d[2i+1] * cos

(Hugging Face Llama rotates half-split pairs (i, i + dh/2) instead; the HF format permutes wq/wk rows.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Rope:
    """cos/sin tables for positions 0..S-1: both [S, dh/2]."""

    cos: torch.Tensor
    sin: torch.Tensor

    @classmethod
    def build(
        cls,
        seq_len: int,
        head_dim: int,
        theta: float = 10000.0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> Rope:
        # Computed in float64 and rounded once, which is at least as accurate as llama2.c's float32 powf/cosf.
        freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))  # [dh/2]
        angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), freqs)  # [S, dh/2]
        return cls(angles.cos().to(dtype=dtype, device=device), angles.sin().to(dtype=dtype, device=device))

    def to(self, dtype: torch.dtype) -> Rope:
        return Rope(self.cos.to(dtype), self.sin.to(dtype))


def _pairs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the last axis into its even and odd members: [..., dh] -> two [..., dh/2]."""
    xp = x.unflatten(-1, (-1, 2))
    return xp[..., 0], xp[..., 1]


def rope_forward(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate.  x: [B, S, H, dh]; cos, sin: [S, dh/2] -> [B, S, H, dh]."""
    c = cos[:, None, :].to(x.dtype)  # [S, 1, dh/2] broadcasts over batch and heads
    s = sin[:, None, :].to(x.dtype)
    x0, x1 = _pairs(x)  # [B, S, H, dh/2] each
    return torch.stack((x0 * c - x1 * s, x1 * c + x0 * s), dim=-1).flatten(-2)


def rope_backward(d: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Gradient through the rotation (the inverse rotation).  d: [B, S, H, dh] -> [B, S, H, dh]."""
    c = cos[:, None, :].to(d.dtype)
    s = sin[:, None, :].to(d.dtype)
    d0, d1 = _pairs(d)
    return torch.stack((d0 * c + d1 * s, d1 * c - d0 * s), dim=-1).flatten(-2)
