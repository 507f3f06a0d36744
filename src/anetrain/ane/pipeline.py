"""The training step with forward and dx on the ANE (simulated on Linux): ``--backend ane-sim``.

The schedule is the original's dynamic pipeline (docs/original.md). Per layer, with the CPU parts in
float32 through :mod:`anetrain.kernels` and the ANE parts as the programs of :mod:`.programs`::

    forward   CPU xn = RMSNorm(x)       ANE sdpa_fwd -> attn, q_rope, k_rope, v     ANE wo_fwd -> o
              CPU x2 = x + alpha o      CPU xn2 = RMSNorm(x2)      ANE ffn_fused -> x' (fp16), h1, h3, g
    loss      CPU final RMSNorm, classifier + cross-entropy (grad_scale folded into dlogits), embedding
    dx        ANE ffn_bwd_w2t -> dg     CPU SiLU backward -> dh1, dh3      ANE ffn_bwd_w13t -> dxn2
              CPU RMSNorm' + residual   ANE wot_bwd -> dattn
              attention backward (below)                ANE q_bwd + kv_bwd -> dxn   CPU RMSNorm' + residual
    dW        every projection's dW GEMM in float32 on a worker thread (ThreadDW), queued as soon as its
              operands exist, concurrently with the dx chain

The attention backward with the original's programs (the default) is the original's: the CPU tiles K and
V to the query heads (head h reads kv head h // R), ANE ``sdpa_bwd1`` gives dV_full, P, dP and
``sdpa_bwd2`` dQ_rope, dK_full, then the CPU sums dK_full and dV_full over each group and applies the
inverse RoPE to dQ and dK. With anetrain's programs the ANE does all of it (``sdpa_bwd1`` -> dV, P, dP;
``sdpa_bwd2`` -> dQ, dK).

The ANE programs run one sequence at a time ([1, C, 1, S] surfaces). Weights are staged (rounded to fp16,
padded, placed) into each layer's program inputs once after every optimizer update (:meth:`after_update`);
activations are written per step. All ANE values are fp16, so the residual stream is rounded to fp16 after
every layer (as in the original) and gradients can overflow: ``grad_scale`` carries the trainer's loss
scale, and an overflow shows up as inf/nan in ``grads`` (the trainer then skips the update).

The executor is the seam to real hardware: anything with ``run(program, inputs) -> outputs`` (MIL input
names to fp16 arrays, MIL output names to fp16 arrays). The default is the simulator.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .. import kernels as K
from ..data.compaction import VocabCompaction, compacted
from ..errors import ConfigError
from ..params import LayerParams, ModelParams
from ..pipeline.base import GradReadyHook
from ..pipeline.dw import SerialDW, ThreadDW
from ..timing import PhaseTimes
from .machine import resolve_sim_chip
from .programs import BACKWARD, FORWARD, KernelSet, build_kernel_set, check_program_choice
from .sim import SimExecutor
from .surfaces import Staging, read_operand

_WEIGHT_OPERANDS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
_SHARED = ("sdpa_bwd1", "sdpa_bwd2")  # weight-free programs: one staging area serves every layer


@dataclass
class _Taps:
    """One layer's forward values that the backward needs (token-major [B, S, C], float32)."""

    x: torch.Tensor
    rstd: torch.Tensor
    xn: torch.Tensor
    attn: torch.Tensor
    q_rope: torch.Tensor
    k_rope: torch.Tensor
    v: torch.Tensor
    x2: torch.Tensor
    rstd2: torch.Tensor
    xn2: torch.Tensor
    h1: torch.Tensor
    h3: torch.Tensor
    g: torch.Tensor


class _Compiled:
    """A kernel set for one sequence length and its per-layer staging areas."""

    def __init__(self, kernels: KernelSet, n_layers: int) -> None:
        self.kernels = kernels
        cfg = kernels.cfg
        self.rope = K.Rope.build(kernels.dims.seq, cfg.head_dim, cfg.rope_theta)  # the host's inverse RoPE
        shared = {n: Staging(kernels[n]) for n in _SHARED}
        self.layers: list[dict[str, Staging]] = [
            {n: shared[n] if n in shared else Staging(kernels[n]) for n in FORWARD + BACKWARD}
            for _ in range(n_layers)
        ]

    def stage_weights(self, layers: list[LayerParams]) -> None:
        for stages, w in zip(self.layers, layers, strict=True):
            named = {k: getattr(w, k).detach().numpy() for k in _WEIGHT_OPERANDS}
            for st in stages.values():
                for operand in st.program.in_placements:
                    if operand in named:
                        st.write(operand, named[operand])


class AneSimPipeline:
    """Implements :class:`anetrain.pipeline.base.Pipeline` with forward and dx as ANE programs."""

    name = "ane-sim"
    backend = "ane-sim"
    precision = "fp16"
    fusion = None
    needs_loss_scaling = True
    #: the dW jobs run per projection, not per layer bucket: the all-reduce waits for the whole backward
    announces_buckets = False

    def __init__(
        self,
        params: ModelParams,
        *,
        chip: str = "auto",
        programs: str = "original",
        inputs: str = "packed",
        executor: Any = None,
        dw: SerialDW | ThreadDW | None = None,
        compaction: VocabCompaction | None = None,
        loss_chunk: int | None = None,
        seq: int | None = None,
        chip_note: str | None = None,
    ) -> None:
        """``chip``: the MIL dialect (``auto``: this Mac's chip, m4 elsewhere); ``programs``: ``original``
        or ``anetrain``; ``inputs``: ``packed`` or (anetrain only) ``separate``. With ``seq`` the programs
        for that sequence length are built (and checked against the chip's limits) here, before any work."""
        if params.flat.dtype != torch.float32 or params.flat.device.type != "cpu":
            raise ConfigError("the ANE pipeline needs float32 master weights on the CPU")
        self.chip, note = resolve_sim_chip(chip)  # fails early on a bad chip
        self.chip_note = chip_note or note
        check_program_choice(programs, inputs)
        self.cfg = params.cfg
        self.params = params
        self.grads = params.like()
        self.times = PhaseTimes()
        self.programs = programs
        self.inputs = inputs
        self.executor = executor if executor is not None else SimExecutor()
        self.dw = dw if dw is not None else ThreadDW()
        self.compaction = compaction
        self.loss_chunk = loss_chunk
        self._compiled: dict[int, _Compiled] = {}
        self.grad_ready_hook: GradReadyHook | None = None  # never called (announces_buckets is False)
        if seq is not None:
            self._for_seq(seq)

    @property
    def note(self) -> str:  # type: ignore[override]
        """The ANE settings in a few words, for the run's log."""
        return (
            f"ANE programs: {self.programs} ({self.inputs} inputs), chip {self.chip} ({self.chip_note}), "
            f"executor {getattr(self.executor, 'name', type(self.executor).__name__)}"
        )

    # ---- staging ---------------------------------------------------------------------------------
    def _for_seq(self, seq: int) -> _Compiled:
        if seq not in self._compiled:
            ks = build_kernel_set(self.cfg, self.chip, self.inputs, seq=seq, programs=self.programs)
            c = _Compiled(ks, self.cfg.n_layers)
            c.stage_weights(self.params.layers)
            self._compiled[seq] = c
        return self._compiled[seq]

    def warmup(self, batch: int, seq: int) -> None:
        """Build this sequence length's programs (refusing any over the chip's limits), stage the weights
        into them and load (compile) each on the executor, before the first step."""
        c = self._for_seq(seq)
        load = getattr(self.executor, "load", None)  # executors are duck-typed: the simulator, runtimes
        if load is not None:
            for program in c.kernels:
                load(program)

    def after_update(self) -> None:
        """Re-stage the updated weights (fp16) into every layer's program inputs."""
        with self.times.phase("io"):
            for c in self._compiled.values():
                c.stage_weights(self.params.layers)

    def zero_grad(self) -> None:
        self.grads.flat.zero_()

    def close(self) -> None:
        self.dw.close()
        close = getattr(self.executor, "close", None)
        if close is not None:
            close()

    # ---- running programs --------------------------------------------------------------------------
    def _each(self, c: _Compiled, layer: int, program: str, **acts: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run ``program`` of ``layer`` on every sequence of token-major activations [B, S, C].

        Returns each output operand as token-major float32 [B, S, C]. Times the program runs as the
        ``ane`` phase and the host's copies into and out of its surfaces (fp16 conversion, padding,
        placement) as ``io``; both are parts of the forward and backward phases."""
        st = c.layers[layer][program]
        prog = st.program
        batch = next(iter(acts.values())).shape[0]
        results: dict[str, list[np.ndarray]] = {name: [] for name in prog.out_placements}
        ane_s = io_s = 0.0
        for b in range(batch):
            t0 = time.perf_counter()
            for name, value in acts.items():
                st.write(name, value[b].T.numpy())  # channel-first [C, S]
            t1 = time.perf_counter()
            out = self.executor.run(prog, st.arrays)
            t2 = time.perf_counter()
            for name in results:
                results[name].append(read_operand(prog, out, name).T)
            io_s += (t1 - t0) + (time.perf_counter() - t2)
            ane_s += t2 - t1
        self.times.add("ane", 1e3 * ane_s)
        self.times.add("io", 1e3 * io_s)
        return {name: torch.from_numpy(np.stack(vals)) for name, vals in results.items()}

    # ---- the attention backward -------------------------------------------------------------------
    def _attention_backward(
        self, c: _Compiled, layer: int, t: _Taps, dattn: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """dq [B, S, Dq], dk, dv [B, S, Dkv] (w.r.t. the projections' outputs) from dattn [B, S, Dq]."""
        if not c.kernels.host_attention:  # anetrain's programs: all of it on the ANE
            b1 = self._each(c, layer, "sdpa_bwd1", q_rope=t.q_rope, k_rope=t.k_rope, v=t.v, dattn=dattn)
            b2 = self._each(c, layer, "sdpa_bwd2", p=b1["p"], dp=b1["dp"], q_rope=t.q_rope, k_rope=t.k_rope)
            return b2["dq"], b2["dk"], b1["dv"]
        # The original's: K, V tiled to the query heads here; the group sums and inverse RoPE here after.
        k_tiled, v_tiled = self._tile(t.k_rope), self._tile(t.v)  # [B, S, Dq]
        b1 = self._each(c, layer, "sdpa_bwd1", q_rope=t.q_rope, k_tiled=k_tiled, v_tiled=v_tiled, dattn=dattn)
        b2 = self._each(c, layer, "sdpa_bwd2", p=b1["p"], dp=b1["dp"], q_rope=t.q_rope, k_tiled=k_tiled)
        dq = self._unrotate(c.rope, b2["dq_rope"])  # [B, S, Dq]
        dk = self._unrotate(c.rope, self._group_sum(b2["dk_full"]))  # [B, S, Dkv]
        dv = self._group_sum(b1["dv_full"])  # [B, S, Dkv]
        return dq, dk, dv

    def _tile(self, kv: torch.Tensor) -> torch.Tensor:
        """[B, S, Hkv*dh] -> [B, S, H*dh]: query head h gets kv head h // R."""
        b, s, _ = kv.shape
        heads = kv.view(b, s, self.cfg.n_kv_heads, self.cfg.head_dim)  # [B, S, Hkv, dh]
        return heads.repeat_interleave(self.cfg.gqa_ratio, dim=2).reshape(b, s, self.cfg.q_dim)

    def _group_sum(self, full: torch.Tensor) -> torch.Tensor:
        """[B, S, H*dh] -> [B, S, Hkv*dh]: each kv head's gradient is the sum over its R query heads."""
        b, s, _ = full.shape
        groups = full.view(b, s, self.cfg.n_kv_heads, self.cfg.gqa_ratio, self.cfg.head_dim)
        return groups.sum(dim=3).reshape(b, s, self.cfg.n_kv_heads * self.cfg.head_dim)

    def _unrotate(self, rope: K.Rope, d: torch.Tensor) -> torch.Tensor:
        """The inverse RoPE (RoPE's backward) on per-head gradients [B, S, n*dh]."""
        b, s, width = d.shape
        heads = d.view(b, s, width // self.cfg.head_dim, self.cfg.head_dim)
        return K.rope_backward(heads, rope.cos[:s], rope.sin[:s]).reshape(b, s, width)

    def _classifier(self, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The classifier weight and targets, compacted if asked."""
        return compacted(self.params.classifier, targets, self.compaction)

    # ---- forward ---------------------------------------------------------------------------------
    def _forward(self, tokens: torch.Tensor, keep: bool) -> tuple[torch.Tensor, list[_Taps]]:
        cfg, p = self.cfg, self.params
        alpha, eps = cfg.residual_scale, cfg.norm_eps
        c = self._for_seq(tokens.shape[1])
        x = K.embedding_forward(tokens, p.embedding)  # [B, S, D]
        taps: list[_Taps] = []
        for i, w in enumerate(p.layers):
            xn, rstd = K.rmsnorm_forward(x, w.attention_norm, eps)
            a = self._each(c, i, "sdpa_fwd", xn=xn)
            o = self._each(c, i, "wo_fwd", attn=a["attn"])["o"]
            x2 = x + alpha * o
            xn2, rstd2 = K.rmsnorm_forward(x2, w.ffn_norm, eps)
            f = self._each(c, i, "ffn_fused", xn2=xn2, x2=x2)
            if keep:
                taps.append(
                    _Taps(
                        x,
                        rstd,
                        xn,
                        a["attn"],
                        a["q_rope"],
                        a["k_rope"],
                        a["v"],
                        x2,
                        rstd2,
                        xn2,
                        f["h1"],
                        f["h3"],
                        f["g"],
                    )
                )
            x = f["x_next"]
        return x, taps

    @torch.no_grad()
    def loss(self, window: torch.Tensor) -> float:
        tokens, targets = window[:, :-1], window[:, 1:]
        x, _ = self._forward(tokens, keep=False)
        xf, _ = K.rmsnorm_forward(x, self.params.final_norm, self.cfg.norm_eps)
        w, t = self._classifier(targets)
        loss, _, _ = K.classifier_loss(xf, w, t, chunk=self.loss_chunk)
        return float(loss)

    # ---- one micro-step --------------------------------------------------------------------------
    @torch.no_grad()
    def forward_backward(self, window: torch.Tensor, grad_scale: float = 1.0) -> float:
        cfg, p, g, dw, times = self.cfg, self.params, self.grads, self.dw, self.times
        dw_busy0 = dw.busy_ms
        alpha, eps = cfg.residual_scale, cfg.norm_eps
        tokens, targets = window[:, :-1], window[:, 1:]

        with times.phase("forward"):
            x, taps = self._forward(tokens, keep=True)
            xf, rstd_f = K.rmsnorm_forward(x, p.final_norm, eps)
            w_cls, t_cls = self._classifier(targets)
            loss, dxf, dlogits = K.classifier_loss(xf, w_cls, t_cls, grad_scale, chunk=self.loss_chunk)

        with times.phase("backward_dx"):
            c = self._for_seq(tokens.shape[1])
            if self.compaction is None:
                dw.submit(K.weight_grad, g.classifier, dlogits, xf)
            else:
                dw.submit(K.scattered_weight_grad, g.classifier, self.compaction.ids, dlogits, xf)
            dy, dg_final = K.rmsnorm_backward(dxf, x, rstd_f, p.final_norm)
            g.final_norm.add_(dg_final)
            for i in reversed(range(cfg.n_layers)):
                w, gw, t = p.layers[i], g.layers[i], taps[i]
                # FFN half
                dffn = alpha * dy
                dgate = self._each(c, i, "ffn_bwd_w2t", dffn=dffn)["dg"]
                dh1, dh3 = K.swiglu_backward(dgate, t.h1, t.h3)
                dxn2 = self._each(c, i, "ffn_bwd_w13t", dh1=dh1, dh3=dh3)["dxn2"]
                dw.submit(K.weight_grad, gw.w2, dffn, t.g)
                dw.submit(K.weight_grad, gw.w1, dh1, t.xn2)
                dw.submit(K.weight_grad, gw.w3, dh3, t.xn2)
                dx2, dg_ffn = K.rmsnorm_backward(dxn2, t.x2, t.rstd2, w.ffn_norm)
                gw.ffn_norm.add_(dg_ffn)
                dx2 = dx2 + dy
                # attention half
                do = alpha * dx2
                dattn = self._each(c, i, "wot_bwd", do=do)["dattn"]
                dw.submit(K.weight_grad, gw.wo, do, t.attn)
                dq, dk, dv = self._attention_backward(c, i, t, dattn)
                dw.submit(K.weight_grad, gw.wq, dq, t.xn)
                dw.submit(K.weight_grad, gw.wk, dk, t.xn)
                dw.submit(K.weight_grad, gw.wv, dv, t.xn)
                dxn = self._each(c, i, "q_bwd", dq=dq)["dx"] + self._each(c, i, "kv_bwd", dk=dk, dv=dv)["dx"]
                dx, dg_att = K.rmsnorm_backward(dxn, t.x, t.rstd, w.attention_norm)
                gw.attention_norm.add_(dg_att)
                dy = dx + dx2
            K.embedding_backward(g.embedding, tokens, dy)
        times.add("wait", dw.wait())
        dw_ms = dw.busy_ms - dw_busy0
        times.add("dw", dw_ms)
        if isinstance(dw, SerialDW):
            times.add("backward_dx", -dw_ms)
        return float(loss)
