"""The original trainer's ten Neural Engine programs, written exactly as its generator writes them.

The original's dynamic pipeline (docs/original.md, "The dynamic pipeline") hands the Neural Engine ten
programs per model, each with **one packed fp16 input** ``x`` (activations, then weights, sliced apart with
``slice_by_size``) and **one output** ``out`` (the results concatenated along the channels). Its generator
writes them statement by statement with fixed names; this module writes the same statements in the same
order with the same names, constants and formatting, so for the original's configuration (stories110M:
dim 768, hidden 2048, 12 heads, seq 256, residual scale 1/sqrt(2L), M3-M5 dialect) every program is
byte-for-byte the text the original runs on an M4 (``tests/test_ane_original.py`` compares all ten with
``../shared/data/ane_reference/``). It stays parametric: any model and sequence length, any chip dialect
(M1/M2 get ``program(1.0)``/``ios16`` and verbose scalars), dimensions zero-padded to the ANE's
multiple-of-32 matmul rule (:mod:`.shapes`).

The programs (``D`` dim, ``F`` hidden, ``S`` seq, ``Dq = H dh``, ``Dkv = Hkv dh``, ``HS = H S``;
activations channel-first ``[C, S]``; a weight stored ``W^T`` is ``[in, out]``)::

    sdpaFwd     x [D, S+Dq+2Dkv] = xn | Wq^T | Wk^T | Wv^T
                -> out [2Dq+2Dkv+D, S] = attn | q_rope | k_rope | v | xn
                   q, k, v projections; RoPE (x cos + rot(x) sin with cos/sin blobs, rot by slicing the
                   pairs); K and V tiled to H heads by concat; explicit causal attention with a mask blob
    woFwd       x [Dq, S+D] = attn | Wo^T                      -> out [D, S] = Wo attn
    ffnFused    x [D, 2S+3F] = xn2 | x2 | W1^T | W3^T | W2     -> out [D+3F, S] = x' | h1 | h3 | g
                   g = silu(W1 xn2) * (W3 xn2), x' = x2 + alpha W2 g
    ffnBwdW2t   x [D, S+F] = dffn | W2                         -> out [F, S] = W2^T dffn
    ffnBwdW13t  x [F, 2S+2D] = dh1 | dh3 | W1 | W3             -> out [D, S] = W1^T dh1 + W3^T dh3
    wotBwd      x [D, S+Dq] = do | Wo                          -> out [Dq, S] = Wo^T do
    sdpaBwd1    x [4Dq, S] = q_rope ; k_tiled ; v_tiled ; dattn (stacked along channels)
                -> out [Dq+2HS, S] = dV_full | P | dP          (P recomputed; dP = dO V^T; dV = P^T dO)
    sdpaBwd2    x [2HS+2Dq, S] = P ; dP ; q_rope ; k_tiled
                -> out [2Dq, S] = dQ_rope | dK_full            (dS = P (dP - rowsum(P dP)) / sqrt(dh))
    qBwd        x [Dq, S+D] = dq | Wq                          -> out [D, S] = Wq^T dq
    kvBwd       x [Dkv, 2S+2D] = dk | dv | Wk | Wv             -> out [D, S] = Wk^T dk + Wv^T dv

What the original leaves to the CPU around them, anetrain also does on the CPU
(:class:`~.pipeline.AneSimPipeline`): tiling K and V from Hkv to H heads for the backward (head h reads kv
head h // R), summing dK_full and dV_full back over each group, and the inverse RoPE on dQ and dK.

**The one correction.** For GQA models (R = H / Hkv > 1) the original's forward tiles K and V by
concatenating R copies (``concat(interleave=false, values=(k_rope, k_rope))``), so query head h reads kv
head h mod Hkv, while its backward and every reference (and anetrain everywhere else) use h // R. anetrain
writes those two concats with ``interleave=true`` (copies interleaved: kv0, kv0, kv1, kv1, ...), one new
``bool`` constant and two changed lines (:func:`gqa_differences` lists them; ``docs/ane.md`` shows them).
For MHA models nothing differs. ``faithful_gqa=True`` writes the original's lines unchanged (used to pin
the difference list; never for training).

Constants are built as the original builds them: the causal mask with -65504 (fp16's lowest) above the
diagonal; RoPE angles in float32 C, ``theta = p / powf(base, 2.0f*i/(float)dh)``, ``cosf``/``sinf``, rounded
to fp16, each pair's value twice (``[1, 1, S, dh]``); scalars printed with C's ``%f``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .blob import build_blob
from .dialect import Dialect
from .mil import BLOB_PREFIX, ORIGINAL_STYLE, Const, Graph, MilBuildError, Node, Op, Var, render_text
from .shapes import Axis, Dims
from .surfaces import Placement, TensorSpec

MASK_FILL = -65504.0  # what the original writes above the diagonal: the lowest finite fp16
ORIGINAL_NAMES = {  # anetrain's name of each program -> the original's (its kernel and file name)
    "sdpa_fwd": "sdpaFwd",
    "wo_fwd": "woFwd",
    "ffn_fused": "ffnFused",
    "ffn_bwd_w2t": "ffnBwdW2t",
    "ffn_bwd_w13t": "ffnBwdW13t",
    "wot_bwd": "wotBwd",
    "sdpa_bwd1": "sdpaBwd1",
    "sdpa_bwd2": "sdpaBwd2",
    "q_bwd": "qBwd",
    "kv_bwd": "kvBwd",
}


# ------------------------------------------------------------------------------------------------
# Constants, as the original's C builds them


def c_float_text(value: float) -> str:
    """A float32 printed as C's ``printf("%f")`` prints it (the value promoted to double)."""
    return f"{float(np.float32(value)):f}"


def causal_mask_blob(s: int) -> np.ndarray:
    """[1, 1, S, S] fp16: 0 where key t' <= query t, -65504 where t' > t."""
    m = np.where(np.tril(np.ones((s, s), dtype=bool)), np.float16(0.0), np.float16(MASK_FILL))
    return m.astype(np.float16).reshape(1, 1, s, s)


@functools.cache
def _c_math() -> (
    tuple[Callable[[float, float], float], Callable[[float], float], Callable[[float], float]] | None
):
    """The C library's ``powf``, ``cosf``, ``sinf`` (what the original calls), or None where ctypes finds
    no C math library."""
    name = ctypes.util.find_library("m") or ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name)
        powf, cosf, sinf = lib.powf, lib.cosf, lib.sinf
    except (OSError, AttributeError, TypeError):
        return None
    powf.restype, powf.argtypes = ctypes.c_float, [ctypes.c_float, ctypes.c_float]
    for f in (cosf, sinf):
        f.restype, f.argtypes = ctypes.c_float, [ctypes.c_float]
    return powf, cosf, sinf


@functools.cache
def _rope_values(s: int, dh: int, base: float) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of every (position, pair) angle as float32 [S, dh/2], as the original's C computes them:
    ``theta = p / powf(base, 2.0f * i / (float)dh)``, ``cosf(theta)``, ``sinf(theta)``.

    Through the C library when there is one (so the values are the original's on the same machine); else
    in float64 rounded to float32 (correctly rounded; glibc's cosf/sinf differ from that in about 2% of
    float32 results, which changes about 3 in a million fp16 values).
    """
    i = np.arange(dh // 2, dtype=np.float32)
    expo = (np.float32(2.0) * i) / np.float32(dh)  # float32, as 2.0f*i/(float)dh
    pos = np.arange(s, dtype=np.float32)[:, None]
    libm = _c_math()
    if libm is None:
        denom = np.power(np.float64(np.float32(base)), expo.astype(np.float64)).astype(np.float32)
        theta = (pos / denom[None, :]).astype(np.float32)
        t64 = theta.astype(np.float64)
        return np.cos(t64).astype(np.float32), np.sin(t64).astype(np.float32)
    powf, cosf, sinf = libm
    denom = np.array([powf(float(np.float32(base)), float(e)) for e in expo], dtype=np.float32)
    theta = (pos / denom[None, :]).astype(np.float32).reshape(-1).tolist()
    cos = np.array([cosf(t) for t in theta], dtype=np.float32).reshape(s, dh // 2)
    sin = np.array([sinf(t) for t in theta], dtype=np.float32).reshape(s, dh // 2)
    return cos, sin


def rope_blobs(s_p: int, dh: int, dh_p: int, base: float) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin: [1, 1, S_p, dh_p] fp16; pair i's value at 2i and 2i+1 of each position; padding 0."""
    cos32, sin32 = _rope_values(s_p, dh, float(base))
    cos, sin = cos32.astype(np.float16), sin32.astype(np.float16)  # (_Float16) conversion: nearest even
    c = np.zeros((s_p, dh_p), dtype=np.float16)
    si = np.zeros((s_p, dh_p), dtype=np.float16)
    c[:, 0:dh:2], c[:, 1:dh:2] = cos, cos
    si[:, 0:dh:2], si[:, 1:dh:2] = sin, sin
    return c.reshape(1, 1, s_p, dh_p), si.reshape(1, 1, s_p, dh_p)


# ------------------------------------------------------------------------------------------------
# The statement writer


class _Writer:
    """Records a program statement by statement: every result name, op label and constant explicit.

    Each op method takes its operands in the original's parameter order and infers the result's shape
    (coremltools re-infers every shape in the tests, so a wrong one cannot pass unnoticed).
    """

    def __init__(self) -> None:
        self.inputs: list[Var] = []
        self.nodes: list[Node] = []
        self.blobs: dict[str, np.ndarray] = {}
        self.values: dict[str, np.ndarray] = {}  # constant name -> value (for shape inference)
        self._names: set[str] = set()
        self._labels: set[str] = set()

    def _claim(self, name: str, label: str) -> None:
        if name in self._names or label in self._labels:
            raise MilBuildError(f"name {name!r} or label {label!r} is used twice")
        self._names.add(name)
        self._labels.add(label)

    def input(self, name: str, shape: tuple[int, ...]) -> Var:
        self._claim(name, name)
        v = Var(name, "fp16", shape)
        self.inputs.append(v)
        return v

    # ---- constants -------------------------------------------------------------------------------
    def _const(self, name: str, dtype: str, value: object, label: str | None, text: str | None) -> Var:
        self._claim(name, label or name)
        arr = np.asarray(value)
        v = Var(name, dtype, tuple(arr.shape))
        self.nodes.append(Const(v, value, label=label, text=text))
        self.values[name] = arr
        return v

    def ints(self, name: str, values: list[int], label: str | None = None) -> Var:
        """``tensor<int32, [n]> name = const()``."""
        return self._const(name, "int32", np.asarray(values, dtype=np.int32), label, None)

    def int32(self, name: str, value: int) -> Var:
        return self._const(name, "int32", int(value), None, None)

    def boolean(self, name: str, value: bool) -> Var:
        return self._const(name, "bool", bool(value), None, None)

    def fp16(self, name: str, value: float, text: str) -> Var:
        """An fp16 scalar written as ``text`` (the original prints with ``%f`` or by hand)."""
        return self._const(name, "fp16", float(np.float16(value)), None, text)

    def blob(self, name: str, label: str, file: str, values: np.ndarray) -> Var:
        """A tensor constant in ``@model_path/weights/<file>.bin``."""
        self._claim(name, label)
        arr = np.ascontiguousarray(values, dtype=np.float16)
        path = f"{BLOB_PREFIX}{file}.bin"
        self.blobs[path] = arr
        v = Var(name, "fp16", tuple(arr.shape))
        self.nodes.append(Const(v, arr, blob=path, label=label))
        return v

    # ---- ops ---------------------------------------------------------------------------------------
    def _op(
        self,
        op: str,
        name: str,
        args: list[tuple[str, Var | tuple[Var, ...]]],
        shape: tuple[int, ...],
        label: str | None,
    ) -> Var:
        self._claim(name, label or name)
        out = Var(name, "fp16", tuple(int(s) for s in shape))
        self.nodes.append(Op(op, out, tuple(args), label=label))
        return out

    def _ivals(self, v: Var) -> list[int]:
        return [int(a) for a in self.values[v.name].reshape(-1)]

    def slice(self, name: str, x: Var, begin: Var, size: Var, label: str | None = None) -> Var:
        b, s = self._ivals(begin), self._ivals(size)
        if any(b0 < 0 or n < 1 or b0 + n > d for b0, n, d in zip(b, s, x.shape, strict=True)):
            raise MilBuildError(f"slice {name}: begin {b} size {s} leaves {x.name} {list(x.shape)}")
        return self._op("slice_by_size", name, [("x", x), ("begin", begin), ("size", size)], tuple(s), label)

    def reshape(self, name: str, shape: Var, x: Var, label: str | None = None) -> Var:
        s = tuple(self._ivals(shape))
        if math.prod(s) != math.prod(x.shape):
            raise MilBuildError(f"reshape {name}: {x.name} {list(x.shape)} to {list(s)} changes the size")
        return self._op("reshape", name, [("shape", shape), ("x", x)], s, label)

    def transpose(self, name: str, perm: Var, x: Var, label: str | None = None) -> Var:
        s = tuple(x.shape[p] for p in self._ivals(perm))
        return self._op("transpose", name, [("perm", perm), ("x", x)], s, label)

    def matmul(self, name: str, tx: Var, ty: Var, x: Var, y: Var, label: str | None = None) -> Var:
        tx_, ty_ = bool(self.values[tx.name]), bool(self.values[ty.name])
        m, kx = (x.shape[-1], x.shape[-2]) if tx_ else (x.shape[-2], x.shape[-1])
        ky, n = (y.shape[-1], y.shape[-2]) if ty_ else (y.shape[-2], y.shape[-1])
        if kx != ky:
            raise MilBuildError(f"matmul {name}: inner dimensions {kx} and {ky} differ")
        batch = tuple(np.broadcast_shapes(x.shape[:-2], y.shape[:-2]))
        args: list[tuple[str, Var | tuple[Var, ...]]] = [
            ("transpose_x", tx),
            ("transpose_y", ty),
            ("x", x),
            ("y", y),
        ]
        return self._op("matmul", name, args, (*batch, m, n), label)

    def concat(
        self, name: str, axis: Var, interleave: Var, values: list[Var], label: str | None = None
    ) -> Var:
        ax = int(self.values[axis.name]) % values[0].rank
        shape = list(values[0].shape)
        shape[ax] = sum(v.shape[ax] for v in values)
        args: list[tuple[str, Var | tuple[Var, ...]]] = [
            ("axis", axis),
            ("interleave", interleave),
            ("values", tuple(values)),
        ]
        return self._op("concat", name, args, tuple(shape), label)

    def binary(self, op: str, name: str, x: Var, y: Var, label: str | None = None) -> Var:
        shape = tuple(np.broadcast_shapes(x.shape, y.shape))
        return self._op(op, name, [("x", x), ("y", y)], shape, label)

    def softmax(self, name: str, axis: Var, x: Var, label: str | None = None) -> Var:
        return self._op("softmax", name, [("axis", axis), ("x", x)], x.shape, label)

    def reduce_sum(self, name: str, x: Var, axes: Var, keep: Var, label: str | None = None) -> Var:
        ax = {a % x.rank for a in self._ivals(axes)}
        shape = tuple(1 if i in ax else n for i, n in enumerate(x.shape))
        args: list[tuple[str, Var | tuple[Var, ...]]] = [("x", x), ("axes", axes), ("keep_dims", keep)]
        return self._op("reduce_sum", name, args, shape, label)

    def sigmoid(self, name: str, x: Var, label: str | None = None) -> Var:
        return self._op("sigmoid", name, [("x", x)], x.shape, label)

    def graph(self, *outputs: Var) -> Graph:
        return Graph(list(self.inputs), list(self.nodes), list(outputs), dict(self.blobs))


# ------------------------------------------------------------------------------------------------
# The ten programs


@dataclass(frozen=True)
class _Shape:
    """The (padded) sizes the original's generator is written in."""

    DIM: int
    HIDDEN: int
    SEQ: int
    Q_DIM: int
    KV_DIM: int
    HEADS: int
    KV_HEADS: int
    HD: int  # padded head dim (the layout)
    HD_REAL: int  # the real head dim (the scale and the RoPE angles)
    ALPHA: float  # residual scale
    ROPE_BASE: float

    @property
    def SCORE_CH(self) -> int:
        return self.HEADS * self.SEQ

    @property
    def GQA_RATIO(self) -> int:
        return self.HEADS // self.KV_HEADS

    @classmethod
    def of(cls, dims: Dims) -> _Shape:
        cfg = dims.cfg
        return cls(
            DIM=dims.D.np,
            HIDDEN=dims.F.np,
            SEQ=dims.S.np,
            Q_DIM=dims.Dq.np,
            KV_DIM=dims.Dkv.np,
            HEADS=cfg.n_heads,
            KV_HEADS=cfg.n_kv_heads,
            HD=dims.dh_p,
            HD_REAL=cfg.head_dim,
            ALPHA=cfg.residual_scale,
            ROPE_BASE=cfg.rope_theta,
        )


def _dyn_matmul(w: _Writer, prefix: str, ic: int, oc: int, seq: int, act_off: int, w_off: int, x: Var) -> Var:
    """``y = act^T W`` for act [ic, seq] at width ``act_off`` and W [ic, oc] at ``w_off``: [1, oc, 1, seq]."""
    ba = w.ints(f"{prefix}_ba", [0, 0, 0, act_off])
    sa = w.ints(f"{prefix}_sa", [1, ic, 1, seq])
    act = w.slice(f"{prefix}_act", x, ba, sa)
    bw = w.ints(f"{prefix}_bw", [0, 0, 0, w_off])
    sw = w.ints(f"{prefix}_sw", [1, ic, 1, oc])
    wt = w.slice(f"{prefix}_wt", x, bw, sw)
    ra = w.ints(f"{prefix}_ra", [1, 1, ic, seq])
    a2 = w.reshape(f"{prefix}_a2", ra, act)  # [1, 1, ic, seq]
    pm = w.ints(f"{prefix}_pm", [0, 1, 3, 2])
    a3 = w.transpose(f"{prefix}_a3", pm, a2)  # [1, 1, seq, ic]
    rw = w.ints(f"{prefix}_rw", [1, 1, ic, oc])
    wm = w.reshape(f"{prefix}_W", rw, wt)  # [1, 1, ic, oc]
    bf = w.boolean("bF", False)
    yh = w.matmul(f"{prefix}_yh", bf, bf, a3, wm)  # [1, 1, seq, oc]
    yt = w.transpose(f"{prefix}_yt", pm, yh)  # [1, 1, oc, seq]
    ro = w.ints(f"{prefix}_ro", [1, oc, 1, seq])
    return w.reshape(f"{prefix}_y", ro, yt)  # [1, oc, 1, seq]


def _dyn_matmul_program(ic: int, oc: int, seq: int) -> Graph:
    w = _Writer()
    x = w.input("x", (1, ic, 1, seq + oc))
    return w.graph(_dyn_matmul(w, "mm", ic, oc, seq, 0, seq, x))


def _rope_consts(w: _Writer, consts: dict[str, Var]) -> None:
    """The pair-slicing constants shared by both rotations (declared among q's, as the original does)."""
    consts["rp_b0"] = w.ints("rp_b0", [0, 0, 0, 0])
    consts["rp_b1"] = w.ints("rp_b1", [0, 0, 0, 1])
    consts["neg1"] = w.fp16("neg1", -1.0, "-1")
    consts["rpax"] = w.int32("rpax", 3)
    consts["rpil"] = w.boolean("rpil", False)


def _rope(w: _Writer, x: Var, sh: Var, s1: Var, bk: Var, c: dict[str, Var], n: str) -> Var:
    """x cos + rot(x) sin on x [1, heads, S, HD], rot(x) = (-x1, x0, -x3, x2, ...) by slicing the pairs.

    ``sh``, ``s1``, ``bk``: the shapes [1, heads, S*HD/2, 2], [1, heads, S*HD/2, 1], [1, heads, S, HD];
    ``n`` names the results (``q`` or ``k``), as the original does.
    """
    xp = w.reshape(f"{n}_p", sh, x)  # [1, heads, S*HD/2, 2]: the pairs
    xe = w.slice(f"{n}_e", xp, c["rp_b0"], s1)  # even members [1, heads, S*HD/2, 1]
    xo = w.slice(f"{n}_o", xp, c["rp_b1"], s1)  # odd members
    nx = w.binary("mul", f"n{n}", xo, c["neg1"])
    xrp = w.concat(f"{n}rp", c["rpax"], c["rpil"], [nx, xe])  # (-odd, even) per pair
    xrot = w.reshape(f"{n}_rot", bk, xrp)  # [1, heads, S, HD]
    xc = w.binary("mul", f"{n}c", x, c["rope_cos"])
    xrs = w.binary("mul", f"{n}rs", xrot, c["rope_sin"])
    return w.binary("add", f"{n}_rope", xc, xrs)


def _sdpa_fwd(s: _Shape, faithful_gqa: bool) -> Graph:
    """QKV projections, RoPE, K/V tiled to H heads, causal attention; attn, q_rope, k_rope, v, xn out."""
    sc = np.float32(1.0) / np.sqrt(np.float32(s.HD_REAL))
    w = _Writer()
    x = w.input("x", (1, s.DIM, 1, s.SEQ + s.Q_DIM + 2 * s.KV_DIM))
    bx = w.ints("bx", [0, 0, 0, 0])
    sx = w.ints("sx", [1, s.DIM, 1, s.SEQ])
    xn = w.slice("xn", x, bx, sx)
    bq = w.ints("bq", [0, 0, 0, s.SEQ])
    swq = w.ints("swq", [1, s.DIM, 1, s.Q_DIM])
    wq = w.slice("Wq", x, bq, swq)  # Wq^T [D, Dq]
    bk = w.ints("bk", [0, 0, 0, s.SEQ + s.Q_DIM])
    swk = w.ints("swk", [1, s.DIM, 1, s.KV_DIM])
    wk = w.slice("Wk", x, bk, swk)
    bv = w.ints("bv", [0, 0, 0, s.SEQ + s.Q_DIM + s.KV_DIM])
    wv = w.slice("Wv", x, bv, swk)
    r2 = w.ints("r2", [1, 1, s.DIM, s.SEQ])
    pm = w.ints("pm", [0, 1, 3, 2])
    xn2 = w.reshape("xn2", r2, xn)
    xnt = w.transpose("xnt", pm, xn2)  # [1, 1, S, D]
    rwq = w.ints("rwq", [1, 1, s.DIM, s.Q_DIM])
    rwk = w.ints("rwk", [1, 1, s.DIM, s.KV_DIM])
    wq2 = w.reshape("Wq2", rwq, wq)
    wk2 = w.reshape("Wk2", rwk, wk)
    wv2 = w.reshape("Wv2", rwk, wv)
    bf = w.boolean("bF", False)
    bt = w.boolean("bT", True)
    qm = w.matmul("qm", bf, bf, xnt, wq2)  # [1, 1, S, Dq]
    km = w.matmul("km", bf, bf, xnt, wk2)  # [1, 1, S, Dkv]
    vm = w.matmul("vm", bf, bf, xnt, wv2)
    qt = w.transpose("qt", pm, qm)  # [1, 1, Dq, S]
    kt = w.transpose("kt", pm, km)
    vt = w.transpose("vt", pm, vm)
    qsh = w.ints("qsh", [1, s.Q_DIM, 1, s.SEQ])
    kvsh = w.ints("kvsh", [1, s.KV_DIM, 1, s.SEQ])
    qf = w.reshape("qf", qsh, qt)  # [1, Dq, 1, S]
    kf = w.reshape("kf", kvsh, kt)
    vf = w.reshape("vf", kvsh, vt)
    qhsh = w.ints("qhsh", [1, s.HEADS, s.HD, s.SEQ])
    q4 = w.reshape("q4", qhsh, qf, label="rq")
    q = w.transpose("q", pm, q4, label="tq")  # [1, H, S, HD]
    khsh = w.ints("khsh", [1, s.KV_HEADS, s.HD, s.SEQ])
    k4 = w.reshape("k4", khsh, kf, label="rk")
    k = w.transpose("k", pm, k4, label="tk")  # [1, Hkv, S, HD]
    v4 = w.reshape("v4", khsh, vf, label="rv")
    v = w.transpose("v", pm, v4, label="tv")
    cos, sin = rope_blobs(s.SEQ, s.HD_REAL, s.HD, s.ROPE_BASE)
    consts = {
        "rope_cos": w.blob("rope_cos", "rc", "rope_cos", cos),
        "rope_sin": w.blob("rope_sin", "rs", "rope_sin", sin),
    }
    pairs = s.SEQ * s.HD // 2
    rp_sh = w.ints("rp_sh", [1, s.HEADS, pairs, 2])
    rp_s1 = w.ints("rp_s1", [1, s.HEADS, pairs, 1])
    _rope_consts(w, consts)
    rp_bk_q = w.ints("rp_bk_q", [1, s.HEADS, s.SEQ, s.HD])
    q_rope = _rope(w, q, rp_sh, rp_s1, rp_bk_q, consts, "q")  # [1, H, S, HD]
    rp_sh_k = w.ints("rp_sh_k", [1, s.KV_HEADS, pairs, 2])
    rp_s1_k = w.ints("rp_s1_k", [1, s.KV_HEADS, pairs, 1])
    rp_bk_k = w.ints("rp_bk_k", [1, s.KV_HEADS, s.SEQ, s.HD])
    k_rope = _rope(w, k, rp_sh_k, rp_s1_k, rp_bk_k, consts, "k")  # [1, Hkv, S, HD]
    cax = w.int32("cax", 1)
    cid = w.boolean("cid", False)
    # GQA: H heads from Hkv. The original concatenates R copies (head h reads kv head h mod Hkv); anetrain
    # interleaves them (h reads h // R, as its backward and every reference do).
    tile = cid if faithful_gqa or s.GQA_RATIO == 1 else w.boolean("cil", True)
    k_tiled = w.concat("k_tiled", cax, tile, [k_rope] * s.GQA_RATIO, label="ktile")  # [1, H, S, HD]
    v_tiled = w.concat("v_tiled", cax, tile, [v] * s.GQA_RATIO, label="vtile")
    sc1 = w.matmul("sc1", bf, bt, q_rope, k_tiled, label="mm1")  # [1, H, S, S]
    scv = w.fp16("scv", float(sc), c_float_text(sc))
    sc2 = w.binary("mul", "sc2", sc1, scv, label="scl")
    cm = w.blob("cm", "cm", "mask", causal_mask_blob(s.SEQ))
    ms = w.binary("add", "ms", sc2, cm, label="msk")
    sax = w.int32("sax", -1)
    aw = w.softmax("aw", sax, ms, label="sm")
    a4 = w.matmul("a4", bf, bf, aw, v_tiled, label="mm2")  # [1, H, S, HD]
    at = w.transpose("at", pm, a4, label="ta")
    af = w.reshape("af", qsh, at, label="ra")  # [1, Dq, 1, S]
    qrt = w.transpose("qrt", pm, q_rope)
    qrf = w.reshape("qrf", qsh, qrt)
    krt = w.transpose("krt", pm, k_rope)
    krf = w.reshape("krf", kvsh, krt)
    out = w.concat("out", cax, cid, [af, qrf, krf, vf, xn], label="cat")
    return w.graph(out)


def _ffn_fused(s: _Shape) -> Graph:
    """h1 = W1 xn2, h3 = W3 xn2, g = silu(h1) h3, x' = x2 + alpha W2 g; x', h1, h3, g out."""
    alpha = np.float32(s.ALPHA)
    w = _Writer()
    x = w.input("x", (1, s.DIM, 1, 2 * s.SEQ + 3 * s.HIDDEN))
    pm = w.ints("pm", [0, 1, 3, 2])
    bf = w.boolean("bF", False)
    b_xn = w.ints("b_xn", [0, 0, 0, 0])
    s_ds = w.ints("s_ds", [1, s.DIM, 1, s.SEQ])
    x2norm = w.slice("x2norm", x, b_xn, s_ds)
    b_x2 = w.ints("b_x2", [0, 0, 0, s.SEQ])
    x2 = w.slice("x2", x, b_x2, s_ds)
    b_w1 = w.ints("b_w1", [0, 0, 0, 2 * s.SEQ])
    s_wh = w.ints("s_wh", [1, s.DIM, 1, s.HIDDEN])
    w1 = w.slice("W1", x, b_w1, s_wh)  # W1^T [D, F]
    b_w3 = w.ints("b_w3", [0, 0, 0, 2 * s.SEQ + s.HIDDEN])
    w3 = w.slice("W3", x, b_w3, s_wh)
    b_w2 = w.ints("b_w2", [0, 0, 0, 2 * s.SEQ + 2 * s.HIDDEN])
    w2r = w.slice("W2r", x, b_w2, s_wh)  # W2 [D, F] as stored
    rd = w.ints("rd", [1, 1, s.DIM, s.SEQ])
    xn2 = w.reshape("xn2", rd, x2norm)
    xnt = w.transpose("xnt", pm, xn2)  # [1, 1, S, D]
    rw = w.ints("rw", [1, 1, s.DIM, s.HIDDEN])
    w12 = w.reshape("W12", rw, w1)
    w32 = w.reshape("W32", rw, w3)
    h1m = w.matmul("h1m", bf, bf, xnt, w12)  # [1, 1, S, F]
    h3m = w.matmul("h3m", bf, bf, xnt, w32)
    h1t = w.transpose("h1t", pm, h1m)
    h3t = w.transpose("h3t", pm, h3m)
    rh = w.ints("rh", [1, s.HIDDEN, 1, s.SEQ])
    h1 = w.reshape("h1", rh, h1t)  # [1, F, 1, S]
    h3 = w.reshape("h3", rh, h3t)
    sig = w.sigmoid("sig", h1, label="sg")
    silu = w.binary("mul", "silu", h1, sig, label="si")
    gate = w.binary("mul", "gate", silu, h3, label="gt")
    rg = w.ints("rg", [1, 1, s.HIDDEN, s.SEQ])
    g2 = w.reshape("g2", rg, gate)
    gt = w.transpose("gt", pm, g2, label="gtt")  # [1, 1, S, F]
    w22 = w.reshape("W22", rw, w2r)
    w2t = w.transpose("W2t", pm, w22)  # [1, 1, F, D]
    fm = w.matmul("fm", bf, bf, gt, w2t)  # [1, 1, S, D]
    ft = w.transpose("ft", pm, fm)
    rd2 = w.ints("rd2", [1, s.DIM, 1, s.SEQ])
    ffn_out = w.reshape("ffn_out", rd2, ft)
    res_alpha = w.fp16("res_alpha", float(alpha), c_float_text(alpha))
    ffn_scaled = w.binary("mul", "ffn_scaled", ffn_out, res_alpha, label="ffn_sc")
    x_next = w.binary("add", "x_next", x2, ffn_scaled)
    cax = w.int32("cax", 1)
    cid = w.boolean("cid", False)
    return w.graph(w.concat("out", cax, cid, [x_next, h1, h3, gate], label="cat"))


def _two_matmul_bwd(ic: int, oc: int, seq: int, names: tuple[str, ...]) -> Graph:
    """``W_a^T d_a + W_b^T d_b`` for x [ic, 2S+2oc] = d_a | d_b | W_a | W_b (ffnBwdW13t, kvBwd)."""
    da_, db_, wa_, wb_, da2_, dat_, db2_, dbt_, wa2_, wb2_, ya_, yb_ = names
    w = _Writer()
    x = w.input("x", (1, ic, 1, 2 * seq + 2 * oc))
    sh = w.ints("sh", [1, ic, 1, seq])
    b0 = w.ints("b0", [0, 0, 0, 0])
    da = w.slice(da_, x, b0, sh)
    b1 = w.ints("b1", [0, 0, 0, seq])
    db = w.slice(db_, x, b1, sh)
    b2 = w.ints("b2", [0, 0, 0, 2 * seq])
    sw = w.ints("sw", [1, ic, 1, oc])
    wa = w.slice(wa_, x, b2, sw)
    b3 = w.ints("b3", [0, 0, 0, 2 * seq + oc])
    wb = w.slice(wb_, x, b3, sw)
    pm = w.ints("pm", [0, 1, 3, 2])
    ra = w.ints("ra", [1, 1, ic, seq])
    da2 = w.reshape(da2_, ra, da)
    dat = w.transpose(dat_, pm, da2)  # [1, 1, S, ic]
    db2 = w.reshape(db2_, ra, db)
    dbt = w.transpose(dbt_, pm, db2)
    rw = w.ints("rw", [1, 1, ic, oc])
    wa2 = w.reshape(wa2_, rw, wa)
    wb2 = w.reshape(wb2_, rw, wb)
    bf = w.boolean("bF", False)
    ya = w.matmul(ya_, bf, bf, dat, wa2)  # [1, 1, S, oc]
    yb = w.matmul(yb_, bf, bf, dbt, wb2)
    dxm = w.binary("add", "dxm", ya, yb)
    dxt = w.transpose("dxt", pm, dxm)
    ro = w.ints("ro", [1, oc, 1, seq])
    return w.graph(w.reshape("dx", ro, dxt))


def _heads(w: _Writer, pm: Var, rsh: Var, flat: Var, name: str, label_r: str, label_t: str) -> Var:
    """[1, H*HD, 1, S] -> [1, H, S, HD] (reshape, then transpose)."""
    r = w.reshape(f"{name}r", rsh, flat, label=label_r)
    return w.transpose(name, pm, r, label=label_t)


def _sdpa_bwd1(s: _Shape) -> Graph:
    """P recomputed; dV_full = P^T dO; dP = dO V^T (K and V already tiled to H heads by the host)."""
    sc = np.float32(1.0) / np.sqrt(np.float32(s.HD_REAL))
    w = _Writer()
    x = w.input("x", (1, 4 * s.Q_DIM, 1, s.SEQ))
    sz = w.ints("sz", [1, s.Q_DIM, 1, s.SEQ])
    b0 = w.ints("b0", [0, 0, 0, 0])
    qf = w.slice("qf", x, b0, sz, label="s0")
    b1 = w.ints("b1", [0, s.Q_DIM, 0, 0])
    kf = w.slice("kf", x, b1, sz, label="s1")
    b2 = w.ints("b2", [0, 2 * s.Q_DIM, 0, 0])
    vf = w.slice("vf", x, b2, sz, label="s2")
    b3 = w.ints("b3", [0, 3 * s.Q_DIM, 0, 0])
    da = w.slice("da", x, b3, sz, label="s3")
    rsh = w.ints("rsh", [1, s.HEADS, s.HD, s.SEQ])
    pm = w.ints("pm", [0, 1, 3, 2])
    q = _heads(w, pm, rsh, qf, "q", "rq", "tq")  # [1, H, S, HD]
    k = _heads(w, pm, rsh, kf, "k", "rk", "tk")
    v = _heads(w, pm, rsh, vf, "v", "rv", "tv")
    dr = w.reshape("dr", rsh, da, label="rd")
    dat = w.transpose("dat", pm, dr, label="td")
    bf = w.boolean("bF", False)
    bt = w.boolean("bT", True)
    sc1 = w.matmul("sc1", bf, bt, q, k, label="mm1")  # [1, H, S, S]
    scv = w.fp16("scv", float(sc), c_float_text(sc))
    sc2 = w.binary("mul", "sc2", sc1, scv, label="scl")
    cm = w.blob("cm", "cm", "mask", causal_mask_blob(s.SEQ))
    ms = w.binary("add", "ms", sc2, cm, label="msk")
    sax = w.int32("sax", -1)
    probs = w.softmax("probs", sax, ms, label="sm")
    dv4 = w.matmul("dv4", bt, bf, probs, dat, label="dv")  # [1, H, S, HD]
    dp4 = w.matmul("dp4", bf, bt, dat, v, label="dp")  # [1, H, S, S]
    dvt = w.transpose("dvt", pm, dv4)
    dvs = w.ints("dvs", [1, s.Q_DIM, 1, s.SEQ])
    dvf = w.reshape("dvf", dvs, dvt)
    scs = w.ints("scs", [1, s.SCORE_CH, 1, s.SEQ])
    pf = w.reshape("pf", scs, probs)  # [1, H*S, 1, S]
    dpf = w.reshape("dpf", scs, dp4)
    cax = w.int32("cax", 1)
    cid = w.boolean("cid", False)
    return w.graph(w.concat("out", cax, cid, [dvf, pf, dpf], label="cat"))


def _sdpa_bwd2(s: _Shape) -> Graph:
    """dS = P (dP - rowsum(P dP)) / sqrt(dh); dQ_rope = dS K; dK_full = dS^T Q."""
    sc = np.float32(1.0) / np.sqrt(np.float32(s.HD_REAL))
    w = _Writer()
    x = w.input("x", (1, 2 * s.SCORE_CH + 2 * s.Q_DIM, 1, s.SEQ))
    sz_sc = w.ints("sz_sc", [1, s.SCORE_CH, 1, s.SEQ], label="szsc")
    b0 = w.ints("b0", [0, 0, 0, 0])
    pf = w.slice("pf", x, b0, sz_sc, label="s0")
    b1 = w.ints("b1", [0, s.SCORE_CH, 0, 0])
    dpf = w.slice("dpf", x, b1, sz_sc, label="s1")
    sz_q = w.ints("sz_q", [1, s.Q_DIM, 1, s.SEQ], label="szq")
    b2 = w.ints("b2", [0, 2 * s.SCORE_CH, 0, 0])
    qf = w.slice("qf", x, b2, sz_q, label="s2")
    b3 = w.ints("b3", [0, 2 * s.SCORE_CH + s.Q_DIM, 0, 0])
    kf = w.slice("kf", x, b3, sz_q, label="s3")
    ssh = w.ints("ssh", [1, s.HEADS, s.SEQ, s.SEQ])
    probs = w.reshape("probs", ssh, pf, label="rp")
    dp = w.reshape("dp", ssh, dpf, label="rdp")
    rsh = w.ints("rsh", [1, s.HEADS, s.HD, s.SEQ])
    pm = w.ints("pm", [0, 1, 3, 2])
    q = _heads(w, pm, rsh, qf, "q", "rq", "tq")
    k = _heads(w, pm, rsh, kf, "k", "rk", "tk")
    pdp = w.binary("mul", "pdp", probs, dp)
    rax = w.ints("rax", [-1])
    kd = w.boolean("kd", True)
    spdp = w.reduce_sum("spdp", pdp, rax, kd, label="rs")  # [1, H, S, 1]
    dps = w.binary("sub", "dps", dp, spdp)
    ds0 = w.binary("mul", "ds0", probs, dps)
    scv = w.fp16("scv", float(sc), c_float_text(sc))
    ds = w.binary("mul", "ds", ds0, scv)
    bf = w.boolean("bF", False)
    bt = w.boolean("bT", True)
    dq4 = w.matmul("dq4", bf, bf, ds, k, label="dq")  # [1, H, S, HD]
    dk4 = w.matmul("dk4", bt, bf, ds, q, label="dk")
    dqt = w.transpose("dqt", pm, dq4)
    dkt = w.transpose("dkt", pm, dk4)
    fs = w.ints("fs", [1, s.Q_DIM, 1, s.SEQ])
    dqf = w.reshape("dqf", fs, dqt)
    dkf = w.reshape("dkf", fs, dkt)
    cax = w.int32("cax", 1)
    cid = w.boolean("cid", False)
    return w.graph(w.concat("out", cax, cid, [dqf, dkf], label="cat"))


# ------------------------------------------------------------------------------------------------
# Programs with their operand placements


@dataclass(frozen=True)
class OriginalProgram:
    """One of the ten: its graph and where each logical operand sits in ``x`` and ``out``."""

    name: str  # anetrain's name (the pipeline's)
    original_name: str  # the original's (file name)
    doc: str
    graph: Graph
    in_placements: dict[str, Placement]
    out_placements: dict[str, Placement]

    def text(self, dialect: Dialect) -> str:
        return render_text(self.graph, dialect, ORIGINAL_STYLE)

    def blobs(self) -> dict[str, bytes]:
        return {path: build_blob(arr) for path, arr in self.graph.blobs.items()}

    def tensors(self) -> tuple[TensorSpec, TensorSpec]:
        (x,), (out,) = self.graph.inputs, self.graph.outputs
        return TensorSpec(x.name, x.shape), TensorSpec(out.name, out.shape)


def _along_width(specs: list[tuple[str, Axis, Axis, bool]], tensor: str = "x") -> dict[str, Placement]:
    """Operands side by side along the width: (name, rows, cols, stored transposed)."""
    out, w0 = {}, 0
    for name, rows, cols, transposed in specs:
        p = Placement(name, tensor, 0, w0, rows, cols, transposed)
        out[name] = p
        w0 += p.stored[1]
    return out


def _along_channels(specs: list[tuple[str, Axis]], cols: Axis, tensor: str) -> dict[str, Placement]:
    """Operands stacked along the channels, each [rows, cols]."""
    out, c0 = {}, 0
    for name, rows in specs:
        out[name] = Placement(name, tensor, c0, 0, rows, cols)
        c0 += rows.np
    return out


def original_programs(dims: Dims, faithful_gqa: bool = False) -> dict[str, OriginalProgram]:
    """The ten programs for these dimensions, in the original's order (forward, then dx)."""
    s = _Shape.of(dims)
    D, F, S, Dq, Dkv, HS = dims.D, dims.F, dims.S, dims.Dq, dims.Dkv, dims.HS
    T, N = True, False  # stored transposed (W^T: [in, out]) or as it is ([out, in])
    # (name, doc, graph, where each input operand sits in x, the outputs in their order along the channels)
    specs: list[tuple[str, str, Graph, dict[str, Placement], list[tuple[str, Axis]]]] = [
        (
            "sdpa_fwd",
            "QKV projections, RoPE, K/V tiled to the query heads, causal attention",
            _sdpa_fwd(s, faithful_gqa),
            _along_width([("xn", D, S, N), ("wq", Dq, D, T), ("wk", Dkv, D, T), ("wv", Dkv, D, T)]),
            [("attn", Dq), ("q_rope", Dq), ("k_rope", Dkv), ("v", Dkv), ("xn_pass", D)],
        ),
        (
            "wo_fwd",
            "output projection o = Wo attn",
            _dyn_matmul_program(s.Q_DIM, s.DIM, s.SEQ),
            _along_width([("attn", Dq, S, N), ("wo", D, Dq, T)]),
            [("o", D)],
        ),
        (
            "ffn_fused",
            "SwiGLU FFN with the residual: x' = x2 + alpha W2 (silu(W1 xn2) * W3 xn2)",
            _ffn_fused(s),
            _along_width(
                [("xn2", D, S, N), ("x2", D, S, N), ("w1", F, D, T), ("w3", F, D, T), ("w2", D, F, N)]
            ),
            [("x_next", D), ("h1", F), ("h3", F), ("g", F)],
        ),
        (
            "ffn_bwd_w2t",
            "dg = W2^T dffn",
            _dyn_matmul_program(s.DIM, s.HIDDEN, s.SEQ),
            _along_width([("dffn", D, S, N), ("w2", D, F, N)]),
            [("dg", F)],
        ),
        (
            "ffn_bwd_w13t",
            "dxn2 = W1^T dh1 + W3^T dh3",
            _two_matmul_bwd(
                s.HIDDEN,
                s.DIM,
                s.SEQ,
                ("dh1", "dh3", "W1t", "W3t", "dh12", "dh1t", "dh32", "dh3t", "W1t2", "W3t2", "dx1m", "dx3m"),
            ),
            _along_width([("dh1", F, S, N), ("dh3", F, S, N), ("w1", F, D, N), ("w3", F, D, N)]),
            [("dxn2", D)],
        ),
        (
            "wot_bwd",
            "dattn = Wo^T do",
            _dyn_matmul_program(s.DIM, s.Q_DIM, s.SEQ),
            _along_width([("do", D, S, N), ("wo", D, Dq, N)]),
            [("dattn", Dq)],
        ),
        (
            "sdpa_bwd1",
            "attention backward 1: P recomputed, dV_full = P^T dO, dP = dO V^T (K, V tiled by the host)",
            _sdpa_bwd1(s),
            _along_channels([("q_rope", Dq), ("k_tiled", Dq), ("v_tiled", Dq), ("dattn", Dq)], S, "x"),
            [("dv_full", Dq), ("p", HS), ("dp", HS)],
        ),
        (
            "sdpa_bwd2",
            "attention backward 2: dS = P (dP - rowsum(P dP)) / sqrt(dh); dQ_rope = dS K, dK_full = dS^T Q",
            _sdpa_bwd2(s),
            _along_channels([("p", HS), ("dp", HS), ("q_rope", Dq), ("k_tiled", Dq)], S, "x"),
            [("dq_rope", Dq), ("dk_full", Dq)],
        ),
        (
            "q_bwd",
            "dx = Wq^T dq",
            _dyn_matmul_program(s.Q_DIM, s.DIM, s.SEQ),
            _along_width([("dq", Dq, S, N), ("wq", Dq, D, N)]),
            [("dx", D)],
        ),
        (
            "kv_bwd",
            "dx = Wk^T dk + Wv^T dv",
            _two_matmul_bwd(
                s.KV_DIM,
                s.DIM,
                s.SEQ,
                ("dk", "dv", "Wkt", "Wvt", "dk2", "dkt", "dv2", "dvt", "Wkt2", "Wvt2", "dxk", "dxv"),
            ),
            _along_width([("dk", Dkv, S, N), ("dv", Dkv, S, N), ("wk", Dkv, D, N), ("wv", Dkv, D, N)]),
            [("dx", D)],
        ),
    ]
    progs = {}
    for name, doc, graph, ins, outs in specs:
        out_places = _along_channels(outs, S, graph.outputs[0].name)
        progs[name] = OriginalProgram(name, ORIGINAL_NAMES[name], doc, graph, ins, out_places)
        _check_layout(progs[name])
    return progs


def _check_layout(p: OriginalProgram) -> None:
    """Every placement lies inside its tensor and the operands fill it exactly (a generator bug otherwise)."""
    x, out = p.tensors()
    for spec, places in ((x, p.in_placements), (out, p.out_placements)):
        c, w = spec.matrix
        area = 0
        for pl in places.values():
            sc, sw = pl.stored
            if pl.c0 + sc > c or pl.w0 + sw > w:
                raise MilBuildError(
                    f"{p.original_name}: operand {pl.operand} does not fit {spec.name} {[c, w]}"
                )
            area += sc * sw
        if area != c * w:
            raise MilBuildError(
                f"{p.original_name}: operands cover {area} of {c * w} elements of {spec.name}"
            )


def gqa_differences(dims: Dims, dialect: Dialect) -> list[str]:
    """The lines of anetrain's sdpaFwd that differ from the original generator's (empty for MHA), as a
    unified diff without its header."""
    import difflib

    s = _Shape.of(dims)
    ours = render_text(_sdpa_fwd(s, faithful_gqa=False), dialect, ORIGINAL_STYLE).splitlines()
    theirs = render_text(_sdpa_fwd(s, faithful_gqa=True), dialect, ORIGINAL_STYLE).splitlines()
    return [
        line
        for line in difflib.unified_diff(theirs, ours, "original", "anetrain", n=0, lineterm="")
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
