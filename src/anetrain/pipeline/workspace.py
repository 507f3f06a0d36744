"""The optimized pipeline's buffers: every tensor a micro-step writes, each declared with its shape.

One micro-step of B sequences of S tokens reads and writes only these (allocated once per (B, S) by
:func:`make_workspace`), so a steady-state 16-bit step does not call the allocator. Shapes use the symbols of
:class:`~anetrain.backends.buffers.Dims` (N = B*S tokens, D model dim, F FFN dim, H / Hkv query / kv heads,
dh head dim, R = H/Hkv, Dq = H*dh, Dqkv = Dq + 2*Hkv*dh, V classifier rows); the dtype is the compute dtype
(bf16, fp16 or fp32) unless marked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backends.buffers import FP32, INT64, Dims, allocate, buf
from ..backends.fusion import FusionScratch, HandFusion, attention_tables
from ..config import ModelConfig
from ..lora import GROUPS, LoraConfig, io_dims


@dataclass
class LayerBuffers:
    """One layer's taps (what its backward reads) and its weight-gradient operands."""

    x: torch.Tensor = buf("B S D")  # layer input
    rstd1: torch.Tensor = buf("B S 1", FP32)  # attention norm's 1/rms
    xn: torch.Tensor = buf("B S D")  # normalized input: dW operand of qkv
    q: torch.Tensor = buf("B H S dh")  # rotated, pre-scaled by 1/sqrt(dh); stored as [B, Hkv, R, S, dh]
    k: torch.Tensor = buf("B Hkv S dh")  # rotated
    v: torch.Tensor = buf("B Hkv S dh")
    p: torch.Tensor = buf("B*Hkv R*S S")  # attention probabilities
    attn: torch.Tensor = buf("B S Dq")  # attention output: dW operand of wo
    x2: torch.Tensor = buf("B S D")  # FFN input
    rstd2: torch.Tensor = buf("B S 1", FP32)  # FFN norm's 1/rms
    xn2: torch.Tensor = buf("B S D")  # dW operand of w13
    h13: torch.Tensor = buf("B S 2*F")  # [h1 | h3], gate and up projections
    g: torch.Tensor = buf("B S F")  # silu(h1) * h3: dW operand of w2
    df: torch.Tensor = buf("B S D")  # alpha * dy: dW operand of w2
    dh13: torch.Tensor = buf("B S 2*F")  # dW operand of w13
    do: torch.Tensor = buf("B S D")  # alpha * dx2: dW operand of wo
    dqkv: torch.Tensor = buf("B S Dqkv")  # dW operand of qkv
    # QK-norm: the q and k heads before the norm, and their 1/rms
    qk: torch.Tensor = buf("B S Hqk dh", only="qknorm")
    qk_rstd: torch.Tensor = buf("B S Hqk 1", FP32, only="qknorm")
    # LoRA: each group's u = s x A^T (forward tap, dW operand of the B's), du = s dy B (dW operand of the A's)
    u_qkv: torch.Tensor = buf("B S Uqkv")
    u_o: torch.Tensor = buf("B S Uo")
    u_13: torch.Tensor = buf("B S U13")
    u_2: torch.Tensor = buf("B S U2")
    du_qkv: torch.Tensor = buf("B S Uqkv")
    du_o: torch.Tensor = buf("B S Uo")
    du_13: torch.Tensor = buf("B S U13")
    du_2: torch.Tensor = buf("B S U2")


@dataclass
class Workspace:
    """A micro-step's buffers: the layers' own, those the layers take turns with, and the fusion's."""

    dims: Dims
    layers: list[LayerBuffers]
    scratch: FusionScratch
    # the window
    tokens: torch.Tensor = buf("N", INT64)
    targets: torch.Tensor = buf("N", INT64)  # classifier rows (compacted ids with a compacted vocabulary)
    targets_full: torch.Tensor = buf("N", INT64, only="compaction")  # vocabulary ids
    # forward
    x: torch.Tensor = buf("B S D", FP32)  # the residual stream
    qkv: torch.Tensor = buf("B S Dqkv")  # q/k/v projection
    scores: torch.Tensor = buf("B*Hkv R*S S")  # q k^T
    out: torch.Tensor = buf("B H S dh")  # P v, heads first
    o: torch.Tensor = buf("B S D")  # attention block output
    f: torch.Tensor = buf("B S D")  # FFN block output
    xL: torch.Tensor = buf("B S D")  # the last layer's output (final norm's input)
    rstdf: torch.Tensor = buf("B S 1", FP32)  # final norm's 1/rms
    xf: torch.Tensor = buf("B S D")  # final norm's output: the classifier's input
    loss: torch.Tensor = buf("", FP32)  # summed cross-entropy of the micro-batch
    loss_w: torch.Tensor = buf("N", FP32)  # a loss mask's weights (1: the target counts, 0: it does not)
    dlogits: torch.Tensor = buf("N V")  # the logits, overwritten chunk by chunk with their gradient
    # backward
    dxf: torch.Tensor = buf("B S D")
    dy: torch.Tensor = buf("B S D", FP32)  # gradient of the residual stream
    dx2: torch.Tensor = buf("B S D", FP32)  # ... at the FFN block's input
    dg: torch.Tensor = buf("B S F")
    dxn: torch.Tensor = buf("B S D")
    dattn: torch.Tensor = buf("B S Dq")
    dout: torch.Tensor = buf("B H S dh")
    dp: torch.Tensor = buf("B*Hkv R*S S")
    ds: torch.Tensor = buf("B*Hkv R*S S")
    dq: torch.Tensor = buf("B H S dh")
    dk: torch.Tensor = buf("B Hkv S dh")
    dv: torch.Tensor = buf("B Hkv S dh")
    # weight-gradient products in the compute dtype, one per shape (only the dW executor touches these)
    mm_qkv: torch.Tensor = buf("Dqkv D")
    mm_wo: torch.Tensor = buf("D Dq")
    mm_w13: torch.Tensor = buf("2*F D")
    mm_w2: torch.Tensor = buf("D F")
    mm_cls: torch.Tensor = buf("Vblk D")  # the classifier's product, formed a block of rows at a time
    lora_prod: torch.Tensor = buf("P")  # LoRA: any one adapter's product
    acc_scratch: torch.Tensor = buf("A", FP32, only="hand")  # 16-bit products added into fp32 gradients
    cls_grad: torch.Tensor = buf("V D", FP32, only="compaction")  # the compacted classifier's gradient


def block_rows(rows: int, cols: int, limit: int = 1 << 23) -> int:
    """Rows per block when a [rows, cols] product is formed in equal blocks of at most ``limit`` elements."""
    blocks = -(-rows * cols // limit)
    return -(-rows // blocks)


def workspace_dims(
    cfg: ModelConfig,
    batch: int,
    seq: int,
    classifier_rows: int,
    loss_chunk: int,
    lora: LoraConfig | None = None,
) -> Dims:
    """The sizes of a workspace for [batch, seq] micro-batches: the one place they are computed."""
    d, f = cfg.dim, cfg.hidden_dim
    widths = {g: 0 for g in GROUPS}
    prod = 0
    if lora is not None:
        for g, members in GROUPS.items():
            adapted = [m for m in members if m in lora.targets]
            widths[g] = lora.rank * len(adapted)
            for m in adapted:
                d_in, d_out = io_dims(cfg, m)
                prod = max(prod, widths[g] * d_in, d_out * lora.rank)
    return Dims(
        B=batch,
        S=seq,
        D=d,
        F=f,
        H=cfg.n_heads,
        Hkv=cfg.n_kv_heads,
        dh=cfg.head_dim,
        V=classifier_rows,
        C=min(loss_chunk, batch * seq),
        Vblk=block_rows(classifier_rows, d),
        A=min(1 << 20, max(classifier_rows, 2 * f) * d),
        Uqkv=widths["qkv"],
        Uo=widths["wo"],
        U13=widths["w13"],
        U2=widths["w2"],
        P=prod,
    )


def make_workspace(
    cfg: ModelConfig,
    dims: Dims,
    compute: torch.dtype,
    device: torch.device,
    elementwise: HandFusion,
    compaction: bool,
) -> Workspace:
    features = frozenset(
        {elementwise.name, *(("compaction",) if compaction else ()), *(("qknorm",) if cfg.qk_norm else ())}
    )
    tables = attention_tables(dims.S, dims.dh, cfg.rope_theta, device)
    return allocate(
        Workspace,
        dims,
        compute,
        device,
        features,
        dims=dims,
        layers=[allocate(LayerBuffers, dims, compute, device, features) for _ in range(cfg.n_layers)],
        scratch=elementwise.make_scratch(dims, compute, tables, features),
    )
