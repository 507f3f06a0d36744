"""Two ways to run the optimized pipeline's elementwise work, behind one interface: hand fusion (torch
operators writing into preallocated buffers, ``backends/fused.py``) and compiled fusion (``torch.compile``'d
kernels, ``backends/compiled.py``). The pipeline calls the same methods either way; what a step computes does
not change, only how many passes over memory it takes (and the 16-bit roundings in between: see
``backends/compiled.py``).

Each method names the stretch of the layer it covers. Besides its arguments it reads and writes one typed
buffer set, :class:`FusionScratch` (its temporaries and the attention's constant tables), which the pipeline
allocates once per (batch, seq) with :func:`make_scratch`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..kernels.rope import Rope
from . import compiled, fused
from .buffers import FP32, INT64, Dims, allocate, buf

FUSIONS = ("auto", "compile", "hand")


@dataclass
class AttentionTables:
    """The attention's constants for one sequence length S (head dim dh)."""

    mask: torch.Tensor  # [S, S] fp32: 0 on and below the diagonal, -inf above (additive causal mask)
    fq: torch.Tensor  # [S, 1, dh/2] complex64: RoPE's rotation factors for q, times 1/sqrt(dh)
    fk: torch.Tensor  # [S, 1, dh/2] complex64: the rotation factors for k
    fq_conj: torch.Tensor  # [S, 1, dh/2] complex64: the inverse rotations (the backward's), q's scale kept
    fk_conj: torch.Tensor  # [S, 1, dh/2] complex64
    cos_q: torch.Tensor  # [S, 1, dh/2] fp32: fq as real tables (the compiled kernels'), likewise below
    sin_q: torch.Tensor
    cos_k: torch.Tensor
    sin_k: torch.Tensor


def attention_tables(seq: int, head_dim: int, theta: float, device: torch.device) -> AttentionTables:
    """The causal mask and RoPE tables for sequences of ``seq`` tokens (positions 0..seq-1): only the
    sequence trained on, however long the model's seq_len (each position's angles are computed on their
    own, so the tables do not depend on their length)."""
    rope = Rope.build(seq, head_dim, theta, torch.float32, device)
    fq, fk = fused.rope_tables(rope.cos[:seq], rope.sin[:seq], 1.0 / head_dim**0.5)
    above = torch.ones(seq, seq, dtype=torch.bool, device=device).triu(1)
    return AttentionTables(
        mask=torch.zeros(seq, seq, device=device).masked_fill(above, float("-inf")),
        fq=fq,
        fk=fk,
        fq_conj=fq.conj().resolve_conj(),
        fk_conj=fk.conj().resolve_conj(),
        cos_q=fq.real.contiguous(),
        sin_q=fq.imag.contiguous(),
        cos_k=fk.real.contiguous(),
        sin_k=fk.imag.contiguous(),
    )


@dataclass
class FusionScratch:
    """The fusions' temporaries for one (B, S): compute dtype unless marked; hand = hand fusion only."""

    tables: AttentionTables
    tmp: torch.Tensor = buf("B S D", FP32)  # RMSNorm forward and backward scratch
    tmp2: torch.Tensor = buf("B S D", FP32)
    tmp3: torch.Tensor = buf("B S D", FP32)
    proj: torch.Tensor = buf("B S 1", FP32)  # RMSNorm backward: mean(dxhat * xhat)
    dg_tmp: torch.Tensor = buf("D", FP32)  # RMSNorm backward: this call's gain gradient
    qkv32: torch.Tensor = buf("B S Dqkv", FP32, only="hand")  # RoPE: the projection in fp32
    rot32: torch.Tensor = buf("B S H dh", FP32)  # RoPE forward and backward: rotated pairs
    d32: torch.Tensor = buf("B S H dh", FP32)  # RoPE backward: dq / dk token-major
    scores32: torch.Tensor = buf("B*Hkv R*S S", FP32, only="hand")  # softmax in fp32
    gtmp: torch.Tensor = buf("B S F", only="hand")  # SwiGLU backward
    probs: torch.Tensor = buf("C V", FP32, only="hand")  # cross-entropy: one chunk's probabilities
    picked: torch.Tensor = buf("C 1", FP32, only="hand")  # cross-entropy: log p[target] per row
    picked_sum: torch.Tensor = buf("", FP32, only="hand")
    flat_idx: torch.Tensor = buf("C", INT64, only="hand")  # cross-entropy: row * V + target
    row_base: torch.Tensor = buf("C", INT64, only="hand")  # = arange(C) * V
    minus_one: torch.Tensor = buf("C", FP32, only="hand")  # = -1 (the one-hot's subtraction)
    grad_scale: torch.Tensor = buf("", FP32, only="compile")  # cross-entropy's scale as a tensor
    # QK-norm (forward and backward): the q and k heads in fp32, their statistics, a gain's gradient
    qk_a: torch.Tensor = buf("B S Hqk dh", FP32, only="qknorm")
    qk_b: torch.Tensor = buf("B S Hqk dh", FP32, only="qknorm")
    qk_c: torch.Tensor = buf("B S Hqk dh", FP32, only="qknorm")
    qk_proj: torch.Tensor = buf("B S Hqk 1", FP32, only="qknorm")
    qk_dg: torch.Tensor = buf("dh", FP32, only="qknorm")


class HandFusion:
    """Torch operators into preallocated buffers (no compilation, runs anywhere)."""

    name = "hand"

    def make_scratch(
        self,
        dims: Dims,
        compute: torch.dtype,
        tables: AttentionTables,
        features: frozenset[str] = frozenset(),
    ) -> FusionScratch:
        s = allocate(FusionScratch, dims, compute, tables.mask.device, features | {self.name}, tables=tables)
        torch.arange(dims.C, out=s.row_base).mul_(dims.V)
        s.minus_one.fill_(-1.0)
        return s

    def norm_tap(
        self,
        x: torch.Tensor,
        delta: torch.Tensor | None,
        alpha: float,
        tap: torch.Tensor,
        g: torch.Tensor,
        eps: float,
        y: torch.Tensor,
        rstd: torch.Tensor,
        s: FusionScratch,
    ) -> None:
        """x += alpha * delta (when given: the block output joins the fp32 residual); tap = x (16-bit);
        y = RMSNorm(x) * g; rstd kept for the backward."""
        if delta is not None:
            s.tmp.copy_(delta)
            x.add_(s.tmp, alpha=alpha)
        tap.copy_(x)
        fused.rmsnorm_forward_into(y, rstd, x, g, eps, s.tmp)

    def rope_split(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qkv: torch.Tensor, s: FusionScratch
    ) -> None:
        fused.rope_split_into(q, k, v, qkv, (s.tables.fq, s.tables.fk), s.qkv32, s.rot32)

    def qk_norm(
        self,
        qkv: torch.Tensor,
        raw: torch.Tensor,
        rstd: torch.Tensor,
        gq: torch.Tensor,
        gk: torch.Tensor,
        eps: float,
        s: FusionScratch,
    ) -> None:
        """QK-norm in place on the q and k columns of the projection qkv; raw and rstd kept (taps)."""
        fused.qk_norm_forward_into(qkv, raw, rstd, gq, gk, eps, s.qk_a, s.qk_b)

    def qk_norm_backward(
        self,
        dqkv: torch.Tensor,
        raw: torch.Tensor,
        rstd: torch.Tensor,
        gq: torch.Tensor,
        gk: torch.Tensor,
        dgq: torch.Tensor | None,
        dgk: torch.Tensor | None,
        s: FusionScratch,
    ) -> None:
        """The q and k columns of dqkv, w.r.t. the normalized heads, become w.r.t. the raw projection; the
        gains' gradients are added into dgq, dgk (skipped when None: frozen gains)."""
        fused.qk_norm_backward_into(
            dqkv, raw, rstd, gq, gk, dgq, dgk, (s.qk_a, s.qk_b, s.qk_c), s.qk_proj, s.qk_dg
        )

    def masked_softmax(self, p: torch.Tensor, scores: torch.Tensor, s: FusionScratch) -> None:
        seq = s.tables.mask.shape[0]
        s.scores32.copy_(scores)
        s.scores32.unflatten(1, (-1, seq)).add_(s.tables.mask)
        torch.ops.aten._softmax.out(s.scores32, -1, False, out=s.scores32)
        p.copy_(s.scores32)

    def swiglu(self, g: torch.Tensor, h13: torch.Tensor) -> None:
        fused.swiglu_forward_into(g, h13)

    def cross_entropy_chunk(
        self,
        logits: torch.Tensor,
        loss: torch.Tensor,
        targets: torch.Tensor,
        grad_scale: float,
        s: FusionScratch,
        weights: torch.Tensor | None = None,
    ) -> None:
        """loss += the chunk's summed cross-entropy; logits [c, V] (16-bit) are overwritten with their
        gradient (softmax - onehot) * grad_scale. ``weights`` ([c] fp32, a loss mask): each row's loss and
        gradient times its weight."""
        c = logits.shape[0]
        fused.cross_entropy_chunk_into(
            logits,
            loss,
            logits,
            targets,
            grad_scale,
            s.probs[:c],
            s.picked[:c],
            s.picked_sum,
            s.flat_idx[:c],
            s.row_base[:c],
            s.minus_one[:c],
            weights,
        )

    def norm_backward(
        self,
        dx: torch.Tensor,
        dg_acc: torch.Tensor | None,
        dres: torch.Tensor | None,
        dxn: torch.Tensor,
        x: torch.Tensor,
        rstd: torch.Tensor,
        g: torch.Tensor,
        alpha: float,
        dscaled: torch.Tensor | None,
        s: FusionScratch,
    ) -> None:
        """dx = dres + RMSNorm'(dxn) (dres absent: zero); dg_acc += the gain's gradient (None: a frozen gain,
        not computed); dscaled = alpha * dx rounded to 16 bits (when given: the gradient of the block below's
        output)."""
        if dres is None:
            dx.zero_()
        else:
            dx.copy_(dres)
        fused.rmsnorm_backward_into(dx, dg_acc, dxn, x, rstd, g, (s.tmp, s.tmp2, s.tmp3), s.proj, s.dg_tmp)
        if dscaled is not None:
            if alpha == 1.0:
                dscaled.copy_(dx)
            else:
                torch.mul(dx, alpha, out=s.tmp)
                dscaled.copy_(s.tmp)

    def swiglu_backward(
        self, dh13: torch.Tensor, dg: torch.Tensor, h13: torch.Tensor, s: FusionScratch
    ) -> None:
        fused.swiglu_backward_into(dh13, dg, h13, s.gtmp)

    def rope_merge_backward(
        self, dqkv: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, s: FusionScratch
    ) -> None:
        fused.rope_merge_backward_into(dqkv, dq, dk, dv, (s.tables.fq_conj, s.tables.fk_conj), s.d32, s.rot32)

    def accumulate(self, acc: torch.Tensor, src: torch.Tensor, scratch: torch.Tensor) -> None:
        fused.accumulate_into(acc, src, scratch)


class CompiledFusion(HandFusion):
    """The same steps as :class:`HandFusion`, each one torch.compile'd kernel (``backends/compiled.py``)."""

    name = "compile"

    def make_scratch(
        self,
        dims: Dims,
        compute: torch.dtype,
        tables: AttentionTables,
        features: frozenset[str] = frozenset(),
    ) -> FusionScratch:
        return allocate(
            FusionScratch, dims, compute, tables.mask.device, features | {self.name}, tables=tables
        )

    def norm_tap(
        self,
        x: torch.Tensor,
        delta: torch.Tensor | None,
        alpha: float,
        tap: torch.Tensor,
        g: torch.Tensor,
        eps: float,
        y: torch.Tensor,
        rstd: torch.Tensor,
        s: FusionScratch,
    ) -> None:
        if delta is None:
            compiled.norm_tap(x, tap, g, eps, y, rstd)
        else:
            compiled.residual_norm_tap(x, delta, alpha, tap, g, eps, y, rstd)

    def rope_split(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qkv: torch.Tensor, s: FusionScratch
    ) -> None:
        t = s.tables
        compiled.rope_split(q, k, v, qkv, t.cos_q, t.sin_q, t.cos_k, t.sin_k)

    def masked_softmax(self, p: torch.Tensor, scores: torch.Tensor, s: FusionScratch) -> None:
        compiled.masked_softmax(p, scores, s.tables.mask)

    def swiglu(self, g: torch.Tensor, h13: torch.Tensor) -> None:
        compiled.swiglu(g, h13)

    def cross_entropy_chunk(
        self,
        logits: torch.Tensor,
        loss: torch.Tensor,
        targets: torch.Tensor,
        grad_scale: float,
        s: FusionScratch,
        weights: torch.Tensor | None = None,
    ) -> None:
        s.grad_scale.fill_(grad_scale)
        if weights is None:
            compiled.cross_entropy_chunk(logits, loss, targets, s.grad_scale)
        else:
            compiled.weighted_cross_entropy_chunk(logits, loss, targets, s.grad_scale, weights)

    def norm_backward(
        self,
        dx: torch.Tensor,
        dg_acc: torch.Tensor | None,
        dres: torch.Tensor | None,
        dxn: torch.Tensor,
        x: torch.Tensor,
        rstd: torch.Tensor,
        g: torch.Tensor,
        alpha: float,
        dscaled: torch.Tensor | None,
        s: FusionScratch,
    ) -> None:
        if dg_acc is None:  # a frozen gain: its gradient goes to scratch
            dg_acc = s.dg_tmp
        if dres is None and dscaled is None:
            compiled.norm_backward(dx, dg_acc, dxn, x, rstd, g)
        elif dres is not None and dscaled is not None:
            compiled.residual_norm_backward(dx, dg_acc, dres, dxn, x, rstd, g, alpha, dscaled)
        else:  # the final norm (no residual gradient yet) and the first layer's (no layer below): hand-fused
            super().norm_backward(dx, dg_acc, dres, dxn, x, rstd, g, alpha, dscaled, s)

    def swiglu_backward(
        self, dh13: torch.Tensor, dg: torch.Tensor, h13: torch.Tensor, s: FusionScratch
    ) -> None:
        compiled.swiglu_backward(dh13, dg, h13)

    # rope_merge_backward stays hand-fused: an Inductor kernel for it (the transposes and a concatenation)
    # measured slower than the complex multiply into place (3.7 vs 2.6 ms per stories110M step)

    def accumulate(self, acc: torch.Tensor, src: torch.Tensor, scratch: torch.Tensor) -> None:
        if src.dtype == acc.dtype:
            acc.add_(src)
        else:
            compiled.accumulate(acc, src)


def choose(fusion: str, device: torch.device) -> tuple[HandFusion, str]:
    """The fusion for ``fusion``, and a note saying why "auto" fell back to hand fusion (empty otherwise).

    "auto" is hand fusion on CPU and compiled fusion on CUDA. On the 2-core development CPU the compiled
    kernels were not measurably faster per step (stories110M: 253 vs 255 ms, alternating in one process;
    stories15M batch 8: within noise): there the GEMMs take ~85% of a step and the elementwise work is a few
    passes over L2-sized tensors either way; and importing and running the compiler adds ~120 MB of resident
    memory, which breaks stories110M's 2.5 GB budget. On a GPU, where hand fusion means ~1,000 small kernel
    launches per step, fusing them is what pays (not measured: no GPU was lent to this project)."""
    if fusion not in FUSIONS:
        raise ConfigError(f"unknown fusion {fusion!r} (choose from {', '.join(FUSIONS)})")
    if fusion == "hand" or (fusion == "auto" and device.type == "cpu"):
        return HandFusion(), ""
    ok, why = compiled.available(device)
    if ok:
        return CompiledFusion(), ""
    if fusion == "compile":
        raise ConfigError(f"--fusion compile: {why}")
    return HandFusion(), f"compiled fusion unavailable ({why}); using hand fusion"
