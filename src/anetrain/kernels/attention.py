"""The attention half of a layer: the attention block, the output projection, and their dx kernels.

Forward (x: [B, S, D] is the layer input)::

    xn, rstd = RMSNorm(x; g_att)
    q = xn Wq^T : [B, S, H, dh]      k = xn Wk^T, v = xn Wv^T : [B, S, Hkv, dh]   (+ LoRA: kernels/lora.py)
    q, k = QKNorm(q; g_q), QKNorm(k; g_k)               (QK-norm models: kernels/qk_norm.py)
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
    dq, dk = QKNorm'(dq), QKNorm'(dk)                   (QK-norm; the gains' gradients: separate dW kernels)
    dxn  = dq Wq + dk Wk + dv Wv                        (+ each adapter's du A)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .lora import Adapter, lora_backward_dx, lora_forward
from .norm import rmsnorm_forward, stat_dtype
from .qk_norm import qk_norm_backward_dx, qk_norm_forward
from .rope import Rope, rope_backward, rope_forward

#: the two QK-norm gains (g_q, g_k: [dh] each), or None for a model without QK-norm
QKGains = tuple[torch.Tensor, torch.Tensor] | None


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
    # QK-norm only: the projections before the norm and the norm statistics
    q_raw: torch.Tensor | None = None  # [B, S, H, dh]
    k_raw: torch.Tensor | None = None  # [B, S, Hkv, dh]
    rstd_q: torch.Tensor | None = None  # [B, S, H, 1]
    rstd_k: torch.Tensor | None = None  # [B, S, Hkv, 1]
    # LoRA only: each adapted projection's u = s x A^T ("wq", "wk", "wv"): [B, S, r]
    lora_u: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class AttentionGrads:
    """The gradients of the projections' outputs, for the dW GEMMs (all token-major, pre-RoPE frame)."""

    dq: torch.Tensor  # [B, S, Dq]   of q = xn Wq^T (before QK-norm)
    dk: torch.Tensor  # [B, S, Dkv]
    dv: torch.Tensor  # [B, S, Dkv]
    # QK-norm only: the gradients of the normalized heads (the gains' dW kernel reads them)
    dqn: torch.Tensor | None = None  # [B, S, H, dh]
    dkn: torch.Tensor | None = None  # [B, S, Hkv, dh]
    # LoRA only: each adapter's du = s dy B: [B, S, r]
    lora_du: dict[str, torch.Tensor] = field(default_factory=dict)


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


def _project(
    xn: torch.Tensor, w: torch.Tensor, name: str, lora: dict[str, Adapter] | None, taps_u: dict
) -> torch.Tensor:
    """xn W^T, plus the adapter's u B^T when ``name`` is adapted (its u kept in ``taps_u``)."""
    y = xn @ w.t()
    if lora and name in lora:
        delta, taps_u[name] = lora_forward(xn, lora[name])
        y = y + delta
    return y


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
    qk_gains: QKGains = None,
    lora: dict[str, Adapter] | None = None,
) -> tuple[torch.Tensor, AttentionTaps]:
    """attn, taps.  x: [B, S, D]; wq: [Dq, D]; wk, wv: [Dkv, D] -> attn: [B, S, Dq].

    ``qk_gains``: (g_q, g_k) of a QK-norm model; ``lora``: adapters of "wq", "wk", "wv" (any of them)."""
    b, s, _ = x.shape
    dh = wq.shape[0] // n_heads
    us: dict[str, torch.Tensor] = {}
    xn, rstd = rmsnorm_forward(x, g_att, eps)  # [B, S, D], [B, S, 1]
    q = _project(xn, wq, "wq", lora, us).view(b, s, n_heads, dh)  # [B, S, H, dh]
    k = _project(xn, wk, "wk", lora, us).view(b, s, n_kv_heads, dh)  # [B, S, Hkv, dh]
    v = _project(xn, wv, "wv", lora, us).view(b, s, n_kv_heads, dh)
    q_raw = k_raw = rstd_q = rstd_k = None
    if qk_gains is not None:
        q_raw, k_raw = q, k
        q, rstd_q = qk_norm_forward(q, qk_gains[0], eps)  # [B, S, H, dh], [B, S, H, 1]
        k, rstd_k = qk_norm_forward(k, qk_gains[1], eps)  # [B, S, Hkv, dh], [B, S, Hkv, 1]
    q = rope_forward(q, rope.cos[:s], rope.sin[:s]).transpose(1, 2)  # [B, H, S, dh]
    k = rope_forward(k, rope.cos[:s], rope.sin[:s]).transpose(1, 2)  # [B, Hkv, S, dh]
    v = v.transpose(1, 2)  # [B, Hkv, S, dh]
    out, lse = causal_attention_forward(q, k, v)  # [B, H, S, dh], [B, H, S]
    attn = out.transpose(1, 2).reshape(b, s, n_heads * dh)  # [B, S, Dq]
    taps = AttentionTaps(
        x=x,
        rstd=rstd,
        xn=xn,
        q=q,
        k=k,
        v=v,
        out=out,
        lse=lse,
        attn=attn,
        q_raw=q_raw,
        k_raw=k_raw,
        rstd_q=rstd_q,
        rstd_k=rstd_k,
        lora_u=us,
    )
    return attn, taps


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
    qk_gains: QKGains = None,
    lora: dict[str, Adapter] | None = None,
) -> tuple[torch.Tensor, AttentionGrads]:
    """dxn, grads.  dattn: [B, S, Dq] -> dxn: [B, S, D] (gradient w.r.t. the normalized input)."""
    b, h, s, dh = taps.q.shape
    hkv = taps.k.shape[1]
    dout = dattn.view(b, s, h, dh).transpose(1, 2)  # [B, H, S, dh]
    dq, dk, dv = causal_attention_backward(dout, taps.q, taps.k, taps.v, taps.lse)
    # Back to token-major and through the inverse rotation.
    dq = rope_backward(dq.transpose(1, 2), rope.cos[:s], rope.sin[:s])  # [B, S, H, dh]
    dk = rope_backward(dk.transpose(1, 2), rope.cos[:s], rope.sin[:s])  # [B, S, Hkv, dh]
    dqn = dkn = None
    if qk_gains is not None:
        assert taps.q_raw is not None and taps.k_raw is not None
        assert taps.rstd_q is not None and taps.rstd_k is not None
        dqn, dkn = dq, dk
        dq = qk_norm_backward_dx(dqn, taps.q_raw, taps.rstd_q, qk_gains[0])  # [B, S, H, dh]
        dk = qk_norm_backward_dx(dkn, taps.k_raw, taps.rstd_k, qk_gains[1])  # [B, S, Hkv, dh]
    dq = dq.reshape(b, s, h * dh)  # [B, S, Dq]
    dk = dk.reshape(b, s, hkv * dh)  # [B, S, Dkv]
    dv = dv.transpose(1, 2).reshape(b, s, hkv * dh)  # [B, S, Dkv]
    dxn = dq @ wq + dk @ wk + dv @ wv  # [B, S, D]
    dus: dict[str, torch.Tensor] = {}
    for name, d in (("wq", dq), ("wk", dk), ("wv", dv)):
        if lora and name in lora:
            dx_l, dus[name] = lora_backward_dx(d, lora[name])
            dxn = dxn + dx_l
    return dxn, AttentionGrads(dq=dq, dk=dk, dv=dv, dqn=dqn, dkn=dkn, lora_du=dus)
