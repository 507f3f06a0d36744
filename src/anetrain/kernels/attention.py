"""The attention half of a layer: the attention block, the output projection, and their dx kernels.

Forward (x: [B, S, D] is the layer input)::

    xn, rstd = RMSNorm(x; g_att)
    q = xn Wq^T : [B, S, H, dh]      k = xn Wk^T, v = xn Wv^T : [B, S, Hkv, dh]
    q, k = RoPE(q), RoPE(k)
    per query head h, with kv head j = h // R  (R = H / Hkv):
        P_h   = softmax(q_h k_j^T / sqrt(dh) + M)      M[t, t'] = -inf where t' > t  (causal)
        out_h = P_h v_j
    attn = concat_h out_h : [B, S, Dq]
    x2   = x + alpha * attn Wo^T                        (output_forward)

The attention core keeps only the log-sum-exp of each score row (lse: [B, H, S], as flash attention
does); the backward recomputes P from q, k and lse, as the original's sdpaBwd1 recomputes P::

    dv_j = sum_{h in group j} P_h^T dout_h
    dP_h = dout_h v_j^T
    dS_h = P_h * (dP_h - rowsum(P_h * dP_h))            softmax backward
    dq_h = dS_h k_j / sqrt(dh)
    dk_j = sum_{h in group j} dS_h^T q_h / sqrt(dh)      the GQA reduction sums each group's R heads
    dq, dk = RoPE^-1(dq), RoPE^-1(dk)
    dxn  = dq Wq + dk Wk + dv Wv
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .norm import rmsnorm_forward, stat_dtype
from .rope import Rope, rope_backward, rope_forward


@dataclass
class AttentionTaps:
    """What the attention backward needs from the forward."""

    x: torch.Tensor  # [B, S, D]      layer input (RMSNorm backward)
    rstd: torch.Tensor  # [B, S, 1]   RMSNorm statistics
    xn: torch.Tensor  # [B, S, D]     normalized input (dW of wq, wk, wv)
    q: torch.Tensor  # [B, H, S, dh]  after RoPE
    k: torch.Tensor  # [B, Hkv, S, dh] after RoPE
    v: torch.Tensor  # [B, Hkv, S, dh]
    out: torch.Tensor  # [B, H, S, dh] attention output per head
    lse: torch.Tensor  # [B, H, S]     log-sum-exp of each scaled, masked score row (stat dtype)
    attn: torch.Tensor  # [B, S, Dq]   heads concatenated (dW of wo)


@dataclass
class AttentionGrads:
    """The gradients of the projections' outputs, for the dW GEMMs (all token-major, pre-RoPE frame)."""

    dq: torch.Tensor  # [B, S, Dq]
    dk: torch.Tensor  # [B, S, Dkv]
    dv: torch.Tensor  # [B, S, Dkv]


# ------------------------------------------------------------------------------------------------
# The attention core: causal grouped-query attention over heads


def causal_attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """out, lse.  q: [B, H, S, dh]; k, v: [B, Hkv, S, dh] -> out: [B, H, S, dh], lse: [B, H, S]."""
    _, h, s, dh = q.shape
    r = h // k.shape[1]
    k_full = k.repeat_interleave(r, dim=1)  # [B, H, S, dh]: query head h reads kv head h // R
    v_full = v.repeat_interleave(r, dim=1)
    acc = stat_dtype(q.dtype)
    scores = (q @ k_full.transpose(-1, -2)).to(acc) * (1.0 / math.sqrt(dh))  # [B, H, S, S]
    future = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1)  # t' > t
    scores = scores.masked_fill(future, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)  # [B, H, S]
    p = torch.exp(scores - lse[..., None])  # [B, H, S, S], rows sum to 1
    out = p.to(v.dtype) @ v_full  # [B, H, S, dh]
    return out, lse


def causal_attention_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv.  dout, q: [B, H, S, dh]; k, v: [B, Hkv, S, dh]; lse: [B, H, S] -> shapes of q, k, v."""
    b, h, s, dh = q.shape
    hkv = k.shape[1]
    r = h // hkv
    scale = 1.0 / math.sqrt(dh)
    acc = stat_dtype(q.dtype)
    k_full = k.repeat_interleave(r, dim=1)  # [B, H, S, dh]
    v_full = v.repeat_interleave(r, dim=1)
    # Recompute P from the saved row statistics.
    scores = (q @ k_full.transpose(-1, -2)).to(acc) * scale  # [B, H, S, S]
    future = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1)
    p = torch.exp(scores.masked_fill(future, -math.inf) - lse[..., None])  # [B, H, S, S]
    dv_full = p.to(dout.dtype).transpose(-1, -2) @ dout  # [B, H, S, dh]
    dp = (dout @ v_full.transpose(-1, -2)).to(acc)  # [B, H, S, S]
    ds = p * (dp - (p * dp).sum(dim=-1, keepdim=True))  # softmax backward: [B, H, S, S]
    ds = (ds * scale).to(q.dtype)
    dq = ds @ k_full  # [B, H, S, dh]
    dk_full = ds.transpose(-1, -2) @ q  # [B, H, S, dh]
    # GQA reduction: each kv head receives the sum over the R query heads that read it.
    dk = dk_full.view(b, hkv, r, s, dh).sum(dim=2)  # [B, Hkv, S, dh]
    dv = dv_full.view(b, hkv, r, s, dh).sum(dim=2)
    return dq, dk, dv


# ------------------------------------------------------------------------------------------------
# Block kernels


def attention_forward(
    x: torch.Tensor,
    g_att: torch.Tensor,
    wq: torch.Tensor,
    wk: torch.Tensor,
    wv: torch.Tensor,
    rope: Rope,
    n_heads: int,
    n_kv_heads: int,
    eps: float,
) -> tuple[torch.Tensor, AttentionTaps]:
    """attn, taps.  x: [B, S, D]; wq: [Dq, D]; wk, wv: [Dkv, D] -> attn: [B, S, Dq]."""
    b, s, _ = x.shape
    dh = wq.shape[0] // n_heads
    xn, rstd = rmsnorm_forward(x, g_att, eps)  # [B, S, D], [B, S, 1]
    q = (xn @ wq.t()).view(b, s, n_heads, dh)  # [B, S, H, dh]
    k = (xn @ wk.t()).view(b, s, n_kv_heads, dh)  # [B, S, Hkv, dh]
    v = (xn @ wv.t()).view(b, s, n_kv_heads, dh)
    q = rope_forward(q, rope.cos[:s], rope.sin[:s]).transpose(1, 2)  # [B, H, S, dh]
    k = rope_forward(k, rope.cos[:s], rope.sin[:s]).transpose(1, 2)  # [B, Hkv, S, dh]
    v = v.transpose(1, 2)  # [B, Hkv, S, dh]
    out, lse = causal_attention_forward(q, k, v)  # [B, H, S, dh], [B, H, S]
    attn = out.transpose(1, 2).reshape(b, s, n_heads * dh)  # [B, S, Dq]
    return attn, AttentionTaps(x=x, rstd=rstd, xn=xn, q=q, k=k, v=v, out=out, lse=lse, attn=attn)


def output_forward(x: torch.Tensor, attn: torch.Tensor, wo: torch.Tensor, alpha: float) -> torch.Tensor:
    """x2 = x + alpha * attn Wo^T.  x: [B, S, D]; attn: [B, S, Dq]; wo: [D, Dq] -> [B, S, D]."""
    o = attn @ wo.t()  # [B, S, D]
    return x + o if alpha == 1.0 else x + alpha * o


def output_backward_dx(
    dx2: torch.Tensor, wo: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """dattn, do.  dx2: [B, S, D]; wo: [D, Dq] -> dattn: [B, S, Dq], do = alpha*dx2: [B, S, D] (for dW of wo).

    The residual's own gradient (dx2 flowing straight to x) is added by the caller.
    """
    do = dx2 if alpha == 1.0 else alpha * dx2  # [B, S, D]
    return do @ wo, do  # [B, S, Dq]


def attention_backward_dx(
    dattn: torch.Tensor,
    taps: AttentionTaps,
    wq: torch.Tensor,
    wk: torch.Tensor,
    wv: torch.Tensor,
    rope: Rope,
) -> tuple[torch.Tensor, AttentionGrads]:
    """dxn, grads.  dattn: [B, S, Dq] -> dxn: [B, S, D] (gradient w.r.t. the normalized input)."""
    b, h, s, dh = taps.q.shape
    hkv = taps.k.shape[1]
    dout = dattn.view(b, s, h, dh).transpose(1, 2)  # [B, H, S, dh]
    dq, dk, dv = causal_attention_backward(dout, taps.q, taps.k, taps.v, taps.lse)
    # Back to token-major and through the inverse rotation.
    dq = rope_backward(dq.transpose(1, 2), rope.cos[:s], rope.sin[:s]).reshape(b, s, h * dh)  # [B, S, Dq]
    dk = rope_backward(dk.transpose(1, 2), rope.cos[:s], rope.sin[:s]).reshape(b, s, hkv * dh)  # [B, S, Dkv]
    dv = dv.transpose(1, 2).reshape(b, s, hkv * dh)  # [B, S, Dkv]
    dxn = dq @ wq + dk @ wk + dv @ wv  # [B, S, D]
    return dxn, AttentionGrads(dq=dq, dk=dk, dv=dv)
