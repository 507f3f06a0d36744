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

QK-norm models (Qwen3) normalize each head of the q/k projection's output in fp32 (rounded once into the
16-bit qkv buffer that RoPE then reads), keeping the raw heads and their 1/rms for the backward.

**LoRA** (``lora``: the adapters; ``params`` is then the frozen base, in any dtype): the base is kept once, in
the compute dtype (no fp32 master, no gradients, no optimizer state; fp32 copies of its norm gains only), and
``params``/``grads`` are the adapters' (fp32 master, 16-bit compute copy). Every projection adds its adapters'
u B^T after its GEMM (one GEMM for the stacked A's of a fused group: u = s x [A_q; A_k; A_v]^T), the dx chain
adds du A after its frozen GEMM, and the dW executor forms only the adapters' products (gB = dy^T u,
gA = du^T x): the frozen weights' dW GEMMs, a third of a step's matrix work, the norm gains' and embedding's
gradients and the classifier's dW are never computed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import kernels as K
from ..backends import fused
from ..backends.fusion import choose as choose_fusion
from ..backends.gemm import MatMul, blas_threads, torch_matmul
from ..backends.gemm import choose as choose_gemm
from ..config import ModelConfig
from ..data.compaction import VocabCompaction
from ..errors import ConfigError
from ..lora import GROUPS, LoraParams, io_dims
from ..params import FlatParams, ModelParams
from ..timing import PhaseTimes
from .base import GradReadyHook
from .dw import DeviceDW, SerialDW, StreamDW, ThreadDW
from .workspace import LayerBuffers, Workspace, block_rows, make_workspace, workspace_dims

#: acc (fp32) += src (16-bit), with a flat fp32 scratch buffer (see ``HandFusion.accumulate``)
Accumulate = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class LoraGroup:
    """One layer's adapters on one fused projection group (qkv, wo, w13 or w2): the stacked A's of its
    adapted members and each member's B with the output columns it adds to; compute copies and the fp32
    gradients they accumulate into (views of the flat buffers)."""

    a: torch.Tensor  # [k r, in]  compute dtype
    bs: list[torch.Tensor]  # [out_j, r] each
    segs: list[tuple[int, int]]  # output columns of member j in the group's fused output
    ga: torch.Tensor  # [k r, in] fp32 gradient
    gbs: list[torch.Tensor]  # [out_j, r] fp32 gradients


def lora_groups(
    cfg: ModelConfig, lw: LoraParams, grads: LoraParams, layer: int
) -> dict[str, LoraGroup | None]:
    """The adapters of ``layer`` per projection group (None for a group without adapted members)."""
    out: dict[str, LoraGroup | None] = {}
    r = lw.lora.rank
    for group, members in GROUPS.items():
        a = lw.stacked_a(layer, group)
        ga = grads.stacked_a(layer, group)
        if a is None or ga is None:
            out[group] = None
            continue
        bs, gbs, segs = [], [], []
        lo = 0
        for m in members:
            width = io_dims(cfg, m)[1]
            if m in lw.lora.targets:
                ad, gad = lw.adapters(layer)[m], grads.adapters(layer)[m]
                bs.append(ad.b)
                gbs.append(gad.b)
                segs.append((lo, lo + width))
            lo += width
        assert a.shape[0] == r * len(bs)
        out[group] = LoraGroup(a, bs, segs, ga, gbs)
    return out


class OptimizedPipeline:
    """Implements :class:`anetrain.pipeline.base.Pipeline`; see the module docstring."""

    name = "optimized"

    def __init__(
        self,
        params: ModelParams,
        *,
        lora: LoraParams | None = None,
        dtype: str = "bf16",
        dw_device: str | None = None,
        compaction: VocabCompaction | None = None,
        loss_chunk: int | None = None,
        dw: str = "auto",
        blas: str = "auto",
        fusion: str = "auto",
    ) -> None:
        self.cfg = params.cfg
        self.device = params.flat.device
        self.backend = self.device.type
        self.precision = dtype
        self.compute_dtype = DTYPES[dtype]
        self.needs_loss_scaling = dtype == "fp16"
        # fp32 products on the CPU go through oneDNN (else numpy; backends/gemm.py), 16-bit ones through torch
        self.blas, self.mm = choose_gemm(self.compute_dtype, self.device, blas)
        self.lora = lora
        if lora is None:
            self.params: FlatParams = params  # fp32 master
            # the compute copy of the weights (the master itself in fp32)
            self.w = params if self.compute_dtype == torch.float32 else params.like(self.compute_dtype)
            self.g32: ModelParams = params  # fp32 norm gains and embedding rows
            self.lw: LoraParams | None = None
        else:
            if dw_device is not None:
                raise ConfigError("--dw-device is not supported with LoRA (the adapters' products are small)")
            # the frozen base in the compute dtype, once; fp32 copies of its norm gains; the adapters train
            self.w = params if params.flat.dtype == self.compute_dtype else params.to(self.compute_dtype)
            self.g32 = params.gains(torch.float32)
            self.params = lora
            lora.base = self.w
            self.lw = lora if self.compute_dtype == torch.float32 else lora.like(self.compute_dtype)
        self.grads = self.params.like()
        self._groups: list[dict[str, LoraGroup | None]] = []
        if self.lw is not None:
            assert isinstance(self.grads, LoraParams)
            self._groups = [lora_groups(self.cfg, self.lw, self.grads, i) for i in range(self.cfg.n_layers)]
        self._overwrite = False  # see zero_grad()
        # elementwise work: hand-fused operators or torch.compile'd kernels (backends/fusion.py)
        self.elementwise, self.note = choose_fusion(fusion, self.device)
        self.fusion = self.elementwise.name
        self.times = PhaseTimes()
        self.compaction = compaction
        self.loss_chunk = loss_chunk or 64
        # the compacted classifier's rows
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
        """Refresh the 16-bit weights (one cast over the flat buffer; with LoRA, the adapters') and the
        compacted classifier."""
        if self.lw is not None:
            if self.lw is not self.params:
                self.lw.flat.copy_(self.params.flat)
        elif self.w is not self.params:
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
        if self.lora is not None:  # every adapter gradient is one product per micro-step: all overwritten
            return
        assert isinstance(self.grads, ModelParams)
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
            lc = self.lora.lora if self.lora is not None else None
            dims = workspace_dims(self.cfg, batch, seq, self.w_cls.shape[0], self.loss_chunk, lc)
            self.ws = make_workspace(
                self.cfg, dims, self.compute_dtype, self.device, self.elementwise, self.compaction is not None
            )
        return self.ws

    # ---- evaluation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def loss(self, window: torch.Tensor, loss_mask: torch.Tensor | None = None) -> float:
        ws = self._workspace(window.shape[0], window.shape[1] - 1)
        with blas_threads(self.blas):
            self._forward(window, ws)
            return float(self._classifier(ws, 1.0, backward=False, first=False, mask=loss_mask))

    # ---- one micro-step ----------------------------------------------------------------------------------
    @torch.no_grad()
    def forward_backward(
        self, window: torch.Tensor, grad_scale: float = 1.0, loss_mask: torch.Tensor | None = None
    ) -> float:
        """Forward and backward of a [B, S+1] window batch; ``loss_mask`` ([B, S] bool): the targets the
        loss is the mean over (all when None)."""
        b, s1 = window.shape
        ws = self._workspace(b, s1 - 1)
        # this micro-step's products overwrite the gradients when it is the first since zero_grad()
        first, self._overwrite = self._overwrite, False
        dw_busy0 = self.dw.busy_ms
        with blas_threads(self.blas):
            with self.times.phase("forward"):
                self._forward(window, ws)
                loss = self._classifier(ws, grad_scale, backward=True, first=first, mask=loss_mask)
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
        cfg, w, g32, mm, elem, s = self.cfg, self.w, self.g32, self.mm, self.elementwise, ws.scratch
        alpha, eps = cfg.residual_scale, cfg.norm_eps
        b, seq, n = ws.dims.B, ws.dims.S, ws.dims.N
        ws.tokens.view(b, seq).copy_(window[:, :-1])
        if self._full_to_compact is None:
            ws.targets.view(b, seq).copy_(window[:, 1:])
        else:
            ws.targets_full.view(b, seq).copy_(window[:, 1:])
            torch.index_select(self._full_to_compact, 0, ws.targets_full, out=ws.targets)
        x = ws.x
        if self.lora is None or w.flat.dtype == torch.float32:
            table = g32.embedding if self.lora is None else w.embedding
            torch.index_select(table, 0, ws.tokens, out=x.view(n, -1))  # fp32 rows of the master table
        else:  # a frozen 16-bit base: its rows, widened into the fp32 residual stream
            torch.index_select(w.embedding, 0, ws.tokens, out=ws.xL.view(n, -1))
            x.copy_(ws.xL)
        # each block's output joins the residual inside the next norm step (delta: None before the first)
        delta: torch.Tensor | None = None
        for i, (lw, lp, lb) in enumerate(zip(w.layers, g32.layers, ws.layers, strict=True)):
            groups = self._groups[i] if self._groups else None
            # attention block: x += alpha f; tap x; xn = RMSNorm(x); qkv (+ LoRA); [QK-norm]; RoPE; attention
            elem.norm_tap(x, delta, alpha, lb.x, lp.attention_norm, eps, lb.xn, lb.rstd1, s)
            mm(lb.xn.view(n, -1), lw.qkv.t(), ws.qkv.view(n, -1))
            if groups and groups["qkv"]:
                self._lora_forward(lb.xn.view(n, -1), groups["qkv"], lb.u_qkv.view(n, -1), ws.qkv.view(n, -1))
            if cfg.qk_norm:
                assert lp.q_norm is not None and lp.k_norm is not None
                elem.qk_norm(ws.qkv, lb.qk, lb.qk_rstd, lp.q_norm, lp.k_norm, eps, s)
            elem.rope_split(lb.q, lb.k, lb.v, ws.qkv, s)
            self._attention_forward(ws, lb)
            lb.attn.view(b, seq, cfg.n_heads, -1).copy_(ws.out.transpose(1, 2))
            mm(lb.attn.view(n, -1), lw.wo.t(), ws.o.view(n, -1))
            if groups and groups["wo"]:
                self._lora_forward(lb.attn.view(n, -1), groups["wo"], lb.u_o.view(n, -1), ws.o.view(n, -1))
            # FFN block: x += alpha o; tap x2; xn2 = RMSNorm(x2); h13 (+ LoRA); SwiGLU; f (+ LoRA)
            elem.norm_tap(x, ws.o, alpha, lb.x2, lp.ffn_norm, eps, lb.xn2, lb.rstd2, s)
            mm(lb.xn2.view(n, -1), lw.w13.t(), lb.h13.view(n, -1))
            if groups and groups["w13"]:
                self._lora_forward(lb.xn2.view(n, -1), groups["w13"], lb.u_13.view(n, -1), lb.h13.view(n, -1))
            elem.swiglu(lb.g, lb.h13)
            mm(lb.g.view(n, -1), lw.w2.t(), ws.f.view(n, -1))
            if groups and groups["w2"]:
                self._lora_forward(lb.g.view(n, -1), groups["w2"], lb.u_2.view(n, -1), ws.f.view(n, -1))
            delta = ws.f
        elem.norm_tap(x, delta, alpha, ws.xL, g32.final_norm, eps, ws.xf, ws.rstdf, s)

    def _lora_forward(self, x: torch.Tensor, grp: LoraGroup, u: torch.Tensor, y: torch.Tensor) -> None:
        """y[:, seg_j] += u_j B_j^T with u = s x A^T (all the group's A's in one GEMM).  x: [N, in];
        u: [N, k r] (the tap); y: [N, out] (the group's fused output)."""
        assert self.lora is not None
        r = self.lora.lora.rank
        self.mm(x, grp.a.t(), u)
        u.mul_(self.lora.lora.scale)
        for j, (lo, hi) in enumerate(grp.segs):
            y[:, lo:hi].addmm_(u[:, j * r : (j + 1) * r], grp.bs[j].t())

    def _lora_backward_dx(self, dy: torch.Tensor, grp: LoraGroup, du: torch.Tensor, dx: torch.Tensor) -> None:
        """du[:, j] = s dy[:, seg_j] B_j; dx += du A (the stacked A's: one GEMM).  dy: [N, out]; du: [N, k r]
        (kept for the dW job); dx: [N, in], already holding the frozen projection's dx."""
        assert self.lora is not None
        r = self.lora.lora.rank
        for j, (lo, hi) in enumerate(grp.segs):
            torch.mm(dy[:, lo:hi], grp.bs[j], out=du[:, j * r : (j + 1) * r])
        du.mul_(self.lora.lora.scale)
        dx.addmm_(du, grp.a)

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

    def _classifier(
        self, ws: Workspace, grad_scale: float, backward: bool, first: bool, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Classifier + cross-entropy; with ``backward``, also dlogits, dxf and the classifier's dW job (whose
        product overwrites the gradient when ``first``, see ``zero_grad``; none for a frozen classifier).
        Returns the mean loss: over the targets ``mask`` ([B, S] bool) selects when given, whose rows alone
        get a gradient.

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
        weights = None
        count = float(n)
        if mask is not None:
            ws.loss_w.copy_(mask.reshape(-1))
            weights = ws.loss_w
            count = max(1.0, float(mask.sum()))
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            self.elementwise.cross_entropy_chunk(
                logits[lo:hi],
                ws.loss,
                ws.targets[lo:hi],
                grad_scale / count,
                ws.scratch,
                None if weights is None else weights[lo:hi],
            )
        if backward:
            self.mm(logits, wc, ws.dxf.view(n, -1))
            accumulate = self.elementwise.accumulate
            if self.lora is not None:
                pass  # the classifier is frozen: no dW product
            elif self._ids is None:
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
        return float(ws.loss) / count  # type: ignore[return-value]

    def _backward(self, ws: Workspace, first: bool) -> None:
        """The dx kernels from the final norm down; dW jobs go to the executor (overwriting if ``first``).
        With LoRA only the adapters' dW jobs are queued, and no gain or embedding gradient is formed."""
        cfg, w, g32, g, mm = self.cfg, self.w, self.g32, self.grads, self.mm
        elem, s, acc = self.elementwise, ws.scratch, self.elementwise.accumulate
        alpha = cfg.residual_scale
        b, seq, n = ws.dims.B, ws.dims.S, ws.dims.N
        dy, dx2 = ws.dy, ws.dx2  # fp32 gradients of the residual stream
        submit = self.dw.submit
        buckets = iter(self._buckets)
        full = self.lora is None
        gm = g if isinstance(g, ModelParams) else None  # the model's gradients (full fine-tuning)
        threads_before = torch.get_num_threads()
        threads_changed = self.backward_threads < threads_before
        if threads_changed:
            torch.set_num_threads(self.backward_threads)
        try:
            layers = ws.layers
            # final norm: dy = RMSNorm'(dxf); df of the last layer = alpha dy (16-bit, read by its GEMMs)
            elem.norm_backward(
                dy,
                gm.final_norm if gm is not None else None,
                None,
                ws.dxf,
                ws.xL,
                ws.rstdf,
                g32.final_norm,
                alpha,
                layers[-1].df,
                s,
            )
            for i in reversed(range(cfg.n_layers)):
                lw, lp, lb = w.layers[i], g32.layers[i], layers[i]
                lg = gm.layers[i] if gm is not None else None
                groups = self._groups[i] if self._groups else {}
                # FFN half: dg = df W2 (+ du A); SwiGLU'; dxn2 = dh13 W13 (+ du A); dx2 = dy + RMSNorm'(dxn2)
                if lg is not None:
                    submit(_weight_grad, lg.w2, lb.df, lb.g, ws.mm_w2, ws.acc_scratch, mm, acc, first)
                mm(lb.df.view(n, -1), lw.w2, ws.dg.view(n, -1))
                if groups.get("w2"):
                    self._lora_dx_and_dw(groups["w2"], lb.df, lb.du_2, lb.u_2, lb.g, ws.dg, ws, first)
                elem.swiglu_backward(lb.dh13, ws.dg, lb.h13, s)
                if lg is not None:
                    submit(_weight_grad, lg.w13, lb.dh13, lb.xn2, ws.mm_w13, ws.acc_scratch, mm, acc, first)
                mm(lb.dh13.view(n, -1), lw.w13, ws.dxn.view(n, -1))
                if groups.get("w13"):
                    self._lora_dx_and_dw(groups["w13"], lb.dh13, lb.du_13, lb.u_13, lb.xn2, ws.dxn, ws, first)
                elem.norm_backward(
                    dx2,
                    lg.ffn_norm if lg is not None else None,
                    dy,
                    ws.dxn,
                    lb.x2,
                    lb.rstd2,
                    lp.ffn_norm,
                    alpha,
                    lb.do,
                    s,
                )
                # attention half: dattn = do Wo (+ du A); attention'; RoPE^-1; [QK-norm']; dxn = dqkv Wqkv
                # (+ du A); dy = dx2 + RMSNorm'(dxn)
                if lg is not None:
                    submit(_weight_grad, lg.wo, lb.do, lb.attn, ws.mm_wo, ws.acc_scratch, mm, acc, first)
                mm(lb.do.view(n, -1), lw.wo, ws.dattn.view(n, -1))
                if groups.get("wo"):
                    self._lora_dx_and_dw(groups["wo"], lb.do, lb.du_o, lb.u_o, lb.attn, ws.dattn, ws, first)
                ws.dout.copy_(ws.dattn.view(b, seq, cfg.n_heads, -1).transpose(1, 2))
                fused.attention_backward_into(
                    ws.dq, ws.dk, ws.dv, ws.dout, lb.p, lb.q, lb.k, lb.v, ws.dp, ws.ds, mm
                )
                elem.rope_merge_backward(lb.dqkv, ws.dq, ws.dk, ws.dv, s)
                if cfg.qk_norm:
                    assert lp.q_norm is not None and lp.k_norm is not None
                    elem.qk_norm_backward(
                        lb.dqkv,
                        lb.qk,
                        lb.qk_rstd,
                        lp.q_norm,
                        lp.k_norm,
                        lg.q_norm if lg is not None else None,
                        lg.k_norm if lg is not None else None,
                        s,
                    )
                if lg is not None:
                    submit(_weight_grad, lg.qkv, lb.dqkv, lb.xn, ws.mm_qkv, ws.acc_scratch, mm, acc, first)
                mm(lb.dqkv.view(n, -1), lw.qkv, ws.dxn.view(n, -1))
                if groups.get("qkv"):
                    self._lora_dx_and_dw(
                        groups["qkv"], lb.dqkv, lb.du_qkv, lb.u_qkv, lb.xn, ws.dxn, ws, first
                    )
                if self.grad_ready_hook is not None and self.announces_buckets:
                    submit(self.grad_ready_hook, next(buckets))  # complete once the jobs above have run
                below = layers[i - 1].df if i > 0 else None  # the layer below's df = alpha dy
                elem.norm_backward(
                    dy,
                    lg.attention_norm if lg is not None else None,
                    dx2,
                    ws.dxn,
                    lb.x,
                    lb.rstd1,
                    lp.attention_norm,
                    alpha,
                    below,
                    s,
                )
            if full:
                assert gm is not None
                # embedding backward on the executor too: with a tied classifier it adds into the same table
                submit(K.embedding_backward, gm.embedding, ws.tokens, dy)
            if self.grad_ready_hook is not None and self.announces_buckets:
                for rest in buckets:
                    submit(self.grad_ready_hook, rest)
        finally:
            if threads_changed:
                torch.set_num_threads(threads_before)

    def _lora_dx_and_dw(
        self,
        grp: LoraGroup,
        dy: torch.Tensor,
        du: torch.Tensor,
        u: torch.Tensor,
        x: torch.Tensor,
        dx: torch.Tensor,
        ws: Workspace,
        first: bool,
    ) -> None:
        """A group's adapters in the backward: dx += du A, and their dW job (gB_j = dy_j^T u_j, gA = du^T x).
        dy: [B, S, out]; du, u: [B, S, k r] (this layer's own buffers, read later by the dW job);
        x, dx: [B, S, in]."""
        assert self.lora is not None
        n = ws.dims.N
        self._lora_backward_dx(dy.view(n, -1), grp, du.view(n, -1), dx.view(n, -1))
        self.dw.submit(
            _lora_weight_grads,
            grp,
            self.lora.lora.rank,
            dy,
            du,
            u,
            x,
            ws.lora_prod,
            ws.acc_scratch,
            self.mm,
            self.elementwise.accumulate,
            first,
        )


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


def _lora_weight_grads(
    grp: LoraGroup,
    r: int,
    dy: torch.Tensor,
    du: torch.Tensor,
    u: torch.Tensor,
    x: torch.Tensor,
    prod: torch.Tensor,
    scratch: torch.Tensor,
    mm: MatMul = torch_matmul,
    accumulate: Accumulate = fused.accumulate_into,
    overwrite: bool = False,
) -> None:
    """One group's adapter gradients: gA (stacked) += du^T x; gB_j += dy[:, seg_j]^T u[:, j].
    dy: [..., out]; du, u: [..., k r]; x: [..., in]; prod: flat scratch in the compute dtype, big enough for
    any one product."""
    dy2, du2, u2 = dy.reshape(-1, dy.shape[-1]), du.reshape(-1, du.shape[-1]), u.reshape(-1, u.shape[-1])
    _weight_grad(
        grp.ga, du2, x, prod[: grp.ga.numel()].view(grp.ga.shape), scratch, mm, accumulate, overwrite
    )
    for j, ((lo, hi), gb) in enumerate(zip(grp.segs, grp.gbs, strict=True)):
        p = prod[: gb.numel()].view(gb.shape)
        _weight_grad(gb, dy2[:, lo:hi], u2[:, j * r : (j + 1) * r], p, scratch, mm, accumulate, overwrite)


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
