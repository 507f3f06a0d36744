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

QK-norm models (Qwen3) normalize each head of q and k before RoPE (``kernels/qk_norm.py``); the gains'
gradients are queued like the projections'. With LoRA (``lora``: the adapters; ``params`` is then the frozen
base in the same dtype) ``params``/``grads`` of the pipeline are the adapters': every frozen tensor's
gradient (the seven projections, the norm gains, the embedding and the classifier) is skipped, dx flows
through the frozen weights, and each adapter's two dW products are queued instead.
"""

from __future__ import annotations

import torch

from .. import kernels as K
from ..data.compaction import VocabCompaction, compacted
from ..lora import LoraParams
from ..params import FlatParams, LayerParams, ModelParams
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
        lora: LoraParams | None = None,
        compaction: VocabCompaction | None = None,
        dw: SerialDW | ThreadDW | None = None,
        loss_chunk: int | None = None,
    ) -> None:
        self.cfg = params.cfg
        #: the model the kernels run (the frozen base with LoRA)
        self.model = params
        self.lora = lora
        if lora is not None:
            lora.base = params
            if lora.flat.dtype != params.flat.dtype:
                raise ValueError("the adapters and the base model must have the same dtype in the baseline")
        #: what trains: the whole model, or the adapters
        self.params: FlatParams = lora if lora is not None else params
        self.grads = self.params.like()
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
        return compacted(self.model.classifier, targets, self.compaction)

    def _adapters(self, i: int) -> dict[str, K.Adapter] | None:
        return self.lora.adapters(i) if self.lora is not None else None

    # ---- forward only (evaluation) -------------------------------------------------------------
    @torch.no_grad()
    def forward_hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final hidden states before the final norm: tokens [B, S] -> [B, S, D]."""
        p = self.model
        rope = self.rope(tokens.shape[1])
        x = K.embedding_forward(tokens, p.embedding)
        for i, w in enumerate(p.layers):
            x, _ = self._layer_forward(x, w, rope, self._adapters(i))
        return x

    def _layer_forward(
        self, x: torch.Tensor, w: LayerParams, rope: K.Rope, lora: dict[str, K.Adapter] | None
    ) -> tuple[torch.Tensor, tuple[K.AttentionTaps, K.FFNTaps, torch.Tensor | None]]:
        """One layer: x [B, S, D] -> x' [B, S, D], and the taps (attention's, the FFN's, wo's LoRA u)."""
        cfg = self.cfg
        alpha, eps = cfg.residual_scale, cfg.norm_eps
        qk = (w.q_norm, w.k_norm) if cfg.qk_norm else None
        attn, ta = K.attention_forward(
            x, w.attention_norm, w.wq, w.wk, w.wv, rope, cfg.n_heads, cfg.n_kv_heads, eps, qk, lora
        )
        x2 = K.output_forward(x, attn, w.wo, alpha)
        u_o = None
        if lora and "wo" in lora:  # wo's adapter: x2 += alpha * u B^T
            delta, u_o = K.lora_forward(attn, lora["wo"])
            x2 = x2 + delta if alpha == 1.0 else x2 + alpha * delta
        x, tf = K.ffn_forward(x2, w.ffn_norm, w.w1, w.w2, w.w3, alpha, eps, lora)
        return x, (ta, tf, u_o)

    @torch.no_grad()
    def loss(self, window: torch.Tensor, loss_mask: torch.Tensor | None = None) -> float:
        """Mean cross-entropy of a [B, S+1] window batch (over ``loss_mask``'s targets when given: [B, S]
        bool), without touching gradients."""
        window = window.to(self.model.flat.device, non_blocking=True)
        tokens, targets = window[:, :-1], window[:, 1:]
        x = self.forward_hidden(tokens)
        xf, _ = K.rmsnorm_forward(x, self.model.final_norm, self.cfg.norm_eps)
        w, t = self._classifier(targets)
        loss, _, _ = K.classifier_loss(xf, w, t, chunk=self.loss_chunk, mask=loss_mask)
        return float(loss)

    # ---- one micro-step --------------------------------------------------------------------------
    @torch.no_grad()
    def forward_backward(
        self, window: torch.Tensor, grad_scale: float = 1.0, loss_mask: torch.Tensor | None = None
    ) -> float:
        """Forward and backward of a [B, S+1] window batch; gradients * grad_scale are added to ``grads``.
        ``loss_mask`` ([B, S] bool): the targets the loss is the mean over (all when None)."""
        if self.lora is not None:
            return self._forward_backward_lora(window, grad_scale, loss_mask)
        cfg, p, g, dw, times = self.cfg, self.model, self.grads, self.dw, self.times
        assert isinstance(g, ModelParams)
        dw_busy0 = dw.busy_ms
        buckets = iter(self._buckets)
        alpha, eps = cfg.residual_scale, cfg.norm_eps
        window = window.to(p.flat.device, non_blocking=True)
        tokens, targets = window[:, :-1], window[:, 1:]  # [B, S] each
        rope = self.rope(tokens.shape[1])

        with times.phase("forward"):
            x = K.embedding_forward(tokens, p.embedding)  # [B, S, D]
            taps: list[tuple[K.AttentionTaps, K.FFNTaps, torch.Tensor | None]] = []
            for w in p.layers:
                x, t = self._layer_forward(x, w, rope, None)
                taps.append(t)
            xf, rstd_f = K.rmsnorm_forward(x, p.final_norm, eps)  # [B, S, D]
            w_cls, t_cls = self._classifier(targets)
            loss, dxf, dlogits = K.classifier_loss(
                xf, w_cls, t_cls, grad_scale, chunk=self.loss_chunk, mask=loss_mask
            )

        with times.phase("backward_dx"):
            if self.compaction is None:
                dw.submit(K.weight_grad, g.classifier, dlogits, xf)
            else:
                dw.submit(K.scattered_weight_grad, g.classifier, self.compaction.ids, dlogits, xf)
            dy, dg_final = K.rmsnorm_backward(dxf, x, rstd_f, p.final_norm)  # [B, S, D]
            g.final_norm.add_(dg_final)
            for w, gw, (ta, tf, _) in zip(
                reversed(p.layers), reversed(g.layers), reversed(taps), strict=True
            ):
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
                qk = (w.q_norm, w.k_norm) if cfg.qk_norm else None
                dxn, ag = K.attention_backward_dx(dattn, ta, w.wq, w.wk, w.wv, rope, qk)
                if qk is not None:  # the QK-norm gains' dW kernels
                    dw.submit(K.qk_norm_weight_grad, gw.q_norm, ag.dqn, ta.q_raw, ta.rstd_q)
                    dw.submit(K.qk_norm_weight_grad, gw.k_norm, ag.dkn, ta.k_raw, ta.rstd_k)
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
        return self._finish(loss, dw_busy0)

    def _finish(self, loss: torch.Tensor, dw_busy0: float) -> float:
        dw, times = self.dw, self.times
        times.add("wait", dw.wait())
        dw_ms = dw.busy_ms - dw_busy0
        times.add("dw", dw_ms)
        if isinstance(dw, SerialDW):  # serial dW ran inside the backward phase: count it once
            times.add("backward_dx", -dw_ms)
        return float(loss)

    def _forward_backward_lora(
        self, window: torch.Tensor, grad_scale: float, loss_mask: torch.Tensor | None
    ) -> float:
        """The LoRA micro-step: the same dx chain through the frozen model; only the adapters' dW products."""
        cfg, p, dw, times = self.cfg, self.model, self.dw, self.times
        ad, g = self.lora, self.grads
        assert ad is not None and isinstance(g, LoraParams)
        dw_busy0 = dw.busy_ms
        buckets = iter(self._buckets)
        alpha = cfg.residual_scale
        window = window.to(p.flat.device, non_blocking=True)
        tokens, targets = window[:, :-1], window[:, 1:]  # [B, S] each
        rope = self.rope(tokens.shape[1])

        with times.phase("forward"):
            x = K.embedding_forward(tokens, p.embedding)  # [B, S, D]
            taps = []
            for i, w in enumerate(p.layers):
                x, t = self._layer_forward(x, w, rope, ad.adapters(i))
                taps.append(t)
            xf, rstd_f = K.rmsnorm_forward(x, p.final_norm, cfg.norm_eps)  # [B, S, D]
            w_cls, t_cls = self._classifier(targets)
            loss, dxf, _ = K.classifier_loss(
                xf, w_cls, t_cls, grad_scale, chunk=self.loss_chunk, mask=loss_mask
            )

        def adapter_grads(gl: dict[str, K.Adapter], name: str, dy: torch.Tensor, du: torch.Tensor, u, x_in):
            dw.submit(K.lora_weight_grad, gl[name].a, gl[name].b, dy, du, u, x_in)

        with times.phase("backward_dx"):
            dy, _ = K.rmsnorm_backward(dxf, x, rstd_f, p.final_norm)  # [B, S, D]
            for i in reversed(range(cfg.n_layers)):
                w, (ta, tf, u_o), la, gl = p.layers[i], taps[i], ad.adapters(i), g.adapters(i)
                # FFN half
                dxn2, fg = K.ffn_backward_dx(dy, tf, w.w1, w.w2, w.w3, alpha, la)
                for name, dy_out, x_in in (
                    ("w2", fg.df, tf.g),
                    ("w1", fg.dh1, tf.xn2),
                    ("w3", fg.dh3, tf.xn2),
                ):
                    if name in la:
                        adapter_grads(gl, name, dy_out, fg.lora_du[name], tf.lora_u[name], x_in)
                dx2, _ = K.rmsnorm_backward(dxn2, tf.x2, tf.rstd, w.ffn_norm)
                dx2 = dx2 + dy
                # attention half
                dattn, do = K.output_backward_dx(dx2, w.wo, alpha)
                if "wo" in la:
                    dattn_l, du_o = K.lora_backward_dx(do, la["wo"])
                    dattn = dattn + dattn_l
                    adapter_grads(gl, "wo", do, du_o, u_o, ta.attn)
                qk = (w.q_norm, w.k_norm) if cfg.qk_norm else None
                dxn, ag = K.attention_backward_dx(dattn, ta, w.wq, w.wk, w.wv, rope, qk, la)
                for name, dy_out in (("wq", ag.dq), ("wk", ag.dk), ("wv", ag.dv)):
                    if name in la:
                        adapter_grads(gl, name, dy_out, ag.lora_du[name], ta.lora_u[name], ta.xn)
                if self.grad_ready_hook is not None:
                    dw.submit(self.grad_ready_hook, next(buckets))
                dx, _ = K.rmsnorm_backward(dxn, ta.x, ta.rstd, w.attention_norm)
                dy = dx + dx2
            if self.grad_ready_hook is not None:
                for rest in buckets:
                    dw.submit(self.grad_ready_hook, rest)
        return self._finish(loss, dw_busy0)
