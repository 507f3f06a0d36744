"""The dynamic-weight kernel set of a model: every program the ANE runs.

Two program sets (:data:`PROGRAM_SETS`) implement the same ten kernels:

``original`` (the default)
    the original trainer's programs, as its generator writes them (:mod:`.original`): byte for byte its text
    for its configuration, one packed input and one output each, the RoPE and GQA bookkeeping of the
    backward on the CPU; corrected only where the original is wrong (GQA head mapping).
``anetrain``
    this project's own forms, defined below with :class:`~.program.KernelDef`: RoPE as a matmul by a
    constant signed permutation, GQA expansion and reduction as constant matmuls, the inverse RoPE inside
    ``sdpa_bwd2``; with ``packed`` inputs (one surface, as the original) or ``separate`` ones (one surface per
    operand). **Never run on hardware**; kept for comparison and as fallbacks ``anetrain ane selfcheck``
    tries when a Mac refuses an original program.

As in the original's dynamic pipeline (docs/original.md), weights are program inputs, so each kernel is
compiled once and shared by all layers; RMSNorm, the SiLU backward, the classifier and loss, the embedding
and every dW GEMM stay on the CPU. Per layer, the ``anetrain`` set (``x`` the residual stream; activations
channel-first)::

    forward   sdpa_fwd      xn -> q,k,v = Wq xn, Wk xn, Wv xn; RoPE(q, k); causal GQA attention
                            -> attn, q_rope, k_rope, v
              wo_fwd        attn -> o = Wo attn                      (CPU: x2 = x + alpha o)
              ffn_fused     xn2, x2 -> h1 = W1 xn2, h3 = W3 xn2, g = silu(h1) h3, x' = x2 + alpha W2 g
    dx        ffn_bwd_w2t   dffn -> dg = W2^T dffn                   (CPU: SiLU backward -> dh1, dh3)
              ffn_bwd_w13t  dh1, dh3 -> dxn2 = W1^T dh1 + W3^T dh3
              wot_bwd       do -> dattn = Wo^T do
              sdpa_bwd1     q_rope, k_rope, v, dattn -> P (recomputed), dP = dO V^T, dV = sum_group P^T dO
              sdpa_bwd2     P, dP, q_rope, k_rope -> dS = P (dP - rowsum(P dP)) / sqrt(dh);
                            dQ = RoPE^-1(dS K), dK = RoPE^-1(sum_group dS^T Q)
              q_bwd         dq -> Wq^T dq
              kv_bwd        dk, dv -> Wk^T dk + Wv^T dv
    extras    rmsnorm       x, g -> x * rsqrt(mean x^2 + eps) * g   (the final norm, or any norm)
              classifier    xf -> logits = Wcls xf
              softmax       logits -> softmax over the vocabulary (channels)
              rmsnorm_bwd   dy, x, g -> dx (the gain's gradient stays on the CPU)

Attention is explicit (the fused SDPA op ignores causal masks): scores, scale, an additive mask constant,
softmax, matmul. RoPE is interleaved (llama2.c): with the pair-swap ``rot(x)[2i] = -x[2i+1]``,
``rot(x)[2i+1] = x[2i]`` done as a matmul by a constant signed permutation, ``RoPE(x) = x cos + rot(x) sin``
and its inverse ``x cos - rot(x) sin``. GQA maps query head h to kv head h // R: K and V are expanded to
H heads by a constant 0/1 matrix (a matmul, exact) and dK, dV are summed back over each group by its
transpose. The scale 1/sqrt(dh) uses the real head_dim; padded dimensions are zero (see :mod:`.shapes`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from ..config import ModelConfig
from ..errors import ConfigError
from .dialect import Dialect, dialect_for
from .limits import check_graph
from .mil import Var
from .original import OriginalProgram, original_programs
from .program import CONVENTIONS, MASK_VALUE, AneProgram, KernelContext, KernelDef, OperandSpec, build_program
from .shapes import Dims

PROGRAM_SETS = ("original", "anetrain")  # the first is the default
FORWARD = ("sdpa_fwd", "wo_fwd", "ffn_fused")
BACKWARD = ("ffn_bwd_w2t", "ffn_bwd_w13t", "wot_bwd", "sdpa_bwd1", "sdpa_bwd2", "q_bwd", "kv_bwd")
EXTRAS = ("rmsnorm", "classifier", "softmax", "rmsnorm_bwd")


# ------------------------------------------------------------------------------------------------
# Constants


def causal_mask(s_p: int) -> np.ndarray:
    """[1, 1, S, S]: 0 where key t' <= query t, MASK_VALUE where t' > t."""
    m = np.triu(np.full((s_p, s_p), MASK_VALUE, dtype=np.float32), k=1)
    return m.reshape(1, 1, s_p, s_p)


def rope_tables(dims: Dims) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """cos, sin: [1, 1, dh_p, S_p] per dimension (each pair's angle twice; padded rows 0) and the pair-swap
    matrix rot: [1, 1, dh_p, dh_p] with rot @ x = (-x1, x0, -x3, x2, ...)."""
    cfg, dh, dh_p, s_p = dims.cfg, dims.cfg.head_dim, dims.dh_p, dims.S.np
    freqs = 1.0 / (cfg.rope_theta ** (np.arange(0, dh, 2, dtype=np.float64) / dh))  # [dh/2]
    ang = np.outer(freqs, np.arange(s_p, dtype=np.float64))  # [dh/2, S]
    cos = np.zeros((dh_p, s_p))
    sin = np.zeros((dh_p, s_p))
    cos[0:dh:2], cos[1:dh:2] = np.cos(ang), np.cos(ang)
    sin[0:dh:2], sin[1:dh:2] = np.sin(ang), np.sin(ang)
    rot = np.zeros((dh_p, dh_p))
    i = np.arange(0, dh, 2)
    rot[i, i + 1] = -1.0
    rot[i + 1, i] = 1.0
    return cos.reshape(1, 1, dh_p, s_p), sin.reshape(1, 1, dh_p, s_p), rot.reshape(1, 1, dh_p, dh_p)


def gqa_expand(dims: Dims) -> np.ndarray:
    """[1, 1, Dq_p, Dkv_p]: row h*dh_p + d has a 1 at column (h // R)*dh_p + d."""
    cfg, dh_p = dims.cfg, dims.dh_p
    r = cfg.gqa_ratio
    e = np.zeros((dims.Dq.np, dims.Dkv.np), dtype=np.float32)
    for h in range(cfg.n_heads):
        j = h // r
        e[h * dh_p + np.arange(dh_p), j * dh_p + np.arange(dh_p)] = 1.0
    return e.reshape(1, 1, dims.Dq.np, dims.Dkv.np)


# ------------------------------------------------------------------------------------------------
# Building blocks shared by the kernels


def _heads(ctx: KernelContext, x: Var, n: int) -> Var:
    """[.., n*dh_p, S] -> [1, n, dh_p, S]."""
    return ctx.reshape(x, (1, n, ctx.dims.dh_p, ctx.dims.S.np))


def _rope(ctx: KernelContext, x: Var, inverse: bool = False) -> Var:
    """Interleaved RoPE (or its inverse) on per-head values [1, n, dh_p, S]."""
    b, d = ctx.b, ctx.dims
    cos, sin, rot = rope_tables(d)
    c = ctx.constant("rope_cos", lambda: cos)
    s = ctx.constant("rope_sin", lambda: sin)
    r = ctx.constant("rope_rot", lambda: rot)
    swapped = b.matmul(r, x)  # [1, n, dh_p, S]
    a, t = b.mul(x, c), b.mul(swapped, s)
    return b.sub(a, t) if inverse else b.add(a, t)


def _expand(ctx: KernelContext, x: Var) -> Var:
    """kv heads -> query heads (head h reads kv head h // R).  [.., Dkv_p, S] -> [1, H, dh_p, S]."""
    d, cfg = ctx.dims, ctx.cfg
    if cfg.gqa_ratio == 1:
        return _heads(ctx, x, cfg.n_heads)
    e = ctx.constant("gqa_expand", lambda: gqa_expand(d))
    flat = ctx.reshape(x, (1, 1, d.Dkv.np, d.S.np))
    return _heads(ctx, ctx.b.matmul(e, flat), cfg.n_heads)


def _reduce_groups(ctx: KernelContext, x: Var) -> Var:
    """Sum each group's R query heads into its kv head.  [1, H, dh_p, S] -> [1, Hkv, dh_p, S]."""
    d, cfg = ctx.dims, ctx.cfg
    if cfg.gqa_ratio == 1:
        return x
    e = ctx.constant("gqa_expand", lambda: gqa_expand(d))
    flat = ctx.reshape(x, (1, 1, d.Dq.np, d.S.np))
    return _heads(ctx, ctx.b.matmul(e, flat, transpose_x=True), cfg.n_kv_heads)


def _probs(ctx: KernelContext, q: Var, k: Var) -> Var:
    """Causal softmax(q^T k / sqrt(dh)) per head.  q, k: [1, H, dh_p, S] -> P: [1, H, S(query), S(key)]."""
    b, d = ctx.b, ctx.dims
    mask = ctx.constant("causal_mask", lambda: causal_mask(d.S.np))
    scores = b.matmul(q, k, transpose_x=True)
    scaled = b.mul(scores, 1.0 / math.sqrt(ctx.cfg.head_dim))
    return b.softmax(b.add(scaled, mask), axis=-1)


# ------------------------------------------------------------------------------------------------
# Kernel bodies


def _sdpa_fwd(ctx: KernelContext) -> dict[str, Var]:
    cfg = ctx.cfg
    xn = ctx.act("xn")
    q = _rope(ctx, _heads(ctx, ctx.linear("wq", xn), cfg.n_heads))
    k = _rope(ctx, _heads(ctx, ctx.linear("wk", xn), cfg.n_kv_heads))
    v = ctx.linear("wv", xn)
    p = _probs(ctx, q, _expand(ctx, k))
    attn = ctx.b.matmul(_expand(ctx, v), p, transpose_y=True)  # out[d, t] = sum_t' V[d, t'] P[t, t']
    return {"attn": attn, "q_rope": q, "k_rope": k, "v": v}


def _wo_fwd(ctx: KernelContext) -> dict[str, Var]:
    return {"o": ctx.linear("wo", ctx.act("attn"))}


def _ffn_fused(ctx: KernelContext) -> dict[str, Var]:
    b, alpha = ctx.b, ctx.cfg.residual_scale
    xn2 = ctx.act("xn2")
    h1 = ctx.linear("w1", xn2)
    h3 = ctx.linear("w3", xn2)
    g = b.mul(b.mul(h1, b.sigmoid(h1)), h3)
    f = ctx.linear("w2", g)
    x_next = b.add(ctx.act("x2"), f if alpha == 1.0 else b.mul(f, alpha))
    return {"x_next": x_next, "h1": h1, "h3": h3, "g": g}


def _ffn_bwd_w2t(ctx: KernelContext) -> dict[str, Var]:
    return {"dg": ctx.linear("w2", ctx.act("dffn"))}


def _ffn_bwd_w13t(ctx: KernelContext) -> dict[str, Var]:
    return {"dxn2": ctx.b.add(ctx.linear("w1", ctx.act("dh1")), ctx.linear("w3", ctx.act("dh3")))}


def _wot_bwd(ctx: KernelContext) -> dict[str, Var]:
    return {"dattn": ctx.linear("wo", ctx.act("do"))}


def _sdpa_bwd1(ctx: KernelContext) -> dict[str, Var]:
    b, cfg = ctx.b, ctx.cfg
    q = _heads(ctx, ctx.act("q_rope"), cfg.n_heads)
    dout = _heads(ctx, ctx.act("dattn"), cfg.n_heads)
    p = _probs(ctx, q, _expand(ctx, ctx.act("k_rope")))
    dv = _reduce_groups(ctx, b.matmul(dout, p))  # dV[d, t'] = sum_t dO[d, t] P[t, t']
    dp = b.matmul(dout, _expand(ctx, ctx.act("v")), transpose_x=True)  # dP[t, t'] = sum_d dO[d, t] V[d, t']
    return {"dv": dv, "p": p, "dp": dp}


def _sdpa_bwd2(ctx: KernelContext) -> dict[str, Var]:
    b, cfg, d = ctx.b, ctx.cfg, ctx.dims
    shape = (1, cfg.n_heads, d.S.np, d.S.np)
    p = ctx.reshape(ctx.act("p"), shape)
    dp = ctx.reshape(ctx.act("dp"), shape)
    rowsum = b.reduce_sum(b.mul(p, dp), axes=[-1], keep_dims=True)  # [1, H, S, 1]
    ds = b.mul(b.mul(p, b.sub(dp, rowsum)), 1.0 / math.sqrt(cfg.head_dim))
    q = _heads(ctx, ctx.act("q_rope"), cfg.n_heads)
    dq = b.matmul(
        _expand(ctx, ctx.act("k_rope")), ds, transpose_y=True
    )  # dQ[d, t] = sum_t' K[d, t'] dS[t, t']
    dk = _reduce_groups(ctx, b.matmul(q, ds))  # dK[d, t'] = sum_t Q[d, t] dS[t, t']
    return {"dq": _rope(ctx, dq, inverse=True), "dk": _rope(ctx, dk, inverse=True)}


def _q_bwd(ctx: KernelContext) -> dict[str, Var]:
    return {"dx": ctx.linear("wq", ctx.act("dq"))}


def _kv_bwd(ctx: KernelContext) -> dict[str, Var]:
    return {"dx": ctx.b.add(ctx.linear("wk", ctx.act("dk")), ctx.linear("wv", ctx.act("dv")))}


def _rstd(ctx: KernelContext, x: Var) -> Var:
    """1/sqrt(mean_c x^2 + eps) per token: [1, 1, D, S] -> [1, 1, 1, S].

    x is scaled by 1/sqrt(D) before squaring so the sum is already the mean: no fp16 overflow of the sum of
    squares for activations up to ~256 in magnitude (the original's static ANE RMSNorm summed first).
    """
    b, cfg = ctx.b, ctx.cfg
    xs = b.mul(x, 1.0 / math.sqrt(cfg.dim))
    ms = b.reduce_sum(b.mul(xs, xs), axes=[2], keep_dims=True)
    return b.pow(b.add(ms, cfg.norm_eps), -0.5)


def _rmsnorm(ctx: KernelContext) -> dict[str, Var]:
    b, x = ctx.b, ctx.act("xin")
    return {"y": b.mul(b.mul(x, _rstd(ctx, x)), ctx.act("g"))}


def _rmsnorm_bwd(ctx: KernelContext) -> dict[str, Var]:
    """dx = r * (dy g - xhat * mean(dy g xhat)), xhat = x r."""
    b, x = ctx.b, ctx.act("xin")
    r = _rstd(ctx, x)
    xhat = b.mul(x, r)
    dyg = b.mul(ctx.act("dy"), ctx.act("g"))
    proj = b.reduce_sum(b.mul(dyg, b.mul(xhat, 1.0 / ctx.cfg.dim)), axes=[2], keep_dims=True)
    return {"dx": b.mul(b.sub(dyg, b.mul(xhat, proj)), r)}


def _classifier(ctx: KernelContext) -> dict[str, Var]:
    return {"logits": ctx.linear("wcls", ctx.act("xf"))}


def _softmax(ctx: KernelContext) -> dict[str, Var]:
    return {"probs": ctx.b.softmax(ctx.act("logits"), axis=2)}


# ------------------------------------------------------------------------------------------------
# The kernel set


def kernel_defs(dims: Dims) -> dict[str, KernelDef]:
    """Every kernel definition for these dimensions, in execution order (forward, dx, extras)."""
    D, F, S, Dq, Dkv, HS, V, ONE = dims.D, dims.F, dims.S, dims.Dq, dims.Dkv, dims.HS, dims.V, dims.ONE

    def a(name: str, rows: object) -> OperandSpec:
        return OperandSpec(name, rows, S)  # type: ignore[arg-type]

    def w(name: str, out: object, inp: object, use: str) -> OperandSpec:
        return OperandSpec(name, out, inp, "weight", use)  # type: ignore[arg-type]

    g = OperandSpec("g", D, ONE, "vector")
    defs = [
        KernelDef(
            "sdpa_fwd",
            "QKV projections, RoPE on q and k, causal GQA attention",
            (a("xn", D), w("wq", Dq, D, "fwd"), w("wk", Dkv, D, "fwd"), w("wv", Dkv, D, "fwd")),
            (a("attn", Dq), a("q_rope", Dq), a("k_rope", Dkv), a("v", Dkv)),
            _sdpa_fwd,
        ),
        KernelDef(
            "wo_fwd",
            "output projection o = Wo attn",
            (a("attn", Dq), w("wo", D, Dq, "fwd")),
            (a("o", D),),
            _wo_fwd,
        ),
        KernelDef(
            "ffn_fused",
            "SwiGLU FFN with the residual: x' = x2 + alpha W2 (silu(W1 xn2) * W3 xn2)",
            (a("xn2", D), a("x2", D), w("w1", F, D, "fwd"), w("w3", F, D, "fwd"), w("w2", D, F, "fwd")),
            (a("x_next", D), a("h1", F), a("h3", F), a("g", F)),
            _ffn_fused,
        ),
        KernelDef(
            "ffn_bwd_w2t", "dg = W2^T dffn", (a("dffn", D), w("w2", D, F, "bwd")), (a("dg", F),), _ffn_bwd_w2t
        ),
        KernelDef(
            "ffn_bwd_w13t",
            "dxn2 = W1^T dh1 + W3^T dh3",
            (a("dh1", F), a("dh3", F), w("w1", F, D, "bwd"), w("w3", F, D, "bwd")),
            (a("dxn2", D),),
            _ffn_bwd_w13t,
        ),
        KernelDef(
            "wot_bwd", "dattn = Wo^T do", (a("do", D), w("wo", D, Dq, "bwd")), (a("dattn", Dq),), _wot_bwd
        ),
        KernelDef(
            "sdpa_bwd1",
            "attention backward part 1: recompute P; dP = dO V^T; dV = P^T dO summed per kv group",
            (a("q_rope", Dq), a("k_rope", Dkv), a("v", Dkv), a("dattn", Dq)),
            (a("dv", Dkv), a("p", HS), a("dp", HS)),
            _sdpa_bwd1,
        ),
        KernelDef(
            "sdpa_bwd2",
            "attention backward part 2: softmax backward; dQ, dK (GQA-reduced) through inverse RoPE",
            (a("p", HS), a("dp", HS), a("q_rope", Dq), a("k_rope", Dkv)),
            (a("dq", Dq), a("dk", Dkv)),
            _sdpa_bwd2,
        ),
        KernelDef("q_bwd", "dx = Wq^T dq", (a("dq", Dq), w("wq", Dq, D, "bwd")), (a("dx", D),), _q_bwd),
        KernelDef(
            "kv_bwd",
            "dx = Wk^T dk + Wv^T dv",
            (a("dk", Dkv), a("dv", Dkv), w("wk", Dkv, D, "bwd"), w("wv", Dkv, D, "bwd")),
            (a("dx", D),),
            _kv_bwd,
        ),
        KernelDef(
            "rmsnorm", "RMSNorm y = x rstd g (the final norm)", (a("xin", D), g), (a("y", D),), _rmsnorm
        ),
        KernelDef(
            "classifier",
            "logits = Wcls xf",
            (a("xf", D), w("wcls", V, D, "fwd")),
            (a("logits", V),),
            _classifier,
        ),
        KernelDef(
            "softmax", "softmax over the vocabulary (channels)", (a("logits", V),), (a("probs", V),), _softmax
        ),
        KernelDef(
            "rmsnorm_bwd",
            "RMSNorm backward dx (the gain's gradient stays on the CPU)",
            (a("dy", D), a("xin", D), g),
            (a("dx", D),),
            _rmsnorm_bwd,
        ),
    ]
    return {k.name: k for k in defs}


@dataclass
class KernelSet:
    """The programs of one model, chip, program set, input convention and sequence length."""

    cfg: ModelConfig
    dialect: Dialect
    convention: str
    dims: Dims
    programs: dict[str, AneProgram] = field(default_factory=dict)
    program_set: str = "original"

    @property
    def host_attention(self) -> bool:
        """True when the host does the original's attention bookkeeping around ``sdpa_bwd1``/``sdpa_bwd2``:
        K, V tiled to the query heads before, dK, dV summed over each group and the inverse RoPE after."""
        return self.program_set == "original"

    def __getitem__(self, name: str) -> AneProgram:
        return self.programs[name]

    def __iter__(self) -> Iterator[AneProgram]:
        return iter(self.programs.values())

    def __len__(self) -> int:
        return len(self.programs)


def _from_original(p: OriginalProgram, dims: Dims, dialect: Dialect) -> AneProgram:
    check_graph(p.graph, p.name, dialect.chip, dialect.opset)
    x, out = p.tensors()
    return AneProgram(
        name=p.name,
        doc=p.doc,
        dialect=dialect,
        convention="packed",
        mil_text=p.text(dialect),
        weights=p.blobs(),
        inputs=[x],
        outputs=[out],
        in_placements=p.in_placements,
        out_placements=p.out_placements,
        padding=dims.padding(),
        meta={"seq": dims.seq, "seq_padded": dims.S.np, "model": dims.cfg.shape_line()},
        graph=p.graph,
        program_set="original",
        stem=p.original_name,
    )


def check_program_choice(programs: str, inputs: str) -> None:
    """Refuse an unknown program set or input convention, or the original's programs with separate inputs."""
    if programs not in PROGRAM_SETS:
        raise ConfigError(f"unknown ANE program set {programs!r} (known: {', '.join(PROGRAM_SETS)})")
    if inputs not in CONVENTIONS:
        raise ConfigError(f"unknown input convention {inputs!r} (known: {', '.join(CONVENTIONS)})")
    if programs == "original" and inputs != "packed":
        raise ConfigError(
            "the original's ANE programs take one packed input; --ane-inputs separate needs "
            "--ane-programs anetrain (never run on hardware)"
        )


def build_kernel_set(
    cfg: ModelConfig,
    chip: str = "m4",
    inputs: str = "packed",
    seq: int | None = None,
    extras: bool = False,
    programs: str = "original",
) -> KernelSet:
    """Every program for ``cfg`` on ``chip``: the ten of ``programs`` (``original`` or ``anetrain``) with the
    given input convention (``packed``, or ``separate`` for the anetrain set).

    ``seq`` defaults to the model's seq_len; ``extras`` adds anetrain's final RMSNorm, classifier, softmax
    and RMSNorm backward programs (the original has none). Raises :class:`~.limits.AneLimitError` when a
    program exceeds the chip's limits.
    """
    dialect = dialect_for(chip)
    if seq is not None and seq < 1:
        raise ConfigError(f"sequence length must be at least 1, got {seq}")
    check_program_choice(programs, inputs)
    dims = Dims.build(cfg, seq)
    defs = kernel_defs(dims)
    progs: dict[str, AneProgram] = {}
    if programs == "original":
        progs = {n: _from_original(p, dims, dialect) for n, p in original_programs(dims).items()}
    else:
        progs = {n: build_program(defs[n], dims, dialect, inputs) for n in FORWARD + BACKWARD}
    if extras:
        progs.update({n: build_program(defs[n], dims, dialect, inputs) for n in EXTRAS})
    for p in progs.values():
        p.meta["residual_scale"] = cfg.residual_scale
    return KernelSet(cfg, dialect, inputs, dims, progs, programs)
