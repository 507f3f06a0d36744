"""The ANE simulator: a reference executor for the generated MIL text (``--backend ane-sim``).

It parses the program's TEXT (not the builder's graph, so what is tested is what a Mac would compile),
checks it the way the hardware path would, and runs it with numpy.

Numerics. The ANE holds fp16 everywhere. Inputs, constants, outputs and the result of every op are
rounded to fp16 (round to nearest even); values overflow to +-inf and propagate as IEEE floats (the real
ANE saturates some of them, so fp16 overflow shows up here as inf/nan, which is what loss scaling detects).
Inside one op the arithmetic is float32: a matmul multiplies fp16 values and **accumulates in fp32**, then
rounds its result once; softmax and reduce_sum likewise accumulate in fp32 (the ANE's internal accumulator
width is undocumented; fp32 is the assumption of this simulator and the tolerances of its tests).

Hardware rules it enforces:

* chip dialect: ``program(1.0)``/``ios16`` with verbose scalars for m1/m2, ``program(1.3)``/``ios18``
  for m3..m5; no ``cast`` on m1/m2 (compile error, :class:`~.milparse.MilError`);
* only the ops the generator emits (anything else is a compile error naming the line);
* every declared result type must match what the op computes;
* a matmul whose inner dimension is not a multiple of 32: the hardware silently returns zeros. The
  simulator **raises** :class:`AneRuleError` by default (``strict_matmul=True``) so such a program never
  passes unnoticed; with ``strict_matmul=False`` it returns zeros like the hardware;
* a request binds its surfaces to the MIL inputs/outputs in alphabetical order of their names (a host that
  orders them otherwise gets wrong data, silently, as on the hardware); every input surface must have the
  same allocation size (likewise outputs), large enough for its tensor and a multiple of the chip's
  alignment, else the request fails with :class:`AneStatusError` status 0x1d as the ANE does.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ..errors import AnetrainError
from .blob import read_blob
from .dialect import Dialect, dialect_for
from .limits import check_limits
from .mil import MATMUL_MULTIPLE
from .milparse import BlobRef, Literal, MilError, MilType, ParsedProgram, Statement, parse_mil
from .surfaces import Surface, binding_order, input_surfaces, output_surfaces, read_outputs
from .surfaces import TensorSpec as _Spec

STATUS_BAD_REQUEST = 0x1D  # the status the ANE reports for a request whose surfaces do not fit the program


class AneStatusError(AnetrainError):
    """An evaluation request the ANE would reject; ``status`` is the ANE's error code."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(f"ANE request failed with status 0x{status:x}: {message}")


class AneRuleError(AnetrainError):
    """A program that breaks a hardware rule the ANE does not report (it would compute garbage)."""


_BLAS: Any = None


@contextlib.contextmanager
def _single_threaded_blas() -> Iterator[None]:
    """numpy's BLAS limited to one thread while a program runs.

    The simulator's matmuls are small; a multi-threaded OpenBLAS spends more time waking threads than
    computing (and is erratic on a loaded machine). Uses threadpoolctl when it is installed, else no-op.
    """
    global _BLAS
    if _BLAS is None:
        try:
            from threadpoolctl import ThreadpoolController

            _BLAS = ThreadpoolController()
        except ImportError:
            _BLAS = False
    if _BLAS is False:
        yield
    else:
        with _BLAS.limit(limits=1, user_api="blas"):
            yield


def fp16(a: Any) -> np.ndarray:
    """Round to fp16 and hold the value as float32 (the simulator's storage form)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(a, dtype=np.float32).astype(np.float16).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Ops: each takes the statement's resolved arguments and returns a float32 array (rounded by the caller)


def _matmul(strict: bool, where: str) -> Callable[..., np.ndarray]:
    def run(x: np.ndarray, y: np.ndarray, transpose_x: Any = False, transpose_y: Any = False) -> np.ndarray:
        a = np.swapaxes(x, -1, -2) if bool(transpose_x) else x
        b = np.swapaxes(y, -1, -2) if bool(transpose_y) else y
        if a.shape[-1] != b.shape[-2]:
            raise MilError(f"{where}: matmul inner dimensions {a.shape[-1]} and {b.shape[-2]} differ")
        if a.shape[-1] % MATMUL_MULTIPLE:
            if strict:
                raise AneRuleError(
                    f"{where}: matmul inner dimension {a.shape[-1]} is not a multiple of {MATMUL_MULTIPLE}; "
                    "the ANE would silently return zeros"
                )
            shape = (*np.broadcast_shapes(a.shape[:-2], b.shape[:-2]), a.shape[-2], b.shape[-1])
            return np.zeros(shape, dtype=np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            return np.matmul(np.asarray(a, np.float32), np.asarray(b, np.float32))

    return run


def _reshape(x: np.ndarray, shape: Any) -> np.ndarray:
    return x.reshape(tuple(int(s) for s in np.asarray(shape).reshape(-1)))


def _transpose(x: np.ndarray, perm: Any) -> np.ndarray:
    return np.transpose(x, tuple(int(p) for p in np.asarray(perm).reshape(-1)))


def _slice_by_size(x: np.ndarray, begin: Any, size: Any) -> np.ndarray:
    b = [int(v) for v in np.asarray(begin).reshape(-1)]
    s = [int(v) for v in np.asarray(size).reshape(-1)]
    if (
        len(b) != x.ndim
        or len(s) != x.ndim
        or any(b0 < 0 or n < 1 or b0 + n > d for b0, n, d in zip(b, s, x.shape, strict=True))
    ):
        raise ValueError(f"slice begin {b} size {s} is outside {list(x.shape)}")
    return x[tuple(slice(b0, b0 + n) for b0, n in zip(b, s, strict=True))]


def _concat(values: tuple[np.ndarray, ...], axis: Any, interleave: Any = False) -> np.ndarray:
    """Concatenate along ``axis``; with ``interleave`` the inputs (all the same shape) alternate slice by
    slice: a0[0], b0[0], a0[1], b0[1], ... (MIL's concat(interleave=true))."""
    ax = int(axis) % values[0].ndim
    if not bool(interleave):
        return np.concatenate(values, axis=ax)
    if any(v.shape != values[0].shape for v in values):
        raise ValueError("concat with interleave = true needs inputs of one shape")
    stacked = np.stack(values, axis=ax + 1)  # [..., n_ax, len(values), ...]
    shape = list(values[0].shape)
    shape[ax] *= len(values)
    return stacked.reshape(shape)


def _softmax(x: np.ndarray, axis: Any) -> np.ndarray:
    ax = int(axis)
    m = np.max(x, axis=ax, keepdims=True)
    with np.errstate(invalid="ignore", over="ignore"):
        e = np.exp(x - m)
        return e / np.sum(e, axis=ax, keepdims=True)


def _reduce_sum(x: np.ndarray, axes: Any, keep_dims: Any = False) -> np.ndarray:
    return np.sum(x, axis=tuple(int(a) for a in np.asarray(axes).reshape(-1)), keepdims=bool(keep_dims))


def _binary(fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Callable[..., np.ndarray]:
    def run(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            return fn(np.asarray(x, np.float32), np.asarray(y, np.float32))

    return run


def _sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-x))


_PARAMS: dict[str, tuple[set[str], set[str]]] = {  # op -> (required params, optional params)
    "reshape": ({"x", "shape"}, set()),
    "transpose": ({"x", "perm"}, set()),
    "matmul": ({"x", "y"}, {"transpose_x", "transpose_y"}),
    "slice_by_size": ({"x", "begin", "size"}, set()),
    "concat": ({"values", "axis"}, {"interleave"}),
    "add": ({"x", "y"}, set()),
    "sub": ({"x", "y"}, set()),
    "mul": ({"x", "y"}, set()),
    "pow": ({"x", "y"}, set()),
    "softmax": ({"x", "axis"}, set()),
    "reduce_sum": ({"x", "axes"}, {"keep_dims"}),
    "sigmoid": ({"x"}, set()),
}
_FLOAT_OPS = {"matmul", "add", "sub", "mul", "pow", "softmax", "reduce_sum", "sigmoid"}


def _op_table(strict: bool, where: str) -> dict[str, Callable[..., np.ndarray]]:
    return {
        "reshape": _reshape,
        "transpose": _transpose,
        "matmul": _matmul(strict, where),
        "slice_by_size": _slice_by_size,
        "concat": _concat,
        "add": _binary(np.add),
        "sub": _binary(np.subtract),
        "mul": _binary(np.multiply),
        "pow": _binary(np.power),
        "softmax": _softmax,
        "reduce_sum": _reduce_sum,
        "sigmoid": _sigmoid,
    }


# ------------------------------------------------------------------------------------------------
# A loaded program


class SimProgram:
    """MIL text loaded for one chip: parsed, checked against the dialect, constants resolved.

    ``weights`` maps BLOBFILE paths (``@model_path/weights/x.bin``) to blob bytes, as the compiler's
    weight dictionary does.
    """

    def __init__(
        self,
        text: str,
        weights: dict[str, bytes] | None = None,
        chip: str = "m4",
        *,
        strict_matmul: bool = True,
        source: str = "<mil>",
    ) -> None:
        self.source = source
        self.dialect: Dialect = dialect_for(chip)
        self.strict_matmul = strict_matmul
        self.parsed: ParsedProgram = parse_mil(text, source)
        self._check_dialect()
        weights = weights or {}
        self.inputs = [_Spec(n, t.dims) for n, t in self.parsed.inputs]
        self.types: dict[str, MilType] = {n: t for n, t in self.parsed.inputs}
        self.consts: dict[str, Any] = {}
        self.steps: list[tuple[Statement, Callable[..., np.ndarray], dict[str, Any]]] = []
        for st in self.parsed.statements:
            self.types[st.name] = st.type
            if st.op == "const":
                self.consts[st.name] = self._const_value(st, weights)
            else:
                self.steps.append(self._compile_step(st))
        self.outputs = [_Spec(n, self.types[n].dims) for n in self.parsed.outputs]
        for t in self.inputs + self.outputs:
            if self.types[t.name].dtype != "fp16" or not t.shape:
                raise MilError(
                    f"{source}: input/output {t.name} must be an fp16 tensor (ANE surfaces are fp16)"
                )
        self._check_limits()

    def _check_limits(self) -> None:
        """Refuse a program over the chip's limits before it runs (:mod:`.limits`); with ``strict_matmul``
        off, a matmul whose contraction is not a multiple of 32 is let through (it returns zeros)."""
        tensors = [(t.name, t.shape) for t in self.inputs]
        matmuls = []
        for st in self.parsed.statements:
            if st.op == "const":
                continue
            tensors.append((st.name, st.type.dims))
            if st.op == "matmul" and self.strict_matmul:
                x = self.types[str(st.args["x"])].dims
                tx = "transpose_x" in st.args and bool(self.consts[str(st.args["transpose_x"])])
                matmuls.append((st.name, x[-2] if tx else x[-1]))
        check_limits(self.source, self.dialect.chip, self.dialect.opset, tensors, matmuls)

    # ---- loading -------------------------------------------------------------------------------
    def _check_dialect(self) -> None:
        p, d = self.parsed, self.dialect
        if (p.version, p.opset) != (d.program_version, d.opset):
            raise MilError(
                f"{self.source}: program({p.version}) with func main<{p.opset}> does not compile on {d.chip} "
                f"(it needs program({d.program_version}) and <{d.opset}>)"
            )
        wrong = "short" if d.verbose_scalars else "verbose"
        if wrong in p.scalar_syntax:
            raise MilError(
                f"{self.source}: {wrong} scalar syntax does not compile on {d.chip} "
                f"({'tensor<string, []>(...)' if d.verbose_scalars else 'string(...)'} expected)"
            )
        if not d.allows_cast and any(s.op == "cast" for s in p.statements):
            line = next(s.line for s in p.statements if s.op == "cast")
            raise MilError(f"{self.source}: line {line}: the {d.chip} ANE rejects the cast op")

    def _const_value(self, st: Statement, weights: dict[str, bytes]) -> Any:
        where = f"{self.source}: line {st.line}"
        if st.args or "val" not in st.attrs:
            raise MilError(f"{where}: const() takes no arguments and needs a val attribute")
        lit: Literal = st.attrs["val"]
        if lit.type.dtype != st.type.dtype or lit.type.dims != st.type.dims:
            raise MilError(
                f"{where}: const {st.name} is declared {_fmt(st.type)} but its value is {_fmt(lit.type)}"
            )
        if isinstance(lit.value, BlobRef):
            if lit.value.path not in weights:
                raise MilError(f"{where}: no weight blob {lit.value.path!r} was supplied")
            flat = read_blob(weights[lit.value.path], lit.value.path, lit.value.offset)
            if flat.size != math.prod(st.type.dims):
                raise MilError(
                    f"{where}: blob {lit.value.path} holds {flat.size} values, "
                    f"{st.name} needs {list(st.type.dims)}"
                )
            return flat.astype(np.float32).reshape(st.type.dims)
        if st.type.dtype == "fp16":
            return fp16(lit.value)
        return lit.value

    def _compile_step(self, st: Statement) -> tuple[Statement, Callable[..., np.ndarray], dict[str, Any]]:
        where = f"{self.source}: line {st.line}"
        if st.op not in _PARAMS:
            raise MilError(
                f"{where}: unsupported op {st.op!r} (the simulator runs: {', '.join(sorted(_PARAMS))})"
            )
        required, optional = _PARAMS[st.op]
        missing, extra = required - set(st.args), set(st.args) - required - optional
        if missing or extra:
            raise MilError(
                f"{where}: {st.op} "
                + (f"is missing {sorted(missing)}" if missing else f"has unknown {sorted(extra)}")
            )
        if st.type.dtype != "fp16":
            raise MilError(f"{where}: {st.op} result {st.name} must be fp16, declared {st.type.dtype}")
        return st, _op_table(self.strict_matmul, where)[st.op], dict(st.args)

    # ---- running -------------------------------------------------------------------------------
    def run(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Execute on named inputs (any float dtype, rounded to fp16); returns fp16 outputs by name."""
        env: dict[str, Any] = dict(self.consts)
        for t in self.inputs:
            if t.name not in arrays:
                raise MilError(f"{self.source}: no value for input {t.name}")
            a = np.asarray(arrays[t.name])
            if a.size != math.prod(t.shape):
                raise MilError(f"{self.source}: input {t.name} needs {list(t.shape)}, got {list(a.shape)}")
            env[t.name] = fp16(a.reshape(t.shape))
        with _single_threaded_blas():
            self._execute(env)
        return {t.name: env[t.name].astype(np.float16) for t in self.outputs}

    def _execute(self, env: dict[str, Any]) -> None:
        for st, fn, args in self.steps:
            kwargs = {
                k: (tuple(env[n] for n in v) if isinstance(v, tuple) else env[v]) for k, v in args.items()
            }
            try:
                out = fn(**kwargs)
            except (ValueError, IndexError) as e:
                raise MilError(f"{self.source}: line {st.line}: {st.op} {st.name}: {e}") from None
            if tuple(out.shape) != st.type.dims:
                raise MilError(
                    f"{self.source}: line {st.line}: {st.name} is declared {_fmt(st.type)} "
                    f"but {st.op} computes {list(out.shape)}"
                )
            env[st.name] = fp16(out) if st.op in _FLOAT_OPS else out

    def evaluate(self, inputs: list[Surface], outputs: list[Surface]) -> None:
        """Run a request: surfaces bind to the MIL names in alphabetical order, as on the hardware."""
        ins, outs = binding_order(self.inputs), binding_order(self.outputs)
        self._check_surfaces("input", ins, inputs)
        self._check_surfaces("output", outs, outputs)
        result = self.run({t.name: s.read(t.shape) for t, s in zip(ins, inputs, strict=True)})
        for t, s in zip(outs, outputs, strict=True):
            s.write(result[t.name])

    def _check_surfaces(self, side: str, specs: list[_Spec], surfaces: list[Surface]) -> None:
        if len(specs) != len(surfaces):
            raise AneStatusError(
                STATUS_BAD_REQUEST, f"{self.source}: {len(surfaces)} {side} surfaces for {len(specs)} {side}s"
            )
        sizes = {s.alloc for s in surfaces}
        if len(sizes) != 1:
            raise AneStatusError(
                STATUS_BAD_REQUEST,
                f"{self.source}: {side} surfaces have different allocation sizes {sorted(sizes)} "
                "(all surfaces of a request must be allocated alike)",
            )
        alloc = sizes.pop()
        if alloc % self.dialect.surface_align:
            raise AneStatusError(
                STATUS_BAD_REQUEST,
                f"{self.source}: {side} allocation {alloc} is not a multiple of {self.dialect.surface_align} "
                f"bytes ({self.dialect.chip})",
            )
        for t in specs:
            if t.nbytes > alloc:
                raise AneStatusError(
                    STATUS_BAD_REQUEST,
                    f"{self.source}: {side} {t.name} needs {t.nbytes} bytes, surfaces hold {alloc}",
                )


def _fmt(t: MilType) -> str:
    return f"{t.dtype}{list(t.dims)}"


# ------------------------------------------------------------------------------------------------
# The executor seam


class SimExecutor:
    """Runs :class:`~.program.AneProgram` objects: ``run(program, inputs) -> outputs``.

    ``inputs`` maps each MIL input name to its values (fp16, the tensor's shape); the result maps each
    output name to fp16 values. A macOS runtime offers the same method; this one compiles (parses) each
    program once, builds the request's surfaces with :mod:`.surfaces` and evaluates it.
    """

    name = "ane-sim"

    def __init__(self, strict_matmul: bool = True) -> None:
        self.strict_matmul = strict_matmul
        self._loaded: dict[int, tuple[Any, SimProgram]] = {}  # id -> (program kept alive, loaded form)
        self.compiles = 0
        self.evals = 0

    def load(self, program: Any) -> SimProgram:
        key = id(program)
        if key not in self._loaded:
            sim = SimProgram(
                program.mil_text,
                program.weights,
                program.chip,
                strict_matmul=self.strict_matmul,
                source=program.name,
            )
            self._loaded[key] = (program, sim)
            self.compiles += 1
        return self._loaded[key][1]

    def run(self, program: Any, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        sim = self.load(program)
        ins = input_surfaces(program, inputs)
        outs = output_surfaces(program)
        sim.evaluate(ins, outs)
        self.evals += 1
        return read_outputs(program, outs)

    def close(self) -> None:
        self._loaded.clear()
