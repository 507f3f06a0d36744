"""The Neural Engine's hard limits, checked before any work starts.

A program that breaks one of these either fails to compile on the device or, worse, compiles and computes
garbage without an error (a matmul whose contraction is not a multiple of 32 returns zeros). The simulator,
the ANE runtimes and the kernel-set builder all refuse such a program up front with one line naming the
program, the tensor, the limit and the chip (:class:`AneLimitError`, a configuration error: exit status 2).

Limits (docs/ane.md, "Hardware limits"):

* rank: at most 5;
* width (the last axis of a tensor, the ANE's W): at most 16,384 on M1/M2 (``ios16``), 65,536 on M3-M5;
* channels (axis 1 of a rank-4 or rank-5 tensor, the ANE's C): at most 65,536;
* a matmul's contracted dimension: a multiple of 32.

They apply to every tensor of a program (inputs, outputs and every intermediate), not only to its surfaces.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..errors import ConfigError
from .mil import MATMUL_MULTIPLE, Graph, Op

MAX_RANK = 5
MAX_WIDTH = {"ios16": 16384, "ios18": 65536}  # by opset: M1/M2 (ios16) and M3-M5 (ios18)
MAX_CHANNELS = 65536


class AneLimitError(ConfigError):
    """A program that exceeds a hardware limit of the chip it is built for."""


def tensor_limit_problems(name: str, shape: tuple[int, ...], opset: str) -> list[str]:
    """What ``shape`` breaks, as phrases naming the tensor and the limit (empty when it fits)."""
    out = []
    if len(shape) > MAX_RANK:
        out.append(f"tensor {name} {list(shape)} has rank {len(shape)}, above the limit of {MAX_RANK}")
    if len(shape) >= 2 and shape[-1] > MAX_WIDTH[opset]:
        out.append(
            f"tensor {name} {list(shape)} has width {shape[-1]}, above the limit of {MAX_WIDTH[opset]}"
        )
    if len(shape) >= 4 and shape[1] > MAX_CHANNELS:
        out.append(f"tensor {name} {list(shape)} has {shape[1]} channels, above the limit of {MAX_CHANNELS}")
    return out


def matmul_limit_problem(name: str, contracted: int) -> str | None:
    if contracted % MATMUL_MULTIPLE:
        return (
            f"matmul {name} contracts over {contracted}, not a multiple of {MATMUL_MULTIPLE} "
            "(the Neural Engine would return zeros)"
        )
    return None


def check_limits(
    program: str,
    chip: str,
    opset: str,
    tensors: Iterable[tuple[str, tuple[int, ...]]],
    matmuls: Iterable[tuple[str, int]] = (),
) -> None:
    """Raise :class:`AneLimitError` for the first limit a program breaks.

    ``tensors``: (name, shape) of every tensor; ``matmuls``: (result name, contracted length) of every
    matmul.
    """
    for name, shape in tensors:
        problems = tensor_limit_problems(name, tuple(shape), opset)
        if problems:
            raise AneLimitError(f"ANE program {program}: {problems[0]} on {chip}")
    for name, k in matmuls:
        problem = matmul_limit_problem(name, k)
        if problem:
            raise AneLimitError(f"ANE program {program}: {problem} on {chip}")


def graph_limits(graph: Graph) -> tuple[list[tuple[str, tuple[int, ...]]], list[tuple[str, int]]]:
    """The tensors and matmul contractions of a :class:`~.mil.Graph` (for :func:`check_limits`)."""
    tensors = [(v.name, v.shape) for v in graph.inputs]
    matmuls: list[tuple[str, int]] = []
    flags: dict[str, bool] = {}
    for node in graph.nodes:
        if not isinstance(node, Op):
            if node.out.dtype == "bool":
                flags[node.out.name] = bool(node.value)
            continue
        tensors.append((node.out.name, node.out.shape))
        if node.op == "matmul":
            args = dict(node.args)
            x, tx = args["x"], args["transpose_x"]
            assert not isinstance(x, tuple) and not isinstance(tx, tuple)
            matmuls.append((node.out.name, x.shape[-2] if flags[tx.name] else x.shape[-1]))
    return tensors, matmuls


def check_graph(graph: Graph, program: str, chip: str, opset: str) -> None:
    """:func:`check_limits` over every tensor and matmul of a graph."""
    tensors, matmuls = graph_limits(graph)
    check_limits(program, chip, opset, tensors, matmuls)


def check_program(program: object) -> None:
    """:func:`check_graph` for anything with ``name``, ``dialect`` and a builder ``graph`` (kernel programs,
    peak probes); a no-op for a program without a graph."""
    graph = getattr(program, "graph", None)
    if isinstance(graph, Graph):
        d = program.dialect  # type: ignore[attr-defined]
        check_graph(graph, program.name, d.chip, d.opset)  # type: ignore[attr-defined]
