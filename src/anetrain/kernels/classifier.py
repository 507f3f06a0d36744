"""Classifier and mean cross-entropy, forward and backward in one pass, chunked over tokens.

For final hidden states xf: [N, D] and a classifier W: [V, D] (the embedding when tied)::

    logits = xf W^T                        [N, V]
    lse[n] = log sum_v exp(logits[n, v])
    loss   = mean_n (lse[n] - logits[n, target[n]])
    dlogits = (softmax(logits) - onehot(target)) / N * grad_scale
    dxf    = dlogits W                     [N, D]
    (dW of the classifier: dlogits^T xf, left to weight_grad)

Rows are processed ``chunk`` tokens at a time so that float32 logits never exist for the whole batch; the
returned dlogits are in the compute dtype. ``grad_scale`` folds gradient-accumulation averaging and fp16
loss scaling into the one place where the gradient is born.
"""

from __future__ import annotations

import torch

from .norm import stat_dtype


def classifier_loss(
    xf: torch.Tensor,
    w: torch.Tensor,
    targets: torch.Tensor,
    grad_scale: float = 1.0,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """loss, dxf, dlogits.  xf: [B, S, D]; w: [V, D]; targets: [B, S] int64 in [0, V).

    Returns the mean loss (0-dim, stat dtype, no grad scale), dxf: [B, S, D] and dlogits: [N, V].
    """
    d = xf.shape[-1]
    x = xf.reshape(-1, d)  # [N, D]
    t = targets.reshape(-1)  # [N]
    n = x.shape[0]
    acc = stat_dtype(xf.dtype)
    step = n if chunk is None else max(1, chunk)
    dlogits = torch.empty(n, w.shape[0], dtype=xf.dtype, device=xf.device)  # [N, V]
    dx = torch.empty_like(x)  # [N, D]
    loss_sum = torch.zeros((), dtype=acc, device=xf.device)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        logits = (x[lo:hi] @ w.t()).to(acc)  # [c, V]
        lse = torch.logsumexp(logits, dim=-1)  # [c]
        rows = torch.arange(hi - lo, device=xf.device)
        loss_sum += (lse - logits[rows, t[lo:hi]]).sum()
        probs = torch.exp(logits - lse[:, None])  # softmax: [c, V]
        probs[rows, t[lo:hi]] -= 1.0  # minus the one-hot target
        dl = (probs * (grad_scale / n)).to(xf.dtype)  # [c, V]
        dlogits[lo:hi] = dl
        dx[lo:hi] = dl @ w  # [c, D]
    return loss_sum / n, dx.view_as(xf), dlogits
