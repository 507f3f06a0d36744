"""The optimized pipeline: the same kernels, scheduled for speed (the original's train_opt, done for CPU/GPU).

What differs from the baseline, and why:

* **16-bit compute, fp32 master.** GEMMs run in bf16 (fp16 with loss scaling where bf16 is not native) on a
  16-bit copy of the weights refreshed once per optimizer step (one cast over the flat buffer), not per
  micro-step as autocast does. The residual stream, norm statistics, softmax and cross-entropy are fp32;
  gradients accumulate in fp32.
* **16-bit taps.** Every activation kept for the backward is stored in the compute dtype.
* **Buffers allocated once.** All activations, taps, gradients and scratch live in a workspace made for the
  first (batch, seq) shape, a typed buffer set whose every tensor is declared with its shape
  (``pipeline/workspace.py``); every operation writes into it (``out=``), so a steady-state 16-bit step does
  not call the allocator (tests check this with torch's profiler). The fp32 path's products come from oneDNN,
  which returns new tensors (``backends/gemm.py``).
* **No zeroing pass.** ``zero_grad`` marks the gradients stale; the next micro-step's dW products overwrite
  them instead of adding (see :meth:`OptimizedPipeline.zero_grad`).
* **Fused layout.** wq/wk/wv and w1/w3 are adjacent in the parameter buffer, so the q/k/v projection and the
  gate/up projection are one GEMM each, forward, dx and dW (see ``anetrain.params``).
* **Concurrent dW.** Weight-gradient GEMMs go to an executor as soon as their operands exist: a worker thread
  on CPU (the intra-op thread budget split between it and the main thread during the backward), a second
  stream on CUDA, or another device (``dw_device``). Each layer's dW operands have their own buffers, so the
  worker never races the dx path.
* **Fused elementwise work**, hand-fused (``anetrain.backends.fused``) or one ``torch.compile``'d kernel per
  stretch between two GEMMs (``anetrain.backends.compiled``), behind one interface (``backends/fusion.py``,
  whose methods read a typed scratch set of their own): RMSNorm with the residual add and the taps, RoPE
  with the head transpose and the query scale folded in, grouped-GEMM attention for GQA, SwiGLU, and a
  chunked cross-entropy that never holds fp32 logits for more than ``loss_chunk`` rows.
* **Fused optimizer.** AdamW is torch's fused multi-tensor kernel over two flat tensors (``anetrain.optim``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import kernels as K
from ..backends import fused
from ..backends.fusion import choose as choose_fusion
from ..backends.gemm import MatMul, blas_threads, torch_matmul
from ..backends.gemm import choose as choose_gemm
from ..data.compaction import VocabCompaction
from ..params import ModelParams
from ..timing import PhaseTimes
from .base import GradReadyHook
from .dw import DeviceDW, SerialDW, StreamDW, ThreadDW
from .workspace import LayerBuffers, Workspace, block_rows, make_workspace, workspace_dims

#: acc (fp32) += src (16-bit), with a flat fp32 scratch buffer (see ``HandFusion.accumulate``)
Accumulate = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class OptimizedPipeline:
    """Implements :class:`anetrain.pipeline.base.Pipeline`; see the module docstring."""

    name = "optimized"

    def __init__(
        self,
        params: ModelParams,
        *,
        dtype: str = "bf16",
        dw_device: str | None = None,
        compaction: VocabCompaction | None = None,
        loss_chunk: int | None = None,
        dw: str = "auto",
        blas: str = "auto",
        fusion: str = "auto",
    ) -> None:
        self.cfg = params.cfg
        self.params = params  # fp32 master
        self.device = params.flat.device
        self.backend = self.device.type
        self.precision = dtype
        self.compute_dtype = DTYPES[dtype]
        self.needs_loss_scaling = dtype == "fp16"
        # fp32 products on the CPU go through oneDNN (else numpy; backends/gemm.py), 16-bit ones through torch
        self.blas, self.mm = choose_gemm(self.compute_dtype, self.device, blas)
        self.grads = params.like()
        self._overwrite = False  # see zero_grad()
        # elementwise work: hand-fused operators or torch.compile'd kernels (backends/fusion.py)
        self.elementwise, self.note = choose_fusion(fusion, self.device)
        self.fusion = self.elementwise.name
        self.times = PhaseTimes()
        self.compaction = compaction
        self.loss_chunk = loss_chunk or 64
        # the compute copy of the weights (the master itself in fp32), and the compacted classifier's rows
        self.w = params if self.compute_dtype == torch.float32 else params.like(self.compute_dtype)
        self.w_cls: torch.Tensor = self.w.classifier
        self._ids: torch.Tensor | None = None  # compacted classifier rows -> vocabulary ids
        self._full_to_compact: torch.Tensor | None = None  # vocabulary ids -> compacted rows
        if compaction is not None:
            self._ids = compaction.ids.to(self.device)
            self._full_to_compact = compaction.full_to_compact.to(self.device)
            self.w_cls = torch.empty(
                self._ids.numel(), self.cfg.dim, dtype=self.compute_dtype, device=self.device
            )
        self.after_update()
        self.ws: Workspace | None = None
        self.grad_ready_hook: GradReadyHook | None = None
        self._buckets = self.grads.buckets()
        cpu_threads = torch.get_num_threads()
        self.dw: SerialDW | ThreadDW | StreamDW | DeviceDW
        if dw_device is not None and torch.device(dw_device) != self.device:
            self.dw = DeviceDW(torch.device(dw_device), self.device)
        elif self.device.type == "cuda":
            self.dw = StreamDW(self.device)
        elif dw == "serial" or (dw == "auto" and cpu_threads < 4):
            # Measured on 2 cores (BENCHMARKS.md): the GEMMs already use both cores well, and splitting them
            # 1+1 between dx and dW was slower than running dW in line. With 4+ cores the worker thread is the
            # default (not measured by the project: this machine has 2); `dw="thread"` forces it.
            self.dw = SerialDW()
        else:
            self.dw = ThreadDW(threads=max(1, cpu_threads // 2))
        # another device accumulates the gradients elsewhere and hands them over at the end of the backward:
        # no bucket is complete in ``grads`` before that, so none is announced
        self.announces_buckets = not isinstance(self.dw, DeviceDW)
        # during the backward the main thread leaves the other half of the cores to the dW worker
        self.backward_threads = (
            max(1, cpu_threads - cpu_threads // 2) if isinstance(self.dw, ThreadDW) else cpu_threads
        )

    # ---- state ---------------------------------------------------------------------------------
    def after_update(self) -> None:
        """Refresh the 16-bit weights (one cast over the flat buffer) and the compacted classifier."""
        if self.w is not self.params:
            self.w.flat.copy_(self.params.flat)
        if self._ids is not None:
            torch.index_select(self.w.classifier, 0, self._ids, out=self.w_cls)

    def zero_grad(self) -> None:
        """Start a new accumulation. Rather than a zeroing pass over every gradient (440 MB for stories110M),
        the first micro-step's weight-gradient products overwrite their gradients; only what is accumulated
        by additions alone is zeroed here: the norm gains, the embedding (rows indexed by tokens; tied to
        the classifier, whose product comes first in a step, it needs none) and a compacted classifier.
        Executors that accumulate elsewhere (``DeviceDW``) get the plain zeroing."""
        if isinstance(self.dw, DeviceDW):
            self.grads.flat.zero_()
            return
        self._overwrite = True
        self.grads.no_decay.zero_()
        if not self.cfg.tied_classifier or self.compaction is not None:
            self.grads.embedding.zero_()
        if self.compaction is not None:
            self.grads.classifier.zero_()

    def close(self) -> None:
        self.dw.close()

    def warmup(self, batch: int, seq: int) -> None:
        """Allocate the workspace for [batch, seq] micro-batches and run one step on a dummy window (of a
        token the possibly compacted classifier knows), then forget its gradients and timings."""
        token = int(self.compaction.ids[0]) if self.compaction is not None else 0
        self.forward_backward(torch.full((batch, seq + 1), token, dtype=torch.long), 1.0)
        self.zero_grad()
        self.times.reset()

    def _workspace(self, batch: int, seq: int) -> Workspace:
        """The workspace for [batch, seq] micro-batches (made anew when the shape changes)."""
        if self.ws is None or (batch, seq) != (self.ws.dims.B, self.ws.dims.S):
            self.ws = None  # the old one's memory is free before the new one is made
            dims = workspace_dims(self.cfg, batch, seq, self.w_cls.shape[0], self.loss_chunk)
            self.ws = make_workspace(
                self.cfg, dims, self.compute_dtype, self.device, self.elementwise, self.compaction is not None
            )
        return self.ws

    # ---- evaluation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def loss(self, window: torch.Tensor) -> float:
        ws = self._workspace(window.shape[0], window.shape[1] - 1)
        with blas_threads(self.blas):
            self._forward(window, ws)
            return float(self._classifier(ws, 1.0, backward=False, first=False))

    # ---- one micro-step ----------------------------------------------------------------------------------
    @torch.no_grad()
    def forward_backward(self, window: torch.Tensor, grad_scale: float = 1.0) -> float:
        b, s1 = window.shape
        ws = self._workspace(b, s1 - 1)
        # this micro-step's products overwrite the gradients when it is the first since zero_grad()
        first, self._overwrite = self._overwrite, False
        dw_busy0 = self.dw.busy_ms
        with blas_threads(self.blas):
            with self.times.phase("forward"):
                self._forward(window, ws)
                loss = self._classifier(ws, grad_scale, backward=True, first=first)
            dw_in_forward = self.dw.busy_ms - dw_busy0  # the classifier's dW job, when it runs in line
            with self.times.phase("backward_dx"):
                self._backward(ws, first)
            self.times.add("wait", self.dw.wait())
        self.dw.flush(self.grads)
        dw_ms = self.dw.busy_ms - dw_busy0
        self.times.add("dw", dw_ms)
        if isinstance(self.dw, SerialDW):  # dW ran inside the other phases: count it once, as dW
            self.times.add("forward", -dw_in_forward)
            self.times.add("backward_dx", -(dw_ms - dw_in_forward))
        return float(loss)

    def _forward(self, window: torch.Tensor, ws: Workspace) -> None:
        cfg, w, p32, mm, elem, s = self.cfg, self.w, self.params, self.mm, self.elementwise, ws.scratch
        alpha, eps = cfg.residual_scale, cfg.norm_eps
        b, seq, n = ws.dims.B, ws.dims.S, ws.dims.N
        ws.tokens.view(b, seq).copy_(window[:, :-1])
        if self._full_to_compact is None:
            ws.targets.view(b, seq).copy_(window[:, 1:])
        else:
            ws.targets_full.view(b, seq).copy_(window[:, 1:])
            torch.index_select(self._full_to_compact, 0, ws.targets_full, out=ws.targets)
        x = ws.x
        torch.index_select(p32.embedding, 0, ws.tokens, out=x.view(n, -1))  # fp32 rows of the master table
        # each block's output joins the residual inside the next norm step (delta: None before the first)
        delta: torch.Tensor | None = None
        for lw, lp, lb in zip(w.layers, p32.layers, ws.layers, strict=True):
            # attention block: x += alpha f; tap x; xn = RMSNorm(x); qkv; RoPE; attention
            elem.norm_tap(x, delta, alpha, lb.x, lp.attention_norm, eps, lb.xn, lb.rstd1, s)
            mm(lb.xn.view(n, -1), lw.qkv.t(), ws.qkv.view(n, -1))
            elem.rope_split(lb.q, lb.k, lb.v, ws.qkv, s)
            self._attention_forward(ws, lb)
            lb.attn.view(b, seq, cfg.n_heads, -1).copy_(ws.out.transpose(1, 2))
            mm(lb.attn.view(n, -1), lw.wo.t(), ws.o.view(n, -1))
            # FFN block: x += alpha o; tap x2; xn2 = RMSNorm(x2); h13; SwiGLU; f
            elem.norm_tap(x, ws.o, alpha, lb.x2, lp.ffn_norm, eps, lb.xn2, lb.rstd2, s)
            mm(lb.xn2.view(n, -1), lw.w13.t(), lb.h13.view(n, -1))
            elem.swiglu(lb.g, lb.h13)
            mm(lb.g.view(n, -1), lw.w2.t(), ws.f.view(n, -1))
            delta = ws.f
        elem.norm_tap(x, delta, alpha, ws.xL, p32.final_norm, eps, ws.xf, ws.rstdf, s)

    def _attention_forward(self, ws: Workspace, lb: LayerBuffers) -> None:
        """out = softmax(q k^T + M) v for all heads, keeping P (16-bit) for the backward.

        q is pre-scaled by 1/sqrt(dh) (RoPE folds it in), so the scores are a plain q k^T. q: [B, H, S, dh]
        is stored as [B, Hkv, R, S, dh] (query head h = kv head h // R), so the R query heads that share a kv
        head stack along the GEMM's M dimension: scores = q[B*Hkv, R*S, dh] @ k[B*Hkv, dh, S] and out = P v,
        with no K/V copies (``fused`` module doc). The softmax (fp32, additive causal mask) is the fusion's.
        """
        b, _, s, dh = lb.q.shape
        g = b * lb.k.shape[1]
        self.mm(lb.q.view(g, -1, dh), lb.k.view(g, s, dh).transpose(1, 2), ws.scores)
        self.elementwise.masked_softmax(lb.p, ws.scores, ws.scratch)
        self.mm(lb.p, lb.v.view(g, s, dh), ws.out.view(g, -1, dh))

    def _classifier(self, ws: Workspace, grad_scale: float, backward: bool, first: bool) -> torch.Tensor:
        """Classifier + cross-entropy; with ``backward``, also dlogits, dxf and the classifier's dW job (whose
        product overwrites the gradient when ``first``, see ``zero_grad``). Returns the mean loss.

        The logits are one GEMM for all N tokens, in the compute dtype, written into the dlogits buffer
        itself; the softmax and cross-entropy then run in fp32 ``loss_chunk`` rows at a time, overwriting
        each chunk of logits with its gradient; dxf is again one GEMM. Big GEMMs run near peak where per-chunk
        ones (K = D small, N = V large) did not, and fp32 logits never exist for more than a chunk.
        """
        n = ws.dims.N
        xf = ws.xf.view(n, -1)
        wc = self.w_cls
        logits = ws.dlogits  # [N, V] in the compute dtype; becomes dlogits chunk by chunk
        self.mm(xf, wc.t(), logits)
        ws.loss.zero_()
        chunk = ws.dims.C
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            self.elementwise.cross_entropy_chunk(
                logits[lo:hi], ws.loss, ws.targets[lo:hi], grad_scale / n, ws.scratch
            )
        if backward:
            self.mm(logits, wc, ws.dxf.view(n, -1))
            accumulate = self.elementwise.accumulate
            if self._ids is None:
                self.dw.submit(
                    _weight_grad,
                    self.grads.classifier,
                    ws.dlogits,
                    xf,
                    ws.mm_cls,
                    ws.acc_scratch,
                    self.mm,
                    accumulate,
                    first,
                )
            else:
                self.dw.submit(
                    _compact_classifier_grad,
                    self.grads.classifier,
                    ws.dlogits,
                    xf,
                    ws.mm_cls,
                    ws.acc_scratch,
                    self._ids,
                    ws.cls_grad,
                    self.mm,
                    accumulate,
                )
        return float(ws.loss) / n  # type: ignore[return-value]

    def _backward(self, ws: Workspace, first: bool) -> None:
        """The dx kernels from the final norm down; dW jobs go to the executor (overwriting if ``first``)."""
        cfg, w, p32, g, mm = self.cfg, self.w, self.params, self.grads, self.mm
        elem, s, acc = self.elementwise, ws.scratch, self.elementwise.accumulate
        alpha = cfg.residual_scale
        b, seq, n = ws.dims.B, ws.dims.S, ws.dims.N
        dy, dx2 = ws.dy, ws.dx2  # fp32 gradients of the residual stream
        submit = self.dw.submit
        buckets = iter(self._buckets)
        threads_before = torch.get_num_threads()
        threads_changed = self.backward_threads < threads_before
        if threads_changed:
            torch.set_num_threads(self.backward_threads)
        try:
            layers = ws.layers
            # final norm: dy = RMSNorm'(dxf); df of the last layer = alpha dy (16-bit, read by its GEMMs)
            elem.norm_backward(
                dy, g.final_norm, None, ws.dxf, ws.xL, ws.rstdf, p32.final_norm, alpha, layers[-1].df, s
            )
            for i in reversed(range(cfg.n_layers)):
                lw, lp, lg, lb = w.layers[i], p32.layers[i], g.layers[i], layers[i]
                # FFN half: dg = df W2; SwiGLU'; dxn2 = dh13 W13; dx2 = dy + RMSNorm'(dxn2); do = alpha dx2
                submit(_weight_grad, lg.w2, lb.df, lb.g, ws.mm_w2, ws.acc_scratch, mm, acc, first)
                mm(lb.df.view(n, -1), lw.w2, ws.dg.view(n, -1))
                elem.swiglu_backward(lb.dh13, ws.dg, lb.h13, s)
                submit(_weight_grad, lg.w13, lb.dh13, lb.xn2, ws.mm_w13, ws.acc_scratch, mm, acc, first)
                mm(lb.dh13.view(n, -1), lw.w13, ws.dxn.view(n, -1))
                elem.norm_backward(
                    dx2, lg.ffn_norm, dy, ws.dxn, lb.x2, lb.rstd2, lp.ffn_norm, alpha, lb.do, s
                )
                # attention half: dattn = do Wo; attention'; RoPE^-1; dxn = dqkv Wqkv;
                # dy = dx2 + RMSNorm'(dxn)
                submit(_weight_grad, lg.wo, lb.do, lb.attn, ws.mm_wo, ws.acc_scratch, mm, acc, first)
                mm(lb.do.view(n, -1), lw.wo, ws.dattn.view(n, -1))
                ws.dout.copy_(ws.dattn.view(b, seq, cfg.n_heads, -1).transpose(1, 2))
                fused.attention_backward_into(
                    ws.dq, ws.dk, ws.dv, ws.dout, lb.p, lb.q, lb.k, lb.v, ws.dp, ws.ds, mm
                )
                elem.rope_merge_backward(lb.dqkv, ws.dq, ws.dk, ws.dv, s)
                submit(_weight_grad, lg.qkv, lb.dqkv, lb.xn, ws.mm_qkv, ws.acc_scratch, mm, acc, first)
                if self.grad_ready_hook is not None and self.announces_buckets:
                    submit(self.grad_ready_hook, next(buckets))  # complete once the jobs above have run
                mm(lb.dqkv.view(n, -1), lw.qkv, ws.dxn.view(n, -1))
                below = layers[i - 1].df if i > 0 else None  # the layer below's df = alpha dy
                elem.norm_backward(
                    dy, lg.attention_norm, dx2, ws.dxn, lb.x, lb.rstd1, lp.attention_norm, alpha, below, s
                )
            # embedding backward on the executor too: with a tied classifier it adds into the same table
            submit(K.embedding_backward, g.embedding, ws.tokens, dy)
            if self.grad_ready_hook is not None and self.announces_buckets:
                for rest in buckets:
                    submit(self.grad_ready_hook, rest)
        finally:
            if threads_changed:
                torch.set_num_threads(threads_before)


# ---- dW jobs (run by the executor; every tensor they touch is an argument, so DeviceDW can stage it) -----
def _weight_grad(
    gw: torch.Tensor,
    dy: torch.Tensor,
    x: torch.Tensor,
    prod: torch.Tensor,
    scratch: torch.Tensor,
    mm: MatMul = torch_matmul,
    accumulate: Accumulate = fused.accumulate_into,
    overwrite: bool = False,
) -> None:
    """gw (fp32) += dy^T x: the product formed in the compute dtype (into ``prod``), accumulated in fp32.
    With ``overwrite`` (the first micro-step after ``zero_grad``), gw = dy^T x: a conversion instead of a
    read-modify-write, and no zeroing pass before it.

    When ``prod`` has fewer rows than gw (the classifier's), the product is formed and accumulated that many
    rows at a time."""
    dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
    rows = prod.shape[0]
    for lo in range(0, gw.shape[0], rows):
        hi = min(gw.shape[0], lo + rows)
        if overwrite and prod.dtype == gw.dtype:
            mm(dy2[:, lo:hi].t(), x2, gw[lo:hi])  # fp32 compute: the product is the gradient
            continue
        mm(dy2[:, lo:hi].t(), x2, prod[: hi - lo])
        if overwrite:
            gw[lo:hi].copy_(prod[: hi - lo])
        else:
            accumulate(gw[lo:hi], prod[: hi - lo], scratch)


def _compact_classifier_grad(
    g_cls: torch.Tensor,
    dlogits: torch.Tensor,
    xf: torch.Tensor,
    prod: torch.Tensor,
    scratch: torch.Tensor,
    ids: torch.Tensor,
    acc: torch.Tensor,
    mm: MatMul = torch_matmul,
    accumulate: Accumulate = fused.accumulate_into,
) -> None:
    """g_cls[ids] += dlogits^T xf: the compact classifier's gradient (formed in ``acc``, overwritten)
    scattered into the full table, which ``zero_grad`` zeroes."""
    _weight_grad(acc, dlogits, xf, prod, scratch, mm, accumulate, overwrite=True)
    g_cls.index_add_(0, ids, acc)


__all__ = ["DTYPES", "OptimizedPipeline", "block_rows"]
