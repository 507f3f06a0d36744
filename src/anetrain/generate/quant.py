"""int8 (Q8_0) matrix products as llama2.c's ``runq.c`` computes them, in torch operators.

runq.c quantizes each matrix input at run time the way its weights are quantized, per group of ``gs``
consecutive values::

    scale = max|x| / 127          q = round(x / scale)   (C's round(): halves away from zero)

(an all-zero group: scale 0 and q = 0, where runq.c would divide by zero), then for each output feature i::

    y_i = sum_g  ws[i, g] * xs[g] * sum_{j in group g} wq[i, j] * xq[j]

The integer sums are exact: |wq * xq| <= 127^2 and a group of at most 1024 of them stays below 2^24, so the
float32 products and sums below compute them without rounding. (The weights of a model quantized on load use
the exporter's rule, ``anetrain.formats.q80.quantize_q80``: the same scale, rounding halves to even.)

The native decoder (``native/decode.c``) computes the same with int8 instructions; this module is its
reference and the torch path's implementation, not a fast one: it widens the int8 weights for every product.
"""

from __future__ import annotations

import torch

MAX_EXACT_GROUP = 1024  # 1024 * 127^2 < 2^24


def round_half_away(v: torch.Tensor) -> torch.Tensor:
    """C's round() of float32 values: to the nearest integer, halves away from zero (computed in float64,
    where |v| + 0.5 is exact)."""
    return torch.sign(v) * torch.floor(v.abs().double() + 0.5).to(v.dtype)


def quantize_rows(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """runq.c's ``quantize``: x [R, n] float -> (q int8 [R, n], scales float32 [R, n / group_size])."""
    r, n = x.shape
    g = x.float().reshape(r, n // group_size, group_size)  # [R, G, gs]
    scale = g.abs().amax(dim=-1) / 127.0  # [R, G]
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.where(scale[..., None] > 0, round_half_away(g / safe[..., None]), torch.zeros_like(g))
    return q.to(torch.int8).reshape(r, n), scale


def q8_linear(x: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, group_size: int) -> torch.Tensor:
    """x [R, in] times the Q8_0 matrix (wq int8 [out, in], ws [out, in / gs]) -> [R, out] in x's dtype."""
    if group_size > MAX_EXACT_GROUP:
        raise ValueError(f"group size {group_size} is too large for exact float32 group sums")
    r, n = x.shape
    out_f, groups = wq.shape[0], n // group_size
    xq, xs = quantize_rows(x, group_size)  # [R, in], [R, G]
    xg = xq.float().view(r, groups, group_size).transpose(0, 1)  # [G, R, gs]
    wg = wq.float().view(out_f, groups, group_size).permute(1, 2, 0)  # [G, gs, out]
    sums = torch.bmm(xg, wg)  # [G, R, out]: exact integers
    scaled = sums * ws.t()[:, None, :] * xs.t()[:, :, None]  # [G, R, out]
    return scaled.sum(dim=0).to(x.dtype)
