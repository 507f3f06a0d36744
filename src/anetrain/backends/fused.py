"""Hand-fused, allocation-free implementations of the kernels' elementwise work, for the optimized pipeline.

Each function computes the same math as its counterpart in ``anetrain.kernels`` (tests compare them), but
writes into caller-owned output tensors and uses caller-owned scratch, so that a training step in steady
state allocates nothing. Statistics (RMSNorm, softmax, cross-entropy) are computed in float32 whatever the
16-bit activation dtype; results are rounded to the output tensor's dtype once.

Two rewritings make the attention cheaper without changing its math:

* **Pre-scaled queries.** RoPE writes ``q * 1/sqrt(dh)``, so scores are a plain ``q k^T``; the backward then
  gets ``dk = dS^T (q/sqrt(dh))`` directly and applies the same scale to ``dq`` in the inverse rotation.
* **Grouped GEMMs for GQA.** With ``q`` stored as ``[B, Hkv, R, S, dh]`` (query head h = kv head h // R,
  member h % R), the R query heads that share a kv head stack along the GEMM's M dimension:
  ``scores = q[B*Hkv, R*S, dh] @ k[B*Hkv, dh, S]``. No K/V copies are made, and in the backward
  ``dv = P^T dO`` and ``dk = dS^T q`` sum over the R heads inside the GEMM's contraction: the GQA reduction.
"""

from __future__ import annotations

import torch

from .gemm import MatMul, torch_matmul

aten = torch.ops.aten


# ---- RMSNorm ---------------------------------------------------------------------------------------
def rmsnorm_forward_into(
    y: torch.Tensor, rstd: torch.Tensor, x: torch.Tensor, g: torch.Tensor, eps: float, tmp: torch.Tensor
) -> None:
    """y = x * rstd * g; rstd = 1/sqrt(mean(x^2) + eps).  x, tmp: [B, S, D] fp32; rstd: [B, S, 1] fp32.

    Every operation is single-dtype (fp32), and only the final ``copy_`` rounds to y's dtype: mixed-dtype
    ``out=`` operations would make torch allocate a converted temporary.
    """
    torch.mul(x, x, out=tmp)
    torch.sum(tmp, dim=-1, keepdim=True, out=rstd)
    rstd.mul_(1.0 / x.shape[-1]).add_(eps).rsqrt_()
    torch.mul(x, rstd, out=tmp)
    tmp.mul_(g)
    y.copy_(tmp)


def rmsnorm_backward_into(
    dx_acc: torch.Tensor,
    dg_acc: torch.Tensor | None,
    dy: torch.Tensor,
    x: torch.Tensor,
    rstd: torch.Tensor,
    g: torch.Tensor,
    scratch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    proj: torch.Tensor,
    dg_tmp: torch.Tensor,
) -> None:
    """dx_acc += RMSNorm'(dy); dg_acc += sum_t dy * xhat (not computed when dg_acc is None: a frozen gain).

    dy, x: [B, S, D] (16-bit); rstd, proj: [B, S, 1] fp32; dx_acc and the three scratch tensors: [B, S, D]
    fp32; g, dg_acc, dg_tmp: [D] fp32. dx = rstd * (dy*g - xhat * mean(dy*g*xhat)) with xhat = x * rstd.
    """
    xhat, dys, tmp = scratch
    xhat.copy_(x)
    xhat.mul_(rstd)
    dys.copy_(dy)
    if dg_acc is not None:
        torch.mul(dys, xhat, out=tmp)
        torch.sum(tmp, dim=(0, 1), out=dg_tmp)
        dg_acc.add_(dg_tmp)
    dys.mul_(g)  # dxhat
    torch.mul(dys, xhat, out=tmp)
    torch.sum(tmp, dim=-1, keepdim=True, out=proj)
    proj.mul_(1.0 / x.shape[-1])  # mean(dxhat * xhat)
    xhat.mul_(proj)
    dys.sub_(xhat).mul_(rstd)
    dx_acc.add_(dys)


# ---- QK-norm (Qwen3), in place on the q and k columns of the qkv projection ------------------------------
def _qk_heads(qkv: torch.Tensor, hqk: int, dh: int) -> torch.Tensor:
    """The q and k columns of qkv [B, S, Dq+2Dkv] as heads: a [B, S, H+Hkv, dh] view."""
    return qkv[..., : hqk * dh].unflatten(-1, (hqk, dh))


def qk_norm_forward_into(
    qkv: torch.Tensor,
    raw: torch.Tensor,
    rstd: torch.Tensor,
    gq: torch.Tensor,
    gk: torch.Tensor,
    eps: float,
    a: torch.Tensor,
    b: torch.Tensor,
) -> None:
    """Each q and k head of qkv replaced by RMSNorm(head) * gain (q heads gq, k heads gk; fp32, rounded once).

    qkv: [B, S, Dq+2Dkv] (16-bit); raw: [B, S, H+Hkv, dh] the heads before (16-bit tap);
    rstd: [B, S, H+Hkv, 1] fp32; gq, gk: [dh] fp32; a, b: [B, S, H+Hkv, dh] fp32 scratch."""
    hqk, dh = raw.shape[-2], raw.shape[-1]
    h = hqk - (qkv.shape[-1] - hqk * dh) // dh  # the k heads are as many as the v heads after them
    heads = _qk_heads(qkv, hqk, dh)
    raw.copy_(heads)
    a.copy_(heads)
    torch.mul(a, a, out=b)
    torch.sum(b, dim=-1, keepdim=True, out=rstd)
    rstd.mul_(1.0 / dh).add_(eps).rsqrt_()
    a.mul_(rstd)
    a[..., :h, :].mul_(gq)
    a[..., h:, :].mul_(gk)
    heads.copy_(a)


def qk_norm_backward_into(
    dqkv: torch.Tensor,
    raw: torch.Tensor,
    rstd: torch.Tensor,
    gq: torch.Tensor,
    gk: torch.Tensor,
    dgq: torch.Tensor | None,
    dgk: torch.Tensor | None,
    scratch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    proj: torch.Tensor,
    dg_tmp: torch.Tensor,
) -> None:
    """The q and k columns of dqkv (the gradient of the normalized heads, 16-bit) through QK-norm's backward,
    in place; dgq, dgk += the gains' gradients (skipped when None).

    dx = rstd * (dy*g - xhat * mean(dy*g*xhat)), dg = sum over tokens and heads of dy * xhat, xhat = raw*rstd.
    raw: [B, S, H+Hkv, dh]; rstd, proj: [B, S, H+Hkv, 1] fp32; scratch: three [B, S, H+Hkv, dh] fp32; dg_tmp:
    [dh] fp32."""
    hqk, dh = raw.shape[-2], raw.shape[-1]
    h = hqk - (dqkv.shape[-1] - hqk * dh) // dh
    xhat, dys, tmp = scratch
    heads = _qk_heads(dqkv, hqk, dh)
    xhat.copy_(raw)
    xhat.mul_(rstd)
    dys.copy_(heads)
    if dgq is not None and dgk is not None:
        torch.mul(dys, xhat, out=tmp)
        torch.sum(tmp[..., :h, :], dim=(0, 1, 2), out=dg_tmp)
        dgq.add_(dg_tmp)
        torch.sum(tmp[..., h:, :], dim=(0, 1, 2), out=dg_tmp)
        dgk.add_(dg_tmp)
    dys[..., :h, :].mul_(gq)  # dxhat
    dys[..., h:, :].mul_(gk)
    torch.mul(dys, xhat, out=tmp)
    torch.sum(tmp, dim=-1, keepdim=True, out=proj)
    proj.mul_(1.0 / dh)
    xhat.mul_(proj)
    dys.sub_(xhat).mul_(rstd)
    heads.copy_(dys)


# ---- RoPE, fused with the split of the qkv projection and the transpose to heads ---------------------
def rope_tables(cos: torch.Tensor, sin: torch.Tensor, q_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Complex rotation factors exp(i * angle), [S, 1, dh/2] complex64, for q (times q_scale) and for k.

    An interleaved pair (x[2i], x[2i+1]) is the complex number x[2i] + i x[2i+1]; RoPE multiplies it by
    exp(i p theta_i), which is one vectorized complex multiply instead of four strided real ones.
    """
    f = torch.complex(cos.float(), sin.float())[:, None, :]
    return f * q_scale, f


def rope_split_into(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    qkv: torch.Tensor,
    freqs: tuple[torch.Tensor, torch.Tensor],
    qkv32: torch.Tensor,
    rot32: torch.Tensor,
) -> None:
    """q, k, v (heads-first) from qkv: [B, S, Dq+2Dkv]; q, k rotated, q also scaled by 1/sqrt(dh).

    q: [B, H, S, dh]; k, v: [B, Hkv, S, dh]; freqs: from :func:`rope_tables`; qkv32: [B, S, Dq+2Dkv] and
    rot32: [B, S, H, dh] fp32 scratch. The rotation is computed in fp32 and rounded once.
    """
    _, h, _, dh = q.shape
    hkv = k.shape[1]
    qkv32.copy_(qkv)
    lo = 0
    for dst, n, f in ((q, h, freqs[0]), (k, hkv, freqs[1])):
        xin = torch.view_as_complex(
            qkv32[..., lo : lo + n * dh].unflatten(-1, (n, dh // 2, 2))
        )  # [B, S, n, dh/2]
        rot = rot32[:, :, :n]
        torch.mul(xin, f, out=torch.view_as_complex(rot.unflatten(-1, (dh // 2, 2))))
        dst.copy_(rot.transpose(1, 2))
        lo += n * dh
    v.copy_(qkv[..., lo:].unflatten(-1, (hkv, dh)).transpose(1, 2))


def rope_merge_backward_into(
    dqkv: torch.Tensor,
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    freqs: tuple[torch.Tensor, torch.Tensor],
    d32: torch.Tensor,
    rot32: torch.Tensor,
) -> None:
    """dqkv: [B, S, Dq+2Dkv] from heads-first dq (w.r.t. the scaled, rotated q), dk, dv, through RoPE^-1.

    ``freqs`` are the conjugates of the forward's (the inverse rotation; the q scale stays, since
    d(s R q)/dq = s R^T), made once with ``.conj().resolve_conj()``. d32, rot32: [B, S, H, dh] fp32 scratch.
    """
    _, h, _, dh = dq.shape
    hkv = dk.shape[1]
    lo = 0
    for src, n, f in ((dq, h, freqs[0]), (dk, hkv, freqs[1])):
        din = d32[:, :, :n]
        din.copy_(src.transpose(1, 2))  # [B, S, n, dh]
        rot = rot32[:, :, :n]
        torch.mul(
            torch.view_as_complex(din.unflatten(-1, (dh // 2, 2))),
            f,
            out=torch.view_as_complex(rot.unflatten(-1, (dh // 2, 2))),
        )
        dqkv[..., lo : lo + n * dh].unflatten(-1, (n, dh)).copy_(rot)
        lo += n * dh
    dqkv[..., lo:].unflatten(-1, (hkv, dh)).copy_(dv.transpose(1, 2))


# ---- causal attention over grouped heads -------------------------------------------------------------
def attention_backward_into(
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    dout: torch.Tensor,
    p: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dp: torch.Tensor,
    ds: torch.Tensor,
    matmul: MatMul = torch_matmul,
) -> None:
    """dq (w.r.t. the scaled q), dk, dv from dout: [B, H, S, dh]; the GQA sums happen inside the GEMMs."""
    b, _, s, dh = q.shape
    hkv = k.shape[1]
    g = b * hkv
    dog = dout.view(g, -1, dh)  # [B*Hkv, R*S, dh]
    matmul(p.transpose(1, 2), dog, dv.view(g, s, dh))  # dv = P^T dO, summed over the group
    matmul(dog, v.view(g, s, dh).transpose(1, 2), dp)  # dP = dO V^T
    aten._softmax_backward_data.out(dp, p, -1, p.dtype, grad_input=ds)  # dS = P (dP - rowsum(P dP))
    matmul(ds, k.view(g, s, dh), dq.view(g, -1, dh))  # dq = dS K
    matmul(ds.transpose(1, 2), q.view(g, -1, dh), dk.view(g, s, dh))  # dk = dS^T q


# ---- SwiGLU ------------------------------------------------------------------------------------------
def swiglu_forward_into(g: torch.Tensor, h13: torch.Tensor) -> None:
    """g = silu(h1) * h3 with h13 = [h1 | h3]: [N, 2F] -> g: [N, F]."""
    f = g.shape[-1]
    aten.silu.out(h13[..., :f], out=g)
    g.mul_(h13[..., f:])


def swiglu_backward_into(dh13: torch.Tensor, dg: torch.Tensor, h13: torch.Tensor, tmp: torch.Tensor) -> None:
    """dh13 = [dh1 | dh3]: dh1 = dg * h3 * silu'(h1), dh3 = dg * silu(h1).  dg, tmp: [N, F]."""
    f = dg.shape[-1]
    h1, h3 = h13[..., :f], h13[..., f:]
    torch.mul(dg, h3, out=tmp)
    aten.silu_backward.grad_input(tmp, h1, grad_input=dh13[..., :f])
    aten.silu.out(h1, out=tmp)
    torch.mul(dg, tmp, out=dh13[..., f:])


# ---- classifier + cross-entropy, one chunk of rows ---------------------------------------------------------
def cross_entropy_chunk_into(
    dlogits: torch.Tensor,
    loss_acc: torch.Tensor,
    logits16: torch.Tensor,
    targets: torch.Tensor,
    grad_scale: float,
    probs: torch.Tensor,
    picked: torch.Tensor,
    picked_sum: torch.Tensor,
    flat_idx: torch.Tensor,
    row_base: torch.Tensor,
    minus_one: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> None:
    """dlogits = (softmax - onehot) * grad_scale; loss_acc += sum of -log p[target]   (c rows of [c, V]).
    With ``weights`` ([c] fp32, a loss mask), each row's loss and gradient times its weight.

    logits16: [c, V] (16-bit GEMM output; may be the same memory as dlogits, which is written last);
    probs: [c, V] fp32 scratch; targets: [c] int64; picked: [c, 1] fp32; picked_sum: [] fp32; flat_idx: [c]
    int64; row_base: [c] int64 = arange(c) * V; minus_one: [c] fp32 of -1. The loss comes from the target's
    fp32 probability (one softmax pass instead of log-softmax + exp); it is capped at -log(1e-38) = 87.5 per
    token, far above any loss a model produces.
    """
    probs.copy_(logits16)
    aten._softmax.out(probs, -1, False, out=probs)
    torch.gather(probs, 1, targets[:, None], out=picked)
    picked.clamp_min_(1e-38).log_()
    if weights is not None:
        picked.mul_(weights[:, None])
    torch.sum(picked, dim=(0, 1), out=picked_sum)
    loss_acc.sub_(picked_sum)
    torch.add(row_base, targets, out=flat_idx)
    probs.view(-1).index_add_(0, flat_idx, minus_one)  # minus the one-hot target
    probs.mul_(grad_scale)
    if weights is not None:
        probs.mul_(weights[:, None])
    dlogits.copy_(probs)


# ---- gradient accumulation ---------------------------------------------------------------------------
def accumulate_into(acc: torch.Tensor, src: torch.Tensor, scratch: torch.Tensor) -> None:
    """acc (fp32) += src (16-bit), block by block through ``scratch`` (flat fp32), so that no temporary of
    src's size is allocated (``acc.add_(src)`` would convert src into a new fp32 tensor first)."""
    if src.dtype == acc.dtype:
        acc.add_(src)
        return
    a, s_ = acc.view(-1), src.view(-1)
    block = scratch.numel()
    for lo in range(0, a.numel(), block):
        hi = min(a.numel(), lo + block)
        buf = scratch[: hi - lo]
        buf.copy_(s_[lo:hi])
        a[lo:hi].add_(buf)
