"""The peak-throughput probe: chains of 1x1 convolutions with constant weights, timed on the Neural Engine.

It reproduces the original's two probes (docs/ane.md, appendix A.6):

``inmem_peak``
    input ``[1, C, 1, S]`` fp16, ``depth`` 1x1 convs ``[C, C, 1, 1]``; configs (C, S, depth) =
    (512, 64, {32, 48, 64, 96, 128}), (256, 64, {64, 128, 256}), (384, 64, {64, 128});
``ane_int8_bench``
    input ``[1, C, S, S]``; the same chain in fp16 and as W8A8: weights ``constexpr_affine_dequantize``
    (int8, per-tensor scale, zero point 0, axis 0) and between layers ``quantize`` to int8 then
    ``dequantize``; configs (512, 64, 128), (512, 64, 64), (256, 64, 256), (256, 64, 128), (384, 64, 128).

Each program runs 10 warm-up then 50 timed evaluations; TFLOPS = 2 C^2 (S or S^2) depth / time. The
programs come from the same builder as the kernels (:class:`ProbeBuilder` adds ``conv``, ``quantize``,
``dequantize`` and the constexpr weight), in the chip's dialect, with one weight blob per matrix (what M1
needs), and are checked with coremltools by :func:`probe_to_coreml` (on any machine). All I/O is fp16: M1/M2
reject ``cast``; ``quantize``/``dequantize`` need the ios17+ opset, so W8A8 runs on m3..m5 only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..fsutil import atomic_write_bytes, atomic_write_text
from .blob import CHUNK_OFFSET, MAGIC, build_blob
from .dialect import Dialect, dialect_for
from .mil import (
    BLOB_PREFIX,
    Const,
    Graph,
    MilBuilder,
    MilBuildError,
    Op,
    Var,
    _np_value,
    _scalar_literal,
    _type,
    render_text,
)
from .surfaces import SurfaceSizes, TensorSpec

PEAK_CONFIGS: tuple[tuple[int, int, int], ...] = (
    (512, 64, 32),
    (512, 64, 48),
    (512, 64, 64),
    (512, 64, 96),
    (512, 64, 128),
    (256, 64, 64),
    (256, 64, 128),
    (256, 64, 256),
    (384, 64, 64),
    (384, 64, 128),
)
INT8_CONFIGS: tuple[tuple[int, int, int], ...] = (
    (512, 64, 128),
    (512, 64, 64),
    (256, 64, 256),
    (256, 64, 128),
    (384, 64, 128),
)
WARMUP, ITERS = 10, 50
ACT_SCALE = 0.125  # the original's activation quantization scale (int8 steps of 1/8)


@dataclass(frozen=True)
class ProbeConfig:
    """One probe program: ``depth`` 1x1 convs over ``channels``; ``square``: a ``[1, C, S, S]`` input."""

    channels: int
    spatial: int
    depth: int
    int8: bool = False
    square: bool = False

    @property
    def positions(self) -> int:
        return self.spatial * self.spatial if self.square else self.spatial

    @property
    def flops(self) -> float:
        """2 C^2 per position per layer."""
        return 2.0 * self.channels**2 * self.positions * self.depth

    @property
    def weight_mb(self) -> float:
        return self.channels**2 * (1 if self.int8 else 2) * self.depth / 2**20

    @property
    def label(self) -> str:
        sp = f"{self.spatial}x{self.spatial}" if self.square else f"sp{self.spatial}"
        return f"{'W8A8' if self.int8 else 'FP16'} {self.depth}x conv {self.channels}ch {sp}"

    @property
    def name(self) -> str:
        shape = f"s{self.spatial}x{self.spatial}" if self.square else f"s{self.spatial}"
        return f"peak_{'w8a8' if self.int8 else 'fp16'}_c{self.channels}_{shape}_d{self.depth}"


def custom_configs(channels: int, spatial: int, depths: list[int], int8: bool = False) -> list[ProbeConfig]:
    """Probes of given depths: fp16 on ``[1, C, 1, S]``; with ``int8`` fp16/W8A8 pairs on ``[1, C, S, S]``."""
    if channels < 1 or spatial < 1 or not depths or min(depths) < 1:
        raise ConfigError("peak probe: channels, spatial size and every depth must be positive")
    kinds = (False, True) if int8 else (False,)
    return [ProbeConfig(channels, spatial, d, int8=q, square=int8) for d in depths for q in kinds]


def default_configs(int8: bool = False) -> list[ProbeConfig]:
    """The original's tables: fp16 ``[1,C,1,S]`` chains, or fp16/W8A8 pairs on ``[1,C,S,S]``."""
    if not int8:
        return [ProbeConfig(c, s, d) for c, s, d in PEAK_CONFIGS]
    return [ProbeConfig(c, s, d, int8=q, square=True) for c, s, d in INT8_CONFIGS for q in (False, True)]


# ------------------------------------------------------------------------------------------------
# Building


def int8_blob(values: np.ndarray) -> bytes:
    """An int8 weight blob in the layout of the original's ``ane_int8_bench``: a 64-byte file header
    (byte 0 = 1, byte 4 = 2), a chunk header at 64 (DEADBEEF, byte 4 = 1, byte 10 = 8), data at 128."""
    data = np.ascontiguousarray(values, dtype=np.int8).tobytes()
    header = bytearray(128)
    header[0], header[4] = 0x01, 0x02
    header[CHUNK_OFFSET : CHUNK_OFFSET + 4] = MAGIC
    header[CHUNK_OFFSET + 4] = 0x01
    header[CHUNK_OFFSET + 10] = 0x08
    return bytes(header) + data


@dataclass(frozen=True)
class DequantWeight:
    """``constexpr_affine_dequantize`` of an int8 blob: the weight is ``scale * q`` (zero point 0, axis 0)."""

    out: Var
    blob: str
    q: np.ndarray = field(repr=False)
    scale: float


class ProbeBuilder(MilBuilder):
    """The kernel builder plus what the probes need: 1x1 conv, quantize/dequantize, int8 constexpr weights."""

    def __init__(self) -> None:
        super().__init__()
        self.dequant: list[DequantWeight] = []
        self.int8_blobs: dict[str, np.ndarray] = {}

    def conv(self, x: Var, weight: Var, name: str | None = None) -> Var:
        """A 1x1 convolution, stride 1, no padding: ``[1, Cin, H, W]`` with ``[Cout, Cin, 1, 1]``."""
        if x.rank != 4 or weight.rank != 4 or weight.shape[2:] != (1, 1) or weight.shape[1] != x.shape[1]:
            raise MilBuildError(f"conv of {x.name} {list(x.shape)} with {weight.name} {list(weight.shape)}")
        args: list[tuple[str, Var | tuple[Var, ...]]] = [
            ("dilations", self._ints([1, 1], "dilations")),
            ("groups", self.const(1, "int32", "groups")),
            ("pad", self._ints([0, 0, 0, 0], "pad")),
            ("pad_type", self.const("valid", "string", "pad_type")),
            ("strides", self._ints([1, 1], "strides")),
            ("weight", weight),
            ("x", x),
        ]
        return self._op("conv", args, (1, weight.shape[0], *x.shape[2:]), name)

    def quantize(self, x: Var, scale: float, name: str | None = None) -> Var:
        args: list[tuple[str, Var | tuple[Var, ...]]] = [
            ("input", x),
            ("output_dtype", self.const("int8", "string", "q_dtype")),
            ("scale", self.fp16(scale, "q_scale")),
        ]
        return self._op("quantize", args, x.shape, name, dtype="int8")

    def dequantize(self, x: Var, scale: float, name: str | None = None) -> Var:
        args: list[tuple[str, Var | tuple[Var, ...]]] = [("input", x), ("scale", self.fp16(scale, "q_scale"))]
        return self._op("dequantize", args, x.shape, name)

    def int8_weight(self, name: str, q: np.ndarray, scale: float) -> Var:
        """An fp16 weight ``scale * q`` stored as int8 in its own blob."""
        q = np.ascontiguousarray(q, dtype=np.int8)
        v = Var(self._claim(name), "fp16", tuple(q.shape))
        path = f"{BLOB_PREFIX}{name}.bin"
        self.int8_blobs[path] = q
        self.dequant.append(DequantWeight(v, path, q, float(np.float16(scale))))
        return v


@dataclass
class ProbeProgram(SurfaceSizes):
    """A probe program with the attributes a device needs (like :class:`~.program.AneProgram`)."""

    config: ProbeConfig
    dialect: Dialect
    mil_text: str
    weights: dict[str, bytes]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    graph: Graph = field(repr=False)
    dequant: list[DequantWeight] = field(repr=False)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def chip(self) -> str:
        return self.dialect.chip


def _dequant_line(w: DequantWeight, d: Dialect) -> str:
    lit = lambda value, dtype: _scalar_literal(value, dtype, d)  # noqa: E731
    q_type = _type(Var(w.out.name, "int8", w.out.shape), d)
    zero = "tensor<int8, []>(0)" if d.verbose_scalars else "int8(0)"  # mil's literals have no int8
    return (
        f"        {_type(w.out, d)} {w.out.name} = constexpr_affine_dequantize()[axis = {lit(0, 'int32')}, "
        f"name = {lit(w.out.name, 'string')}, "
        f"quantized_data = {q_type}(BLOBFILE(path = {lit(w.blob, 'string')}, "
        f"offset = {lit(CHUNK_OFFSET, 'uint64')})), scale = {lit(w.scale, 'fp16')}, zero_point = {zero}];"
    )


def render_probe_text(graph: Graph, dequant: list[DequantWeight], d: Dialect) -> str:
    """MIL text: the kernel renderer's, with the constexpr weights (which take attributes, not inputs)
    declared first in the function body."""
    lines = render_text(graph, d).split("\n")
    body = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("func main")) + 1
    return "\n".join(lines[:body] + [_dequant_line(w, d) for w in dequant] + lines[body:])


def build_probe(config: ProbeConfig, chip: str = "m4", seed: int = 0) -> ProbeProgram:
    """The probe program for ``config`` in ``chip``'s dialect, with random weights that keep the chain's
    activations near unit size (N(0, 1/C) weights; int8 weights quantized with one scale)."""
    d = dialect_for(chip)
    if config.int8 and d.opset == "ios16":
        raise ConfigError(
            f"the W8A8 probe needs quantize/dequantize (ios17 and later), which {chip} programs cannot use; "
            "run it on m3, m4 or m5"
        )
    rng = np.random.default_rng(seed)
    c = config.channels
    b = ProbeBuilder()
    shape = (1, c, config.spatial, config.spatial) if config.square else (1, c, 1, config.spatial)
    x = b.input("x", shape)
    for i in range(config.depth):
        w = rng.standard_normal((c, c, 1, 1)) / math.sqrt(c)
        if config.int8:
            scale = float(np.abs(w).max()) / 127.0
            weight = b.int8_weight(f"W{i}", np.clip(np.rint(w / scale), -127, 127), scale)
        else:
            weight = b.blob_const(f"W{i}", w)
        x = b.conv(x, weight, name=f"c{i}")
        if config.int8 and i < config.depth - 1:
            x = b.dequantize(b.quantize(x, ACT_SCALE, name=f"q{i}"), ACT_SCALE, name=f"dq{i}")
    b.output(x)
    graph = b.graph()
    weights = {path: build_blob(arr) for path, arr in graph.blobs.items()}
    weights.update({path: int8_blob(q) for path, q in b.int8_blobs.items()})
    return ProbeProgram(
        config=config,
        dialect=d,
        mil_text=render_probe_text(graph, b.dequant, d),
        weights=weights,
        inputs=[TensorSpec(v.name, v.shape) for v in graph.inputs],
        outputs=[TensorSpec(v.name, v.shape) for v in graph.outputs],
        graph=graph,
        dequant=b.dequant,
    )


def probe_to_coreml(probe: ProbeProgram) -> tuple[Any, list[str]]:
    """The probe rebuilt with coremltools' MIL builder, and any disagreement with the text's types (as
    :func:`.mil.to_coreml`, plus the constexpr weights)."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import Function, Program, types

    d = probe.dialect
    target = getattr(ct.target, d.coreml_target)
    specs = {v.name: mb.TensorSpec(shape=v.shape, dtype=types.fp16) for v in probe.graph.inputs}
    mismatches: list[str] = []
    with Function(specs, opset_version=target) as func:
        env: dict[str, Any] = {v.name: func.inputs[v.name] for v in probe.graph.inputs}
        for w in probe.dequant:
            env[w.out.name] = mb.constexpr_affine_dequantize(
                quantized_data=w.q, zero_point=np.int8(0), scale=np.float16(w.scale), axis=0, name=w.out.name
            )
        for node in probe.graph.nodes:
            name = node.out.name
            if isinstance(node, Op):
                kwargs = {
                    k: (tuple(env[x.name] for x in v) if isinstance(v, tuple) else env[v.name])
                    for k, v in node.args
                }
                env[name] = getattr(mb, node.op)(**kwargs, name=name)
            elif isinstance(node, Const):
                env[name] = mb.const(val=_np_value(node), name=name)
        for v in [w.out for w in probe.dequant] + [n.out for n in probe.graph.nodes]:
            got = env[v.name]
            got_shape = tuple(int(s) for s in got.shape)
            got_dtype = types.builtin_to_string(got.dtype)
            if got_shape != v.shape or got_dtype != v.dtype:
                mismatches.append(
                    f"{v.name}: text says {v.dtype}{list(v.shape)}, "
                    f"coremltools infers {got_dtype}{list(got_shape)}"
                )
        func.set_outputs([env[v.name] for v in probe.graph.outputs])
    prog = Program()
    prog.add_function("main", func)
    return prog, mismatches


def emit_probe(probe: ProbeProgram, out_dir: str | Path) -> list[Path]:
    """Write ``<name>.mil`` and ``<name>/weights/*.bin`` (the layout of ``anetrain ane emit``)."""
    out = Path(out_dir)
    mil = out / f"{probe.name}.mil"
    atomic_write_text(mil, probe.mil_text)
    written = [mil]
    for path, data in probe.weights.items():
        dest = out / probe.name / "weights" / path.removeprefix(BLOB_PREFIX)
        atomic_write_bytes(dest, data)
        written.append(dest)
    return written


# ------------------------------------------------------------------------------------------------
# Timing


def time_evaluations(
    loaded: Any, warmup: int = WARMUP, iters: int = ITERS, clock: Callable[[], float] = time.perf_counter
) -> float:
    """Milliseconds per evaluation of a loaded program: ``warmup`` untimed runs, then ``iters`` timed."""
    for _ in range(warmup):
        loaded.evaluate()
    t0 = clock()
    for _ in range(iters):
        loaded.evaluate()
    return (clock() - t0) * 1e3 / iters


def tflops(config: ProbeConfig, ms: float) -> float:
    """TFLOPS = (2 C^2 positions depth / 1e9) / ms."""
    return config.flops / 1e9 / ms if ms > 0 else 0.0


def run_probe(
    device: Any,
    config: ProbeConfig,
    chip: str,
    *,
    warmup: int = WARMUP,
    iters: int = ITERS,
    seed: int = 0,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Any]:
    """Compile, time and release one probe; a program the device refuses is reported, not raised."""
    from .runtime.device import AneRuntimeError

    row: dict[str, Any] = {
        "config": config.label,
        "channels": config.channels,
        "spatial": config.spatial,
        "depth": config.depth,
        "int8": config.int8,
        "square": config.square,
        "gflop": config.flops / 1e9,
        "weight_mb": config.weight_mb,
    }
    probe = build_probe(config, chip, seed)
    try:
        loaded = device.load(probe)
    except AneRuntimeError as e:
        return {**row, "ms": None, "tflops": None, "error": str(e)}
    try:
        x = np.random.default_rng(seed).standard_normal(probe.inputs[0].shape).astype(np.float16)
        loaded.write({"x": x})
        ms = time_evaluations(loaded, warmup, iters, clock)
    except AneRuntimeError as e:
        return {**row, "ms": None, "tflops": None, "error": str(e)}
    finally:
        loaded.release()
    return {**row, "ms": ms, "tflops": tflops(config, ms), "error": None}
