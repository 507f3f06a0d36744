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

With a loss mask m[n] in {0, 1} (instruction data: only the completion's tokens count), the mean is over the
selected tokens, M = sum_n m[n], and the other rows get no gradient::

    loss    = sum_n m[n] (lse[n] - logits[n, target[n]]) / M
    dlogits = m[n] (softmax(logits) - onehot(target)) / M * grad_scale      (0 when M = 0)
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
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """loss, dxf, dlogits.  xf: [B, S, D]; w: [V, D]; targets: [B, S] int64 in [0, V); mask: [B, S] bool.

    Returns the mean loss (0-dim, stat dtype, no grad scale), dxf: [B, S, D] and dlogits: [N, V].
    """
    d = xf.shape[-1]
    x = xf.reshape(-1, d)  # [N, D]
    t = targets.reshape(-1)  # [N]
    acc = stat_dtype(xf.dtype)
    keep = None if mask is None else mask.reshape(-1).to(device=xf.device, dtype=acc)  # [N]
    n = x.shape[0] if keep is None else max(1.0, float(keep.sum()))  # tokens the mean is over
    rows_total = x.shape[0]
    step = rows_total if chunk is None else max(1, chunk)
    dlogits = torch.empty(rows_total, w.shape[0], dtype=xf.dtype, device=xf.device)  # [N, V]
    dx = torch.empty_like(x)  # [N, D]
    loss_sum = torch.zeros((), dtype=acc, device=xf.device)
    for lo in range(0, rows_total, step):
        hi = min(rows_total, lo + step)
        logits = (x[lo:hi] @ w.t()).to(acc)  # [c, V]
        lse = torch.logsumexp(logits, dim=-1)  # [c]
        rows = torch.arange(hi - lo, device=xf.device)
        per_token = lse - logits[rows, t[lo:hi]]  # [c]
        probs = torch.exp(logits - lse[:, None])  # softmax: [c, V]
        probs[rows, t[lo:hi]] -= 1.0  # minus the one-hot target
        if keep is not None:  # masked-out rows: no loss, no gradient
            per_token = per_token * keep[lo:hi]
            probs = probs * keep[lo:hi, None]
        loss_sum += per_token.sum()
        dl = (probs * (grad_scale / n)).to(xf.dtype)  # [c, V]
        dlogits[lo:hi] = dl
        dx[lo:hi] = dl @ w  # [c, D]
    return loss_sum / n, dx.view_as(xf), dlogits
