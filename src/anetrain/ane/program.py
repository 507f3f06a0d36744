"""One kernel program: a kernel definition built for a chip dialect and an input convention.

A :class:`KernelDef` names its logical operands (:class:`OperandSpec`) and gives a body that computes its
outputs from them through a :class:`KernelContext`. The context hides the input convention:

``separate`` (default)
    every operand is its own function input ``[1, C, 1, W]`` (weights ``[1, out, 1, in]`` exactly as the
    parameters store them, so staging is a copy); several outputs, one per result. Surfaces bind in
    alphabetical order of the names and share one allocation size (see :mod:`.surfaces`).
``packed``
    the original trainer's form: one input ``x`` holding activations and weights side by side (along the
    width when the operands share a channel count, stacked along channels when they are all activations of
    one width), sliced inside with ``slice_by_size``; the results concatenated along channels into one
    output ``out``. Forward weights are stored transposed (``W^T``: the contraction runs along the
    channels, as in the original's dynamic matmul), backward weights as they are.

The same body runs for both conventions, and the built program keeps its graph so it can be rendered as MIL
text, rebuilt with coremltools, or executed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .blob import build_blob
from .dialect import Dialect
from .limits import check_graph
from .mil import Graph, MilBuilder, Var, render_text
from .shapes import Axis, Dims
from .surfaces import Placement, SurfaceSizes, TensorSpec, binding_order

CONVENTIONS = ("packed", "separate")  # the first is the default
MASK_VALUE = -1.0e4  # finite: adding it to any score never overflows fp16, and exp() of it is 0


@dataclass(frozen=True)
class OperandSpec:
    """A logical operand ``[rows, cols]`` of a kernel.

    ``kind`` is ``act`` (channel-first activations), ``weight`` (``[out, in]``) or ``vector`` (a gain,
    ``[D, 1]``). For weights, ``use`` says how the kernel applies it: ``fwd`` computes ``W x``, ``bwd``
    computes ``W^T dy``.
    """

    name: str
    rows: Axis
    cols: Axis
    kind: str = "act"
    use: str = ""


@dataclass(frozen=True)
class KernelDef:
    """A kernel: its operands and the body that computes the outputs (each ``[rows_p, cols_p]`` row-major)."""

    name: str
    doc: str
    inputs: tuple[OperandSpec, ...]
    outputs: tuple[OperandSpec, ...]
    body: Callable[[KernelContext], dict[str, Var]]


@dataclass(frozen=True)
class WeightRef:
    """A weight operand inside a program: a [1, 1, r, c] value holding W or W^T."""

    var: Var
    transposed: bool
    use: str


@dataclass
class AneProgram(SurfaceSizes):
    """Everything a runtime needs to compile and drive one kernel.

    ``inputs``/``outputs`` are the MIL function's tensors in binding (alphabetical) order; ``weights`` maps
    each BLOBFILE path to its blob bytes; the placements say where each logical operand lives; ``padding``
    records every padded dimension as ``{name: [real, padded]}``. ``program_set`` says whose program this
    is (``original``: the original trainer's text, :mod:`.original`; ``anetrain``: this project's forms,
    never run on hardware); ``stem`` is its file name (the original's kernel name for its programs).
    """

    name: str
    doc: str
    dialect: Dialect
    convention: str
    mil_text: str
    weights: dict[str, bytes]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    in_placements: dict[str, Placement]
    out_placements: dict[str, Placement]
    padding: dict[str, list[int]]
    meta: dict[str, Any] = field(default_factory=dict)
    graph: Graph | None = field(default=None, repr=False)
    program_set: str = "anetrain"
    stem: str = ""

    def __post_init__(self) -> None:
        self.stem = self.stem or self.name

    @property
    def chip(self) -> str:
        return self.dialect.chip

    def manifest(self) -> dict[str, Any]:
        """A JSON-ready description (what emit writes into manifest.json)."""
        return {
            "name": self.name,
            "original_name": self.stem if self.program_set == "original" else None,
            "doc": self.doc,
            "program_set": self.program_set,
            "chip": self.chip,
            "program_version": self.dialect.program_version,
            "opset": self.dialect.opset,
            "convention": self.convention,
            "input_surfaces": len(self.inputs),
            "output_surfaces": len(self.outputs),
            "mil": f"{self.stem}.mil",
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "input_binding_order": [t.name for t in binding_order(self.inputs)],
            "output_binding_order": [t.name for t in binding_order(self.outputs)],
            "input_alloc_bytes": self.input_alloc_bytes,
            "output_alloc_bytes": self.output_alloc_bytes,
            "weights": {p: len(b) for p, b in self.weights.items()},
            "operands_in": {k: p.to_dict() for k, p in self.in_placements.items()},
            "operands_out": {k: p.to_dict() for k, p in self.out_placements.items()},
            "padding": self.padding,
            "meta": self.meta,
        }


class KernelContext:
    """What a kernel body works with: the builder, the dimensions, its operands and shared constants.

    Activations come back as matrices ``[1, 1, C, W]`` (a reshape of the ``[1, C, 1, W]`` surface), so a
    projection is one matmul and per-channel vectors broadcast over tokens.
    """

    def __init__(
        self, b: MilBuilder, dims: Dims, acts: dict[str, Var], weights: dict[str, WeightRef]
    ) -> None:
        self.b = b
        self.dims = dims
        self.cfg = dims.cfg
        self._acts = acts
        self._weights = weights
        self._consts: dict[str, Var] = {}

    # ---- operands ------------------------------------------------------------------------------
    def act(self, name: str) -> Var:
        """An activation or vector operand as a [1, 1, C, W] matrix."""
        return self._acts[name]

    def linear(self, weight: str, x: Var) -> Var:
        """``W x`` for a forward weight or ``W^T x`` for a backward one.  x: [1,1,K,S] -> [1,1,N,S]."""
        w = self._weights[weight]
        # stored W: forward is W @ x, backward W^T @ x; stored W^T: the other way round.
        return self.b.matmul(w.var, x, transpose_x=(w.use == "fwd") == w.transposed)

    # ---- helpers ---------------------------------------------------------------------------------
    def reshape(self, x: Var, shape: tuple[int, ...]) -> Var:
        return x if tuple(shape) == x.shape else self.b.reshape(x, shape)

    def constant(self, name: str, make: Callable[[], np.ndarray]) -> Var:
        """A blob constant built once per program."""
        if name not in self._consts:
            self._consts[name] = self.b.blob_const(name, make())
        return self._consts[name]


# ------------------------------------------------------------------------------------------------
# Building


def _matrix_of(b: MilBuilder, v: Var, name: str) -> Var:
    """[1, C, 1, W] -> [1, 1, C, W]."""
    return b.reshape(v, (1, 1, v.shape[1], v.shape[3]), name=name)


def _plan_packed(specs: tuple[OperandSpec, ...], kernel: str) -> tuple[tuple[int, int], dict[str, Placement]]:
    """Place every input operand in one [C, W] surface (see the module docstring)."""
    placements: dict[str, Placement] = {}
    has_weights = any(s.kind == "weight" for s in specs)
    widths = {s.cols.np for s in specs}
    if not has_weights and len(widths) == 1:  # activations of one width: stack along channels
        c0 = 0
        for s in specs:
            placements[s.name] = Placement(s.name, "x", c0, 0, s.rows, s.cols)
            c0 += s.rows.np
        return (c0, widths.pop()), placements
    channels = next(s.rows.np for s in specs if s.kind != "weight")
    w0 = 0
    for s in specs:
        fits = {False: s.rows.np == channels, True: s.kind == "weight" and s.cols.np == channels}
        if not (fits[False] or fits[True]):
            raise ValueError(
                f"kernel {kernel}: operand {s.name} cannot share {channels} channels for packing"
            )
        # Prefer the contraction axis along the channels: W^T for forward weights, W for backward ones.
        transposed = fits[True] and (s.use == "fwd" or not fits[False])
        p = Placement(s.name, "x", 0, w0, s.rows, s.cols, transposed)
        placements[s.name] = p
        w0 += p.stored[1]
    return (channels, w0), placements


def build_program(kdef: KernelDef, dims: Dims, dialect: Dialect, convention: str) -> AneProgram:
    """Build ``kdef`` for one dialect and input convention."""
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown input convention {convention!r} (known: {', '.join(CONVENTIONS)})")
    names_in = {s.name for s in kdef.inputs}
    if names_in & {s.name for s in kdef.outputs} or {"x", "out"} & (
        names_in | {s.name for s in kdef.outputs}
    ):
        raise ValueError(f"kernel {kdef.name}: operand names must be distinct and not 'x'/'out'")
    b = MilBuilder()
    acts: dict[str, Var] = {}
    weights: dict[str, WeightRef] = {}
    in_place: dict[str, Placement] = {}

    sources: dict[str, Var] = {}
    if convention == "separate":
        for s in sorted(kdef.inputs, key=lambda s: s.name):  # declared in binding order
            in_place[s.name] = Placement(s.name, s.name, 0, 0, s.rows, s.cols)
            sources[s.name] = b.input(s.name, (1, s.rows.np, 1, s.cols.np))
    else:
        (c, w), in_place = _plan_packed(kdef.inputs, kdef.name)
        x = b.input("x", (1, c, 1, w))
        for s in kdef.inputs:
            p = in_place[s.name]
            sc, sw = p.stored
            sources[s.name] = b.slice_by_size(x, (0, p.c0, 0, p.w0), (1, sc, 1, sw), name=s.name)
    for s in kdef.inputs:
        m = _matrix_of(b, sources[s.name], f"{s.name}_m")
        if s.kind == "weight":
            weights[s.name] = WeightRef(m, in_place[s.name].transposed, s.use)
        else:
            acts[s.name] = m

    ctx = KernelContext(b, dims, acts, weights)
    results = kdef.body(ctx)
    if set(results) != {s.name for s in kdef.outputs}:
        raise ValueError(
            f"kernel {kdef.name}: body returned {sorted(results)}, declared {[s.name for s in kdef.outputs]}"
        )

    out_place: dict[str, Placement] = {}
    if convention == "separate" or len(kdef.outputs) == 1:
        for s in sorted(kdef.outputs, key=lambda s: s.name):
            tensor = s.name if convention == "separate" else "out"
            shape = (1, s.rows.np, 1, s.cols.np)
            _check_size(results[s.name], shape, kdef.name, s.name)
            b.output(b.reshape(results[s.name], shape, name=tensor))
            out_place[s.name] = Placement(s.name, tensor, 0, 0, s.rows, s.cols)
    else:
        parts, c0 = [], 0
        widths = {s.cols.np for s in kdef.outputs}
        if len(widths) != 1:
            raise ValueError(f"kernel {kdef.name}: packed outputs need one width, got {sorted(widths)}")
        for s in kdef.outputs:
            shape = (1, s.rows.np, 1, s.cols.np)
            _check_size(results[s.name], shape, kdef.name, s.name)
            parts.append(b.reshape(results[s.name], shape, name=s.name))
            out_place[s.name] = Placement(s.name, "out", c0, 0, s.rows, s.cols)
            c0 += s.rows.np
        b.output(b.concat(parts, axis=1, name="out"))

    graph = b.graph()
    check_graph(graph, kdef.name, dialect.chip, dialect.opset)
    return AneProgram(
        name=kdef.name,
        doc=kdef.doc,
        dialect=dialect,
        convention=convention,
        mil_text=render_text(graph, dialect),
        weights={path: build_blob(arr) for path, arr in graph.blobs.items()},
        inputs=binding_order([TensorSpec(v.name, v.shape) for v in graph.inputs]),
        outputs=binding_order([TensorSpec(v.name, v.shape) for v in graph.outputs]),
        in_placements=in_place,
        out_placements=out_place,
        padding=dims.padding(),
        meta={"seq": dims.seq, "seq_padded": dims.S.np, "model": dims.cfg.shape_line()},
        graph=graph,
    )


def _check_size(v: Var, shape: tuple[int, ...], kernel: str, name: str) -> None:
    if math.prod(v.shape) != math.prod(shape):
        raise ValueError(f"kernel {kernel}: output {name} has shape {list(v.shape)}, expected {list(shape)}")
