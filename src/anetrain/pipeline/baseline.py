"""The baseline pipeline: the core kernels, run one after another in the parameters' own dtype.

One training micro-step, reading top to bottom (B windows of S+1 tokens; N = B*S)::

    x = E[tokens]                                              embedding
    for each layer: attention_forward -> output_forward -> ffn_forward      (keeping the taps)
    xf = RMSNorm(x; g_final); loss, dxf, dlogits = classifier_loss(xf)      gWcls += dlogits^T xf
    dy = RMSNorm'(dxf)
    for each layer, last to first:
        ffn_backward_dx -> (gW2, gW1, gW3 queued) -> RMSNorm' -> + residual
        output_backward_dx -> (gWo queued) -> attention_backward_dx -> (gWq, gWk, gWv queued)
        -> RMSNorm' -> + residual
    gE[tokens] += dy                                           embedding backward

Gradients accumulate into ``self.grads`` (float32 or float64, the same layout as the parameters), scaled by
``grad_scale`` (1/accum for gradient accumulation) so an optimizer can read them directly.
"""

from __future__ import annotations

import torch

from .. import kernels as K
from ..data.compaction import VocabCompaction, compacted
from ..params import ModelParams
from ..timing import PhaseTimes
from .base import GradReadyHook, precision_of
from .dw import SerialDW, ThreadDW


class BaselinePipeline:
    """Implements :class:`anetrain.pipeline.base.Pipeline` with the plain kernels."""

    name = "baseline"
    fusion = None
    note = ""
    needs_loss_scaling = False
    announces_buckets = True

    def __init__(
        self,
        params: ModelParams,
        *,
        compaction: VocabCompaction | None = None,
        dw: SerialDW | ThreadDW | None = None,
        loss_chunk: int | None = None,
    ) -> None:
        self.cfg = params.cfg
        self.params = params
        self.grads = params.like()
        self.compaction = compaction
        self.dw = dw or SerialDW()
        self.loss_chunk = loss_chunk
        self.times = PhaseTimes()
        self.compute_dtype = params.flat.dtype
        self.backend = params.flat.device.type
        self.precision = precision_of(params.flat.dtype)
        self.grad_ready_hook: GradReadyHook | None = None
        self._buckets = self.grads.buckets()
        self._rope: K.Rope | None = None  # built for the longest sequence seen (not the model's seq_len)

    # ---- helpers -------------------------------------------------------------------------------
    def rope(self, s: int) -> K.Rope:
        if self._rope is None or s > self._rope.cos.shape[0]:
            self._rope = K.Rope.build(
                s, self.cfg.head_dim, self.cfg.rope_theta, self.compute_dtype, self.params.flat.device
            )
        return self._rope

    def warmup(self, batch: int, seq: int) -> None:
        """Nothing to allocate or compile: every step allocates what it needs."""

    def after_update(self) -> None:
        """Called after the optimizer changed ``params`` (nothing is cached here)."""

    def zero_grad(self) -> None:
        self.grads.flat.zero_()

    def close(self) -> None:
        self.dw.close()

    def _classifier(self, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The classifier weight and targets, compacted if asked."""
        return compacted(self.params.classifier, targets, self.compaction)

    # ---- forward only (evaluation) -------------------------------------------------------------
    @torch.no_grad()
    def forward_hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final hidden states before the final norm: tokens [B, S] -> [B, S, D]."""
        cfg, p = self.cfg, self.params
        rope = self.rope(tokens.shape[1])
        x = K.embedding_forward(tokens, p.embedding)
        for w in p.layers:
            attn, _ = K.attention_forward(
                x, w.attention_norm, w.wq, w.wk, w.wv, rope, cfg.n_heads, cfg.n_kv_heads, cfg.norm_eps
            )
            x2 = K.output_forward(x, attn, w.wo, cfg.residual_scale)
            x, _ = K.ffn_forward(x2, w.ffn_norm, w.w1, w.w2, w.w3, cfg.residual_scale, cfg.norm_eps)
        return x

    @torch.no_grad()
    def loss(self, window: torch.Tensor) -> float:
        """Mean cross-entropy of a [B, S+1] window batch, without touching gradients."""
        window = window.to(self.params.flat.device, non_blocking=True)
        tokens, targets = window[:, :-1], window[:, 1:]
        x = self.forward_hidden(tokens)
        xf, _ = K.rmsnorm_forward(x, self.params.final_norm, self.cfg.norm_eps)
        w, t = self._classifier(targets)
        loss, _, _ = K.classifier_loss(xf, w, t, chunk=self.loss_chunk)
        return float(loss)

    # ---- one micro-step --------------------------------------------------------------------------
    @torch.no_grad()
    def forward_backward(self, window: torch.Tensor, grad_scale: float = 1.0) -> float:
        """Forward and backward of a [B, S+1] window batch; gradients * grad_scale are added to ``grads``."""
        cfg, p, g, dw, times = self.cfg, self.params, self.grads, self.dw, self.times
        dw_busy0 = dw.busy_ms
        buckets = iter(self._buckets)
        alpha, eps = cfg.residual_scale, cfg.norm_eps
        window = window.to(self.params.flat.device, non_blocking=True)
        tokens, targets = window[:, :-1], window[:, 1:]  # [B, S] each
        rope = self.rope(tokens.shape[1])

        with times.phase("forward"):
            x = K.embedding_forward(tokens, p.embedding)  # [B, S, D]
            taps: list[tuple[K.AttentionTaps, K.FFNTaps]] = []
            for w in p.layers:
                attn, ta = K.attention_forward(
                    x, w.attention_norm, w.wq, w.wk, w.wv, rope, cfg.n_heads, cfg.n_kv_heads, eps
                )
                x2 = K.output_forward(x, attn, w.wo, alpha)
                x, tf = K.ffn_forward(x2, w.ffn_norm, w.w1, w.w2, w.w3, alpha, eps)
                taps.append((ta, tf))
            xf, rstd_f = K.rmsnorm_forward(x, p.final_norm, eps)  # [B, S, D]
            w_cls, t_cls = self._classifier(targets)
            loss, dxf, dlogits = K.classifier_loss(xf, w_cls, t_cls, grad_scale, chunk=self.loss_chunk)

        with times.phase("backward_dx"):
            if self.compaction is None:
                dw.submit(K.weight_grad, g.classifier, dlogits, xf)
            else:
                dw.submit(K.scattered_weight_grad, g.classifier, self.compaction.ids, dlogits, xf)
            dy, dg_final = K.rmsnorm_backward(dxf, x, rstd_f, p.final_norm)  # [B, S, D]
            g.final_norm.add_(dg_final)
            for w, gw, (ta, tf) in zip(reversed(p.layers), reversed(g.layers), reversed(taps), strict=True):
                # FFN half
                dxn2, fg = K.ffn_backward_dx(dy, tf, w.w1, w.w2, w.w3, alpha)
                dw.submit(K.weight_grad, gw.w2, fg.df, tf.g)
                dw.submit(K.weight_grad, gw.w1, fg.dh1, tf.xn2)
                dw.submit(K.weight_grad, gw.w3, fg.dh3, tf.xn2)
                dx2, dg_ffn = K.rmsnorm_backward(dxn2, tf.x2, tf.rstd, w.ffn_norm)
                gw.ffn_norm.add_(dg_ffn)
                dx2 = dx2 + dy  # the residual branch passes dy straight through
                # attention half
                dattn, do = K.output_backward_dx(dx2, w.wo, alpha)
                dw.submit(K.weight_grad, gw.wo, do, ta.attn)
                dxn, ag = K.attention_backward_dx(dattn, ta, w.wq, w.wk, w.wv, rope)
                dw.submit(K.weight_grad, gw.wq, ag.dq, ta.xn)
                dw.submit(K.weight_grad, gw.wk, ag.dk, ta.xn)
                dw.submit(K.weight_grad, gw.wv, ag.dv, ta.xn)
                if self.grad_ready_hook is not None:
                    dw.submit(self.grad_ready_hook, next(buckets))
                dx, dg_att = K.rmsnorm_backward(dxn, ta.x, ta.rstd, w.attention_norm)
                gw.attention_norm.add_(dg_att)
                dy = dx + dx2
            dw.submit(K.embedding_backward, g.embedding, tokens, dy)  # after the classifier job (tied case)
            if self.grad_ready_hook is not None:
                for rest in buckets:
                    dw.submit(self.grad_ready_hook, rest)
        times.add("wait", dw.wait())
        dw_ms = dw.busy_ms - dw_busy0
        times.add("dw", dw_ms)
        if isinstance(dw, SerialDW):  # serial dW ran inside the backward phase: count it once
            times.add("backward_dx", -dw_ms)
        return float(loss)
