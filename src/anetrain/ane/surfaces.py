"""IOSurfaces as the ANE sees them: layouts, operand placement, allocation sizes and binding order.

Layout. Every tensor a program reads or writes is fp16 ``[1, C, 1, W]``, stored row-major in a flat byte
buffer: element (c, w) at byte ``2 * (c * W + w)``. Activations are channel-first, so column t is token t
(anetrain's torch kernels are token-major ``[B, S, D]``: transpose at the boundary).

Operands. A kernel's logical operands are 2-D: activations ``[C, S]``, weights ``[out, in]`` as in
:mod:`anetrain.params`, gain vectors ``[D, 1]``. A :class:`Placement` says where an operand lives inside a
program tensor (offset ``c0, w0``, padded per :mod:`.shapes`, possibly stored transposed). With separate
inputs each operand is its own tensor; with the packed convention all of them share one surface.

Binding rules for several surfaces (docs/ane.md, appendix A.7; maderix/ANE #47, Orion's constraints; only
anetrain's never-run ``separate`` form has several):

* inputs and outputs bind in **alphabetical order of their MIL names** (we also declare them in that
  order, so declaration order and binding order agree);
* every input surface of a request has the **same allocation size** (likewise every output surface);
  tensors smaller than the allocation sit at its start. Sizes are rounded up to the chip's alignment.
  Anything else fails with status 0x1d or silently gives wrong data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .shapes import Axis, round_up

if TYPE_CHECKING:
    from .dialect import Dialect
    from .program import AneProgram


@dataclass(frozen=True)
class TensorSpec:
    """One MIL function input or output: its name and shape (always fp16)."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "fp16"

    @property
    def nbytes(self) -> int:
        return 2 * math.prod(self.shape)

    @property
    def matrix(self) -> tuple[int, int]:
        """(C, W) of a [1, C, 1, W] tensor."""
        return self.shape[1], self.shape[3]

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "bytes": self.nbytes}


@dataclass(frozen=True)
class Placement:
    """Where a logical operand ``[rows, cols]`` lives inside the tensor ``tensor``."""

    operand: str
    tensor: str
    c0: int
    w0: int
    rows: Axis
    cols: Axis
    transposed: bool = False  # stored as the transpose of the (padded) logical matrix

    @property
    def stored(self) -> tuple[int, int]:
        """(channels, width) the operand occupies in the tensor."""
        return (self.cols.np, self.rows.np) if self.transposed else (self.rows.np, self.cols.np)

    def to_dict(self) -> dict[str, object]:
        return {
            "tensor": self.tensor,
            "channel_offset": self.c0,
            "width_offset": self.w0,
            "stored_shape": list(self.stored),
            "logical_shape": [self.rows.n, self.cols.n],
            "transposed": self.transposed,
            "axes": [self.rows.name, self.cols.name],
        }


# ------------------------------------------------------------------------------------------------
# Host side: operands <-> tensor contents


def to_matrix(a: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """A [1, C, 1, W] array (or its flat bytes' worth of values) viewed as [C, W]."""
    return np.asarray(a).reshape(spec.matrix)


def place(buf: np.ndarray, p: Placement, value: np.ndarray) -> None:
    """Write a logical operand (unpadded ``[rows, cols]``, any float dtype) into a tensor's [C, W] buffer."""
    v = np.asarray(value, dtype=np.float32).reshape(p.rows.n, p.cols.n)
    v = p.cols.pad(p.rows.pad(v, 0), 1)
    if p.transposed:
        v = v.T
    c, w = p.stored
    with np.errstate(over="ignore"):  # values beyond fp16 become inf, as on the ANE's surfaces
        buf[p.c0 : p.c0 + c, p.w0 : p.w0 + w] = v.astype(np.float16)


def take(buf: np.ndarray, p: Placement) -> np.ndarray:
    """Read a logical operand back (unpadded ``[rows, cols]``, float32) from a tensor's [C, W] buffer."""
    c, w = p.stored
    v = np.asarray(buf[p.c0 : p.c0 + c, p.w0 : p.w0 + w], dtype=np.float32)
    if p.transposed:
        v = v.T
    return p.cols.unpad(p.rows.unpad(v, 0), 1)


class Staging:
    """The host's copy of one program's input tensors, written operand by operand.

    A pipeline keeps one per (layer, program): weights are written once after each optimizer update,
    activations every step; :attr:`arrays` is what an executor's ``run`` receives.
    """

    def __init__(self, program: AneProgram) -> None:
        self.program = program
        self.arrays: dict[str, np.ndarray] = {
            t.name: np.zeros(t.shape, dtype=np.float16) for t in program.inputs
        }
        self._specs = {t.name: t for t in program.inputs}

    def write(self, operand: str, value: np.ndarray) -> None:
        p = self.program.in_placements[operand]
        place(to_matrix(self.arrays[p.tensor], self._specs[p.tensor]), p, value)


def read_operand(program: AneProgram, outputs: dict[str, np.ndarray], operand: str) -> np.ndarray:
    """A logical output operand (unpadded, float32) from an executor's outputs."""
    p = program.out_placements[operand]
    spec = next(t for t in program.outputs if t.name == p.tensor)
    return take(to_matrix(outputs[p.tensor], spec), p)


# ------------------------------------------------------------------------------------------------
# Surfaces, allocation and binding


class Surface:
    """An IOSurface: ``alloc`` bytes; a tensor occupies the start of it."""

    def __init__(self, alloc: int) -> None:
        self.alloc = int(alloc)
        self.data = bytearray(self.alloc)

    def write(self, values: np.ndarray) -> None:
        raw = np.ascontiguousarray(values, dtype="<f2").tobytes()
        if len(raw) > self.alloc:
            raise ValueError(f"{len(raw)} bytes do not fit a {self.alloc}-byte surface")
        self.data[: len(raw)] = raw

    def read(self, shape: tuple[int, ...]) -> np.ndarray:
        n = math.prod(shape)
        return np.frombuffer(bytes(self.data[: 2 * n]), dtype="<f2").astype(np.float16).reshape(shape)


def binding_order(specs: list[TensorSpec]) -> list[TensorSpec]:
    """Tensors in the order the ANE binds surfaces to them: alphabetical by MIL name."""
    return sorted(specs, key=lambda t: t.name)


def allocation_bytes(specs: list[TensorSpec], align: int) -> int:
    """The one allocation size every surface of this side of a request gets."""
    return round_up(max(t.nbytes for t in specs), align)


class SurfaceSizes:
    """The allocation size of each side of a request, for anything with ``inputs``, ``outputs`` and
    ``dialect`` (kernel programs, peak probes, the specs a device compiles)."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    dialect: Dialect

    @property
    def input_alloc_bytes(self) -> int:
        return allocation_bytes(self.inputs, self.dialect.surface_align)

    @property
    def output_alloc_bytes(self) -> int:
        return allocation_bytes(self.outputs, self.dialect.surface_align)


def input_surfaces(program: AneProgram, arrays: dict[str, np.ndarray]) -> list[Surface]:
    """Correctly sized input surfaces in binding order, filled from ``arrays`` (MIL name -> values)."""
    specs = binding_order(program.inputs)
    missing = [t.name for t in specs if t.name not in arrays]
    if missing:
        raise ValueError(f"program {program.name}: no data for input(s) {', '.join(missing)}")
    alloc = allocation_bytes(specs, program.dialect.surface_align)
    out = []
    for t in specs:
        a = np.asarray(arrays[t.name])
        if a.size != math.prod(t.shape):
            raise ValueError(
                f"program {program.name}: input {t.name} needs shape {list(t.shape)}, got {list(a.shape)}"
            )
        s = Surface(alloc)
        s.write(a)
        out.append(s)
    return out


def output_surfaces(program: AneProgram) -> list[Surface]:
    alloc = allocation_bytes(program.outputs, program.dialect.surface_align)
    return [Surface(alloc) for _ in program.outputs]


def read_outputs(program: AneProgram, surfaces: list[Surface]) -> dict[str, np.ndarray]:
    return {t.name: s.read(t.shape) for t, s in zip(binding_order(program.outputs), surfaces, strict=True)}
