"""A small MIL program builder: one definition of a kernel, rendered as MIL text or as a coremltools program.

A kernel is written once, as calls on a :class:`MilBuilder` (``b.matmul(...)``, ``b.softmax(...)``). The
builder infers every result's type and shape as it goes and records a :class:`Graph`. From that graph

* :func:`render_text` writes the MIL text the in-memory ANE compiler takes, in a chip's dialect
  (``program(1.3)``/``ios18`` or ``program(1.0)``/``ios16`` with verbose scalars), and
* :func:`to_coreml` replays the same graph through coremltools' MIL builder, so Apple's own type inference
  checks every op name, parameter, dtype and shape, and ``ct.convert`` can turn it into an ML program.

Conventions of the text (those of the original trainer's generators): every non-tensor parameter is a named
``const``, every op carries ``[name = string("<label>")]`` (its result's name unless a node gives another
label), large fp16 constants live in weight blobs referenced by
``BLOBFILE(path = "@model_path/weights/<name>.bin", offset = 64)``.

Two text styles (:data:`STYLES`) render the same graph: ``anetrain`` (``name = string("x")``, spaces after
commas; the builder's programs) and ``original`` (``name=string("x")``, no spaces inside shapes and argument
lists, parameters in the original generator's order: the text the original trainer hands the compiler, see
:mod:`.original`). Only the layout differs, never the program.

Only the ops the kernels need exist here: reshape, transpose, matmul, slice_by_size, concat, add, sub, mul,
pow, softmax, reduce_sum, sigmoid. ``cast`` is deliberately absent (M1/M2 reject it; all I/O is fp16).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .dialect import Dialect

MATMUL_MULTIPLE = 32  # the ANE's rule: a matmul's inner (contracted) dimension is a multiple of 32
BLOB_PREFIX = "@model_path/weights/"
BUILD_INFO_18 = (
    '[buildInfo = dict<string, string>({{"coremlc-component-MIL", "3510.2.1"}, '
    '{"coremlc-version", "3505.4.1"}, {"coremltools-component-milinternal", ""}, '
    '{"coremltools-version", "9.0"}})]'
)
BUILD_INFO_16 = (
    '[buildInfo = dict<tensor<string, []>, tensor<string, []>>({{"coremlc-version", "3505.4.1"}})]'
)

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class MilBuildError(ValueError):
    """A kernel definition asked for something the builder cannot express (a bug in the generator)."""


# ------------------------------------------------------------------------------------------------
# The graph


@dataclass(frozen=True)
class Var:
    """A named value: dtype is a MIL scalar type name; shape () means a scalar."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def rank(self) -> int:
        return len(self.shape)


@dataclass(frozen=True)
class Const:
    """``const()``: a literal (python scalar or numpy array) or, with ``blob``, a tensor in a weight blob.

    ``label`` is the ``name`` attribute when it differs from the result's name; ``text`` spells a scalar
    literal exactly (the original writes ``fp16(0.125000)`` with C's ``%f`` and ``fp16(-1)`` by hand).
    """

    out: Var
    value: Any
    blob: str | None = None
    label: str | None = None
    text: str | None = None


@dataclass(frozen=True)
class Op:
    """One operation; ``args`` keeps the parameter order of the text; ``label`` as for :class:`Const`."""

    op: str
    out: Var
    args: tuple[tuple[str, Var | tuple[Var, ...]], ...]
    label: str | None = None


Node = Const | Op


@dataclass
class Graph:
    """A whole ``main`` function: inputs in declaration order, nodes in order, outputs, blob contents."""

    inputs: list[Var]
    nodes: list[Node]
    outputs: list[Var]
    blobs: dict[str, np.ndarray] = field(default_factory=dict)  # BLOBFILE path -> fp16 array

    def count(self, op: str) -> int:
        return sum(1 for n in self.nodes if isinstance(n, Op) and n.op == op)


# ------------------------------------------------------------------------------------------------
# The builder


def _broadcast(a: tuple[int, ...], b: tuple[int, ...], what: str) -> tuple[int, ...]:
    try:
        return tuple(np.broadcast_shapes(a, b))
    except ValueError:
        raise MilBuildError(f"{what}: shapes {list(a)} and {list(b)} do not broadcast") from None


class MilBuilder:
    """Records a kernel as a :class:`Graph`, inferring each result's shape.

    ``strict_matmul`` (default) refuses a matmul whose inner dimension is not a multiple of 32: the ANE
    silently returns zeros for those, so the generator must pad instead (tests turn it off to build a
    deliberately bad program for the simulator).
    """

    def __init__(self, strict_matmul: bool = True) -> None:
        self.strict_matmul = strict_matmul
        self.inputs: list[Var] = []
        self.nodes: list[Node] = []
        self.outputs: list[Var] = []
        self.blobs: dict[str, np.ndarray] = {}
        self._names: set[str] = set()
        self._consts: dict[tuple[Any, ...], Var] = {}
        self._auto = 0

    # ---- names -----------------------------------------------------------------------------------
    def _claim(self, name: str) -> str:
        if not _IDENT.match(name):
            raise MilBuildError(f"{name!r} is not a valid MIL identifier")
        if name in self._names:
            raise MilBuildError(f"name {name!r} is used twice")
        self._names.add(name)
        return name

    def _fresh(self, base: str) -> str:
        while True:
            self._auto += 1
            name = f"{base}_{self._auto}"
            if name not in self._names:
                return self._claim(name)

    # ---- inputs, constants, outputs ---------------------------------------------------------------
    def input(self, name: str, shape: tuple[int, ...]) -> Var:
        """A function parameter (always fp16: every surface is fp16)."""
        v = Var(self._claim(name), "fp16", tuple(int(s) for s in shape))
        self.inputs.append(v)
        return v

    def const(self, value: Any, dtype: str, hint: str = "c") -> Var:
        """A literal constant, shared with any earlier constant of the same type and value."""
        arr = np.asarray(value)
        key = (dtype, arr.shape, arr.tobytes() if arr.dtype != object else str(value))
        if key in self._consts:
            return self._consts[key]
        base = f"b_{str(bool(value)).lower()}" if dtype == "bool" and arr.shape == () else None
        name = self._claim(base) if base and base not in self._names else self._fresh(base or hint)
        v = Var(name, dtype, tuple(arr.shape))
        self.nodes.append(Const(v, value))
        self._consts[key] = v
        return v

    def fp16(self, value: float, hint: str = "k") -> Var:
        """An fp16 scalar constant (rounded to fp16 here, as the compiler would)."""
        with np.errstate(over="ignore"):
            v = float(np.float16(value))
        if not math.isfinite(v):
            raise MilBuildError(f"fp16 constant {value} is not finite in fp16")
        return self.const(v, "fp16", hint)

    def _ints(self, values: list[int] | tuple[int, ...], hint: str) -> Var:
        return self.const(np.asarray(values, dtype=np.int32), "int32", hint)

    def blob_const(self, name: str, values: np.ndarray) -> Var:
        """An fp16 tensor constant stored in its own weight blob ``@model_path/weights/<name>.bin``."""
        arr = np.ascontiguousarray(values, dtype=np.float16)
        v = Var(self._claim(name), "fp16", tuple(arr.shape))
        path = f"{BLOB_PREFIX}{name}.bin"
        self.blobs[path] = arr
        self.nodes.append(Const(v, arr, blob=path))
        return v

    def output(self, *values: Var) -> None:
        self.outputs.extend(values)

    def graph(self) -> Graph:
        if not self.outputs:
            raise MilBuildError("a program needs at least one output")
        return Graph(list(self.inputs), list(self.nodes), list(self.outputs), dict(self.blobs))

    # ---- ops -------------------------------------------------------------------------------------
    def _op(
        self,
        op: str,
        args: list[tuple[str, Var | tuple[Var, ...]]],
        shape: tuple[int, ...],
        name: str | None,
        dtype: str = "fp16",
    ) -> Var:
        out = Var(self._claim(name) if name else self._fresh(op), dtype, tuple(int(s) for s in shape))
        self.nodes.append(Op(op, out, tuple(args)))
        return out

    def _operand(self, v: Var | float) -> Var:
        return v if isinstance(v, Var) else self.fp16(float(v))

    def reshape(self, x: Var, shape: tuple[int, ...] | list[int], name: str | None = None) -> Var:
        shape = tuple(int(s) for s in shape)
        if math.prod(shape) != math.prod(x.shape):
            raise MilBuildError(f"reshape of {x.name} {list(x.shape)} to {list(shape)} changes the size")
        return self._op("reshape", [("shape", self._ints(shape, "shape")), ("x", x)], shape, name)

    def transpose(self, x: Var, perm: tuple[int, ...] | list[int], name: str | None = None) -> Var:
        if sorted(perm) != list(range(x.rank)):
            raise MilBuildError(f"transpose perm {list(perm)} does not fit rank {x.rank}")
        shape = tuple(x.shape[p] for p in perm)
        return self._op("transpose", [("perm", self._ints(perm, "perm")), ("x", x)], shape, name)

    def matmul(
        self,
        x: Var,
        y: Var,
        transpose_x: bool = False,
        transpose_y: bool = False,
        name: str | None = None,
    ) -> Var:
        """Batched matrix product over the last two axes (leading axes broadcast)."""
        if x.rank < 2 or y.rank < 2:
            raise MilBuildError("matmul operands need rank >= 2")
        m, kx = (x.shape[-1], x.shape[-2]) if transpose_x else (x.shape[-2], x.shape[-1])
        ky, n = (y.shape[-1], y.shape[-2]) if transpose_y else (y.shape[-2], y.shape[-1])
        if kx != ky:
            raise MilBuildError(f"matmul {x.name} x {y.name}: inner dimensions {kx} and {ky} differ")
        if self.strict_matmul and kx % MATMUL_MULTIPLE:
            raise MilBuildError(
                f"matmul {x.name} x {y.name}: inner dimension {kx} is not a multiple of {MATMUL_MULTIPLE} "
                "(the ANE would return zeros; pad it)"
            )
        batch = _broadcast(x.shape[:-2], y.shape[:-2], "matmul batch")
        args: list[tuple[str, Var | tuple[Var, ...]]] = [
            ("transpose_x", self.const(bool(transpose_x), "bool")),
            ("transpose_y", self.const(bool(transpose_y), "bool")),
            ("x", x),
            ("y", y),
        ]
        return self._op("matmul", args, (*batch, m, n), name)

    def slice_by_size(
        self,
        x: Var,
        begin: tuple[int, ...] | list[int],
        size: tuple[int, ...] | list[int],
        name: str | None = None,
    ) -> Var:
        if len(begin) != x.rank or len(size) != x.rank:
            raise MilBuildError(f"slice of rank-{x.rank} {x.name} needs {x.rank} begin and size values")
        for b0, s, n in zip(begin, size, x.shape, strict=True):
            if b0 < 0 or s <= 0 or b0 + s > n:
                raise MilBuildError(
                    f"slice begin {list(begin)} size {list(size)} leaves {x.name} {list(x.shape)}"
                )
        args: list[tuple[str, Var | tuple[Var, ...]]] = [
            ("begin", self._ints(begin, "begin")),
            ("size", self._ints(size, "size")),
            ("x", x),
        ]
        return self._op("slice_by_size", args, tuple(size), name)

    def concat(self, values: list[Var], axis: int, name: str | None = None) -> Var:
        first = values[0]
        ax = axis % first.rank
        for v in values[1:]:
            if v.rank != first.rank or any(
                a != b for i, (a, b) in enumerate(zip(v.shape, first.shape, strict=True)) if i != ax
            ):
                raise MilBuildError(f"concat: {v.name} {list(v.shape)} does not match {list(first.shape)}")
        shape = list(first.shape)
        shape[ax] = sum(v.shape[ax] for v in values)
        args: list[tuple[str, Var | tuple[Var, ...]]] = [
            ("axis", self.const(int(axis), "int32", "axis")),
            ("interleave", self.const(False, "bool")),
            ("values", tuple(values)),
        ]
        return self._op("concat", args, tuple(shape), name)

    def _binary(self, op: str, x: Var | float, y: Var | float, name: str | None) -> Var:
        xv, yv = self._operand(x), self._operand(y)
        shape = _broadcast(xv.shape, yv.shape, op)
        return self._op(op, [("x", xv), ("y", yv)], shape, name)

    def add(self, x: Var | float, y: Var | float, name: str | None = None) -> Var:
        return self._binary("add", x, y, name)

    def sub(self, x: Var | float, y: Var | float, name: str | None = None) -> Var:
        return self._binary("sub", x, y, name)

    def mul(self, x: Var | float, y: Var | float, name: str | None = None) -> Var:
        return self._binary("mul", x, y, name)

    def pow(self, x: Var, y: Var | float, name: str | None = None) -> Var:
        return self._binary("pow", x, y, name)

    def softmax(self, x: Var, axis: int, name: str | None = None) -> Var:
        return self._op(
            "softmax", [("axis", self.const(int(axis), "int32", "axis")), ("x", x)], x.shape, name
        )

    def reduce_sum(self, x: Var, axes: list[int], keep_dims: bool = True, name: str | None = None) -> Var:
        norm = sorted(a % x.rank for a in axes)
        shape = tuple(
            (1 if keep_dims else None) if i in norm else n
            for i, n in enumerate(x.shape)
            if keep_dims or i not in norm
        )
        args: list[tuple[str, Var | tuple[Var, ...]]] = [
            ("axes", self._ints(list(axes), "axes")),
            ("keep_dims", self.const(bool(keep_dims), "bool")),
            ("x", x),
        ]
        return self._op("reduce_sum", args, tuple(int(s) for s in shape if s is not None), name)

    def sigmoid(self, x: Var, name: str | None = None) -> Var:
        return self._op("sigmoid", [("x", x)], x.shape, name)


# ------------------------------------------------------------------------------------------------
# MIL text


def format_fp16(value: float) -> str:
    """The shortest decimal that reads back as the same fp16 value, in positional notation (``0.00001``)."""
    return np.format_float_positional(np.float16(value), unique=True, trim="0")


@dataclass(frozen=True)
class TextStyle:
    """How a graph is laid out as text (never what it computes)."""

    name: str
    sep: str  # between list items and arguments: ", " or ","
    eq: str  # between a parameter and its value: " = " or "="
    param_order: dict[str, tuple[str, ...]] = field(default_factory=dict)  # op -> its parameters' order

    def ordered(self, node: Op) -> list[tuple[str, Var | tuple[Var, ...]]]:
        order = self.param_order.get(node.op)
        if order is None:
            return list(node.args)
        rank = {k: i for i, k in enumerate(order)}
        return sorted(node.args, key=lambda kv: rank.get(kv[0], len(rank)))


ANETRAIN_STYLE = TextStyle("anetrain", ", ", " = ")
ORIGINAL_STYLE = TextStyle(
    "original",
    ",",
    "=",
    {"slice_by_size": ("x", "begin", "size"), "reduce_sum": ("x", "axes", "keep_dims")},
)
STYLES = {s.name: s for s in (ANETRAIN_STYLE, ORIGINAL_STYLE)}


def _type(v: Var, d: Dialect, sep: str = ", ") -> str:
    if not v.shape:
        return f"tensor<{v.dtype}, []>" if d.verbose_scalars else v.dtype
    return f"tensor<{v.dtype}, [{sep.join(str(s) for s in v.shape)}]>"


def _scalar_text(value: Any, dtype: str) -> str:
    if dtype == "bool":
        return "true" if bool(value) else "false"
    if dtype in ("int32", "uint64"):
        return str(int(value))
    if dtype in ("fp16", "fp32"):
        return format_fp16(float(value)) if dtype == "fp16" else repr(float(value))
    if dtype == "string":
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
    raise MilBuildError(f"no literal syntax for dtype {dtype}")


def _scalar_literal(value: Any, dtype: str, d: Dialect, text: str | None = None) -> str:
    body = _scalar_text(value, dtype) if text is None else text
    return f"tensor<{dtype}, []>({body})" if d.verbose_scalars else f"{dtype}({body})"


def _const_literal(c: Const, d: Dialect, style: TextStyle = ANETRAIN_STYLE) -> str:
    v, sep, eq = c.out, style.sep, style.eq
    if c.blob is not None:
        return (
            f"{_type(v, d, sep)}(BLOBFILE(path{eq}{_scalar_literal(c.blob, 'string', d)}, "
            f"offset{eq}{_scalar_literal(64, 'uint64', d)}))"
        )
    if not v.shape:
        return _scalar_literal(c.value, v.dtype, d, c.text)
    items = sep.join(_scalar_text(x, v.dtype) for x in np.asarray(c.value).reshape(-1).tolist())
    return f"{_type(v, d, sep)}([{items}])"


def render_text(graph: Graph, d: Dialect, style: TextStyle = ANETRAIN_STYLE) -> str:
    """The program as MIL text in dialect ``d``, laid out in ``style``.

    The function's parameters are always written ``tensor<fp16, [1, C, 1, W]>`` (both styles do).
    """
    sep, eq = style.sep, style.eq
    name_lit = lambda n: _scalar_literal(n, "string", d)  # noqa: E731
    lines = [f"program({d.program_version})", BUILD_INFO_16 if d.verbose_scalars else BUILD_INFO_18, "{"]
    params = ", ".join(f"{_type(v, d)} {v.name}" for v in graph.inputs)
    lines.append(f"    func main<{d.opset}>({params}) {{")
    for node in graph.nodes:
        out = node.out
        label = name_lit(node.label or out.name)
        if isinstance(node, Const):
            lines.append(
                f"        {_type(out, d, sep)} {out.name} = const()[name{eq}{label}, "
                f"val{eq}{_const_literal(node, d, style)}];"
            )
        else:
            args = sep.join(
                f"{k}{eq}({sep.join(x.name for x in v)})" if isinstance(v, tuple) else f"{k}{eq}{v.name}"
                for k, v in style.ordered(node)
            )
            lines.append(f"        {_type(out, d, sep)} {out.name} = {node.op}({args})[name{eq}{label}];")
    lines.append(f"    }} -> ({', '.join(v.name for v in graph.outputs)});")
    lines.append("}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# coremltools


def _np_value(c: Const) -> Any:
    dtype = c.out.dtype
    if c.blob is not None or dtype == "fp16":
        return np.asarray(c.value, dtype=np.float16) if c.out.shape else np.float16(c.value)
    if dtype == "int32":
        return np.asarray(c.value, dtype=np.int32) if c.out.shape else np.int32(c.value)
    if dtype == "bool":
        return bool(c.value)
    if dtype == "string":
        return str(c.value)
    raise MilBuildError(f"no coremltools value for dtype {dtype}")


def to_coreml(graph: Graph, d: Dialect) -> tuple[Any, list[str]]:
    """The graph rebuilt with coremltools' MIL builder, and any disagreement with our inferred types.

    Every op goes through ``coremltools.converters.mil.Builder`` (the machinery behind ``@mb.program``;
    a ``Function`` is used directly so the inputs keep their MIL names), so Apple's op registry validates
    op names and parameters and its type inference recomputes every shape. Returns ``(program,
    mismatches)``; ``mismatches`` lists each result whose dtype or shape differs from what the text says.
    """
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import Function, Program, types

    target = getattr(ct.target, d.coreml_target)
    specs = {v.name: mb.TensorSpec(shape=v.shape, dtype=types.fp16) for v in graph.inputs}
    mismatches: list[str] = []
    with Function(specs, opset_version=target) as func:
        env: dict[str, Any] = {v.name: func.inputs[v.name] for v in graph.inputs}
        for node in graph.nodes:
            name = node.out.name
            if isinstance(node, Const):
                env[name] = mb.const(val=_np_value(node), name=name)
            else:
                kwargs = {
                    k: (tuple(env[x.name] for x in v) if isinstance(v, tuple) else env[v.name])
                    for k, v in node.args
                }
                env[name] = getattr(mb, node.op)(**kwargs, name=name)
            got = env[name]
            got_shape = tuple(int(s) for s in got.shape)
            got_dtype = types.builtin_to_string(got.dtype)
            if got_shape != node.out.shape or got_dtype != node.out.dtype:
                mismatches.append(
                    f"{name}: text says {node.out.dtype}{list(node.out.shape)}, "
                    f"coremltools infers {got_dtype}{list(got_shape)}"
                )
        func.set_outputs([env[v.name] for v in graph.outputs])
    prog = Program()
    prog.add_function("main", func)
    return prog, mismatches
