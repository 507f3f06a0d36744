"""The optimized pipeline's elementwise work as a few ``torch.compile``'d kernels (Inductor's C++/OpenMP code
on CPU, Triton on CUDA), one per stretch of work between two matrix products.

``anetrain.backends.fused`` does the same math with one torch operator per line (each a pass over memory and
a dispatch); here each function below becomes one or two generated loops that read their 16-bit inputs once
and write their outputs once. The statistics stay in float32 and every 16-bit output is rounded once, as in
the hand-fused code; tests compare the two (``tests/test_compiled.py``).

Every function writes into caller-owned tensors (``copy_``/``add_`` on its arguments, which Inductor turns
into stores into those buffers), so the pipeline's workspace stays the only memory a step touches.
Functions are compiled lazily, once per input shape (``dynamic=False``), on first use; the first step of a
run pays the compile time (a few seconds per function; Inductor keeps a disk cache for later runs), which the
trainer and ``anetrain bench`` report as warm-up/compile time, apart from the step times.

Shapes: B batch, S sequence, D model dim, F FFN hidden dim, H/Hkv query/kv heads, dh head dim, V vocabulary.
"""

from __future__ import annotations

import functools
import shutil
import threading
from collections.abc import Callable
from typing import Any

import torch

_COMPILED: dict[str, Callable[..., Any]] = {}
#: each function is compiled once per distinct input shape; a process that trains one model sees a handful,
#: a test session many (dynamo's default limit, 8 per function, would then refuse with an error)
RECOMPILE_LIMIT = 64
_THREAD = threading.local()


def _compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Compile ``fn`` on first call (so importing this module costs nothing)."""

    @functools.wraps(fn)
    def call(*args: Any) -> Any:
        if not getattr(_THREAD, "configured", False):  # dynamo's settings are per thread (the dW worker too)
            cfg = torch._dynamo.config
            cfg.recompile_limit = max(cfg.recompile_limit, RECOMPILE_LIMIT)
            _THREAD.configured = True
        c = _COMPILED.get(fn.__name__)
        if c is None:
            c = _COMPILED[fn.__name__] = torch.compile(fn, dynamic=False, fullgraph=True)
        return c(*args)

    return call


def available(device: torch.device) -> tuple[bool, str]:
    """Whether torch.compile can generate kernels here, and if not, why (the pipeline then hand-fuses)."""
    if device.type == "cpu":
        if shutil.which("g++") is None and shutil.which("c++") is None and shutil.which("clang++") is None:
            return False, "no C++ compiler on PATH (Inductor needs one for CPU kernels)"
        return True, ""
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False, "triton is not installed"
        return True, ""
    return False, f"no compiled kernels for device {device.type!r}"


# ---- forward ---------------------------------------------------------------------------------------------
def _norm(x: torch.Tensor, g: torch.Tensor, eps: float, y: torch.Tensor, rstd: torch.Tensor) -> None:
    r = torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)  # [B, S, 1]
    rstd.copy_(r)
    y.copy_(x * r * g)


@_compiled
def norm_tap(
    x: torch.Tensor, tap: torch.Tensor, g: torch.Tensor, eps: float, y: torch.Tensor, rstd: torch.Tensor
) -> None:
    """tap = x (16-bit); y = RMSNorm(x) * g; rstd = 1/sqrt(mean(x^2) + eps).   x: [B, S, D] fp32."""
    tap.copy_(x)
    _norm(x, g, eps, y, rstd)


@_compiled
def residual_norm_tap(
    x: torch.Tensor,
    delta: torch.Tensor,
    alpha: float,
    tap: torch.Tensor,
    g: torch.Tensor,
    eps: float,
    y: torch.Tensor,
    rstd: torch.Tensor,
) -> None:
    """x += alpha * delta (the block's output, 16-bit), then :func:`norm_tap` of the new x."""
    x.add_(delta.float() * alpha)
    tap.copy_(x)
    _norm(x, g, eps, y, rstd)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved pairs (x[2i], x[2i+1]) rotated by the angle whose cos/sin are given.  x: [B, S, n, dh]."""
    pairs = x.unflatten(-1, (-1, 2))
    re, im = pairs[..., 0], pairs[..., 1]  # [B, S, n, dh/2]
    return torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1).flatten(-2)


@_compiled
def rope_split(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    qkv: torch.Tensor,
    cos_q: torch.Tensor,
    sin_q: torch.Tensor,
    cos_k: torch.Tensor,
    sin_k: torch.Tensor,
) -> None:
    """q, k (rotated; q also scaled: cos_q/sin_q carry 1/sqrt(dh)), v, heads first, from qkv [B, S, Dq+2Dkv].

    q: [B, H, S, dh]; k, v: [B, Hkv, S, dh]; cos/sin: [S, 1, dh/2] fp32."""
    h, dh, hkv = q.shape[1], q.shape[3], k.shape[1]
    x = qkv.float()
    xq = x[..., : h * dh].unflatten(-1, (h, dh))
    xk = x[..., h * dh : (h + hkv) * dh].unflatten(-1, (hkv, dh))
    q.copy_(_rotate(xq, cos_q, sin_q).transpose(1, 2))
    k.copy_(_rotate(xk, cos_k, sin_k).transpose(1, 2))
    v.copy_(qkv[..., (h + hkv) * dh :].unflatten(-1, (hkv, dh)).transpose(1, 2))


@_compiled
def masked_softmax(p: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor) -> None:
    """p = softmax(scores + mask) over the last dim, in fp32, rounded once.

    scores, p: [G, R*S, S] (16-bit); mask: [S, S] fp32."""
    s = mask.shape[0]
    z = scores.float().unflatten(1, (-1, s)) + mask  # [G, R, S, S]
    p.copy_(torch.softmax(z, dim=-1).flatten(1, 2))


@_compiled
def swiglu(g: torch.Tensor, h13: torch.Tensor) -> None:
    """g = silu(h1) * h3 with h13 = [h1 | h3]: [N, 2F] -> g: [N, F]."""
    f = g.shape[-1]
    g.copy_(torch.nn.functional.silu(h13[..., :f].float()) * h13[..., f:].float())


# ---- classifier + cross-entropy ------------------------------------------------------------------------
@_compiled
def cross_entropy_chunk(
    logits: torch.Tensor, loss_acc: torch.Tensor, targets: torch.Tensor, grad_scale: torch.Tensor
) -> None:
    """loss_acc += sum_rows (logsumexp - logit[target]); then logits is overwritten with its gradient
    (softmax - onehot) * grad_scale.

    logits: [c, V] 16-bit; targets: [c] int64; loss_acc, grad_scale: [] fp32 (a tensor, so that a changing
    loss scale does not recompile). No two inputs alias each other (one buffer is read and overwritten rather
    than two views of it passed), which Inductor would otherwise handle with a synthetic base and copies."""
    z = logits.float()
    m = z.amax(dim=-1, keepdim=True)
    e = torch.exp(z - m)
    total = e.sum(dim=-1, keepdim=True)
    picked = torch.gather(z, 1, targets[:, None])
    loss_acc.add_((m + torch.log(total) - picked).sum())
    onehot = torch.arange(z.shape[1], device=z.device)[None, :] == targets[:, None]
    logits.copy_((e / total - onehot.to(z.dtype)) * grad_scale)


@_compiled
def weighted_cross_entropy_chunk(
    logits: torch.Tensor,
    loss_acc: torch.Tensor,
    targets: torch.Tensor,
    grad_scale: torch.Tensor,
    weights: torch.Tensor,
) -> None:
    """:func:`cross_entropy_chunk` with each row's loss and gradient times its weight ([c] fp32: a loss
    mask, 1 where the target counts and 0 where it does not)."""
    z = logits.float()
    m = z.amax(dim=-1, keepdim=True)
    e = torch.exp(z - m)
    total = e.sum(dim=-1, keepdim=True)
    picked = torch.gather(z, 1, targets[:, None])
    loss_acc.add_(((m + torch.log(total) - picked) * weights[:, None]).sum())
    onehot = torch.arange(z.shape[1], device=z.device)[None, :] == targets[:, None]
    logits.copy_((e / total - onehot.to(z.dtype)) * grad_scale * weights[:, None])


# ---- backward ------------------------------------------------------------------------------------------
def _norm_backward(
    dxn: torch.Tensor, x: torch.Tensor, rstd: torch.Tensor, g: torch.Tensor, dg_acc: torch.Tensor
) -> torch.Tensor:
    """RMSNorm's input gradient for dy = dxn; adds sum_t dy * xhat into dg_acc."""
    xhat = x.float() * rstd
    dy = dxn.float()
    dg_acc.add_((dy * xhat).sum(dim=(0, 1)))
    dxhat = dy * g
    proj = (dxhat * xhat).mean(dim=-1, keepdim=True)
    return (dxhat - xhat * proj) * rstd


@_compiled
def norm_backward(
    dx: torch.Tensor,
    dg_acc: torch.Tensor,
    dxn: torch.Tensor,
    x: torch.Tensor,
    rstd: torch.Tensor,
    g: torch.Tensor,
) -> None:
    """dx = RMSNorm'(dxn) (fp32); dg_acc += sum_t dxn * xhat.   dxn, x: [B, S, D] 16-bit; rstd: [B, S, 1]."""
    dx.copy_(_norm_backward(dxn, x, rstd, g, dg_acc))


@_compiled
def residual_norm_backward(
    dx: torch.Tensor,
    dg_acc: torch.Tensor,
    dres: torch.Tensor,
    dxn: torch.Tensor,
    x: torch.Tensor,
    rstd: torch.Tensor,
    g: torch.Tensor,
    alpha: float,
    dscaled: torch.Tensor,
) -> None:
    """dx = dres + RMSNorm'(dxn), the residual's gradient (fp32), and dscaled = alpha * dx (16-bit): the
    gradient of the block below's output, which its dx and dW GEMMs read."""
    out = dres + _norm_backward(dxn, x, rstd, g, dg_acc)
    dx.copy_(out)
    dscaled.copy_(out * alpha)


@_compiled
def swiglu_backward(dh13: torch.Tensor, dg: torch.Tensor, h13: torch.Tensor) -> None:
    """dh13 = [dh1 | dh3]: dh1 = dg * h3 * silu'(h1), dh3 = dg * silu(h1).

    silu'(a) = sig(a) (1 + a (1 - sig(a))).  dg: [N, F]; h13, dh13: [N, 2F]."""
    f = dg.shape[-1]
    a, b, d = h13[..., :f].float(), h13[..., f:].float(), dg.float()
    sig = torch.sigmoid(a)
    dh13.copy_(torch.cat((d * b * sig * (1 + a * (1 - sig)), d * a * sig), dim=-1))


@_compiled
def accumulate(acc: torch.Tensor, src: torch.Tensor) -> None:
    """acc (fp32) += src (16-bit), converted in registers (one kernel per weight shape: a shape-generic one,
    ``dynamic=True``, measured slower)."""
    acc.add_(src.float())
