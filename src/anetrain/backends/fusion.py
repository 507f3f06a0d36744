"""Two ways to run the optimized pipeline's elementwise work, behind one interface: hand fusion (torch
operators writing into the workspace, ``backends/fused.py``) and compiled fusion (``torch.compile``'d kernels,
``backends/compiled.py``). The pipeline calls the same methods either way; what a step computes does not
change, only how many passes over memory it takes (and the 16-bit roundings in between: see
``backends/compiled.py``).

Each method names the stretch of the layer it covers; ``ws`` is the pipeline's workspace (its scratch tensors:
``tmp``/``tmp2``/``tmp3`` [B, S, D] fp32, ``proj`` [B, S, 1], ``dg_tmp`` [D], ...).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError
from . import compiled as C
from . import fused as F

FUSIONS = ("auto", "compile", "hand")


class HandFusion:
    """Torch operators into preallocated buffers (no compilation, runs anywhere)."""

    name = "hand"

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
        ws: Any,
    ) -> None:
        """x += alpha * delta (when given: the block output joins the fp32 residual); tap = x (16-bit);
        y = RMSNorm(x) * g; rstd kept for the backward."""
        if delta is not None:
            ws.tmp.copy_(delta)
            x.add_(ws.tmp, alpha=alpha)
        tap.copy_(x)
        F.rmsnorm_forward_into(y, rstd, x, g, eps, ws.tmp)

    def rope_split(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qkv: torch.Tensor, ws: Any
    ) -> None:
        F.rope_split_into(q, k, v, qkv, (ws.fq, ws.fk), ws.qkv32, ws.rot32)

    def masked_softmax(self, p: torch.Tensor, scores: torch.Tensor, ws: Any) -> None:
        s = ws.mask.shape[0]
        ws.scores32.copy_(scores)
        ws.scores32.unflatten(1, (-1, s)).add_(ws.mask)
        torch.ops.aten._softmax.out(ws.scores32, -1, False, out=ws.scores32)
        p.copy_(ws.scores32)

    def swiglu(self, g: torch.Tensor, h13: torch.Tensor) -> None:
        F.swiglu_forward_into(g, h13)

    def cross_entropy_chunk(
        self, logits: torch.Tensor, loss: torch.Tensor, targets: torch.Tensor, grad_scale: float, ws: Any
    ) -> None:
        """loss += the chunk's summed cross-entropy; logits [c, V] (16-bit) are overwritten with their
        gradient (softmax - onehot) * grad_scale."""
        c = logits.shape[0]
        F.cross_entropy_chunk_into(
            logits,
            loss,
            logits,
            targets,
            grad_scale,
            ws.probs[:c],
            ws.picked[:c],
            ws.picked_sum,
            ws.flat_idx[:c],
            ws.row_base[:c],
            ws.minus_one[:c],
        )

    def norm_backward(
        self,
        dx: torch.Tensor,
        dg_acc: torch.Tensor,
        dres: torch.Tensor | None,
        dxn: torch.Tensor,
        x: torch.Tensor,
        rstd: torch.Tensor,
        g: torch.Tensor,
        alpha: float,
        dscaled: torch.Tensor | None,
        ws: Any,
    ) -> None:
        """dx = dres + RMSNorm'(dxn) (dres absent: zero); dg_acc += the gain's gradient; dscaled = alpha * dx
        rounded to 16 bits (when given: the gradient of the block below's output)."""
        if dres is None:
            dx.zero_()
        else:
            dx.copy_(dres)
        F.rmsnorm_backward_into(dx, dg_acc, dxn, x, rstd, g, (ws.tmp, ws.tmp2, ws.tmp3), ws.proj, ws.dg_tmp)
        if dscaled is not None:
            if alpha == 1.0:
                dscaled.copy_(dx)
            else:
                torch.mul(dx, alpha, out=ws.tmp)
                dscaled.copy_(ws.tmp)

    def swiglu_backward(self, dh13: torch.Tensor, dg: torch.Tensor, h13: torch.Tensor, ws: Any) -> None:
        F.swiglu_backward_into(dh13, dg, h13, ws.gtmp)

    def rope_merge_backward(
        self, dqkv: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, ws: Any
    ) -> None:
        F.rope_merge_backward_into(dqkv, dq, dk, dv, (ws.fq_conj, ws.fk_conj), ws.d32, ws.rot32)

    def accumulate(self, acc: torch.Tensor, src: torch.Tensor, scratch: torch.Tensor) -> None:
        F.accumulate_into(acc, src, scratch)


class CompiledFusion(HandFusion):
    """The same steps as :class:`HandFusion`, each one torch.compile'd kernel (``backends/compiled.py``)."""

    name = "compile"

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
        ws: Any,
    ) -> None:
        if delta is None:
            C.norm_tap(x, tap, g, eps, y, rstd)
        else:
            C.residual_norm_tap(x, delta, alpha, tap, g, eps, y, rstd)

    def rope_split(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qkv: torch.Tensor, ws: Any
    ) -> None:
        C.rope_split(q, k, v, qkv, ws.cos_q, ws.sin_q, ws.cos_k, ws.sin_k)

    def masked_softmax(self, p: torch.Tensor, scores: torch.Tensor, ws: Any) -> None:
        C.masked_softmax(p, scores, ws.mask)

    def swiglu(self, g: torch.Tensor, h13: torch.Tensor) -> None:
        C.swiglu(g, h13)

    def cross_entropy_chunk(
        self, logits: torch.Tensor, loss: torch.Tensor, targets: torch.Tensor, grad_scale: float, ws: Any
    ) -> None:
        ws.grad_scale.fill_(grad_scale)
        C.cross_entropy_chunk(logits, loss, targets, ws.grad_scale)

    def norm_backward(
        self,
        dx: torch.Tensor,
        dg_acc: torch.Tensor,
        dres: torch.Tensor | None,
        dxn: torch.Tensor,
        x: torch.Tensor,
        rstd: torch.Tensor,
        g: torch.Tensor,
        alpha: float,
        dscaled: torch.Tensor | None,
        ws: Any,
    ) -> None:
        if dres is None and dscaled is None:
            C.norm_backward(dx, dg_acc, dxn, x, rstd, g)
        elif dres is not None and dscaled is not None:
            C.residual_norm_backward(dx, dg_acc, dres, dxn, x, rstd, g, alpha, dscaled)
        else:  # not a combination the pipeline uses
            super().norm_backward(dx, dg_acc, dres, dxn, x, rstd, g, alpha, dscaled, ws)

    def swiglu_backward(self, dh13: torch.Tensor, dg: torch.Tensor, h13: torch.Tensor, ws: Any) -> None:
        C.swiglu_backward(dh13, dg, h13)

    # rope_merge_backward stays hand-fused: an Inductor kernel for it (the transposes and a concatenation)
    # measured slower than the complex multiply into place (3.7 vs 2.6 ms per stories110M step)

    def accumulate(self, acc: torch.Tensor, src: torch.Tensor, scratch: torch.Tensor) -> None:
        if src.dtype == acc.dtype:
            acc.add_(src)
        else:
            C.accumulate(acc, src)


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
    ok, why = C.available(device)
    if ok:
        return CompiledFusion(), ""
    if fusion == "compile":
        raise ConfigError(f"--fusion compile: {why}")
    return HandFusion(), f"compiled fusion unavailable ({why}); using hand fusion"
