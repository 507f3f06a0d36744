"""Typed buffer sets: dataclasses whose tensors declare their shape where they are declared, and the one
function that sizes and allocates them (llm.c's ``ActivationTensors`` and its sizing function, in Python).

A field declared ``xn: torch.Tensor = buf("B S D")`` is a [B, S, D] tensor in the compute dtype;
``buf("B S 1", FP32)`` is one in float32. A shape is a space-separated list of sizes, each a product of
numbers and the symbols of :class:`Dims` (``"B*Hkv R*S S"``); ``""`` is a scalar. A buffer that only one
variant uses (``only="hand"``: hand fusion; ``only="compaction"``: a compacted vocabulary; ``only="qknorm"``:
a QK-norm model; ``"a|b"``: either) is allocated with no elements when that variant is off. :func:`allocate`
makes every buffer of a class for one set of dims.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

import torch

#: the dtype of a buffer declared without one: the pipeline's compute dtype (bf16, fp16 or fp32)
COMPUTE = "compute"
FP32 = torch.float32
INT64 = torch.int64

T = TypeVar("T")


@dataclass(frozen=True)
class Dims:
    """The sizes a micro-step's buffers are made of."""

    B: int  # sequences per micro-batch
    S: int  # tokens per sequence
    D: int  # model dim
    F: int  # FFN hidden dim
    H: int  # query heads
    Hkv: int  # key/value heads
    dh: int  # head dim
    V: int  # classifier rows: the vocabulary, or its compacted size
    C: int  # rows of the cross-entropy's fp32 chunk
    Vblk: int  # rows of one block of the classifier's weight-gradient product
    A: int  # elements of the fp32 scratch through which 16-bit products are added into fp32 gradients
    # LoRA (0 without): the adapter widths k*r of each projection group (k adapted members of rank r)
    Uqkv: int = 0
    Uo: int = 0
    U13: int = 0
    U2: int = 0
    P: int = 0  # elements of the largest adapter weight-gradient product

    @property
    def Hqk(self) -> int:  # query and key heads together (QK-norm normalizes each of them)
        return self.H + self.Hkv

    @property
    def N(self) -> int:  # tokens per micro-batch
        return self.B * self.S

    @property
    def R(self) -> int:  # query heads per key/value head
        return self.H // self.Hkv

    @property
    def Dq(self) -> int:  # query width
        return self.H * self.dh

    @property
    def Dkv(self) -> int:  # key/value width
        return self.Hkv * self.dh

    @property
    def Dqkv(self) -> int:  # the fused q/k/v projection's width
        return self.Dq + 2 * self.Dkv


def buf(shape: str, dtype: torch.dtype | str = COMPUTE, *, only: str | None = None) -> Any:
    """Declare a buffer field: its shape (symbols of :class:`Dims`), dtype and the variant that uses it."""
    return field(metadata={"shape": shape, "dtype": dtype, "only": only})


def size_of(expr: str, dims: Dims) -> int:
    """The value of one size expression: a product of numbers and :class:`Dims` symbols (``"B*Hkv"``)."""
    total = 1
    for factor in expr.split("*"):
        total *= int(factor) if factor.isdigit() else int(getattr(dims, factor))
    return total


def shape_of(shape: str, dims: Dims) -> tuple[int, ...]:
    return tuple(size_of(e, dims) for e in shape.split())


def allocate(
    cls: type[T],
    dims: Dims,
    compute: torch.dtype,
    device: torch.device,
    features: frozenset[str] = frozenset(),
    /,
    **others: Any,
) -> T:
    """An instance of ``cls`` whose buffer fields are new (uninitialized) tensors of their declared shapes;
    ``others`` gives its other fields. A buffer whose ``only`` is not among ``features`` has no elements."""
    tensors: dict[str, torch.Tensor] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        meta = f.metadata
        if "shape" not in meta:
            continue
        dtype = compute if meta["dtype"] == COMPUTE else meta["dtype"]
        wanted = meta["only"] is None or any(o in features for o in meta["only"].split("|"))
        shape = shape_of(meta["shape"], dims) if wanted else (0,)
        tensors[f.name] = torch.empty(shape, dtype=dtype, device=device)
    return cls(**tensors, **others)


def nbytes(buffers: object) -> int:
    """Bytes held by the buffer fields of a buffer set (for reports and tests)."""
    return sum(
        getattr(buffers, f.name).nbytes
        for f in fields(buffers)  # type: ignore[arg-type]
        if "shape" in f.metadata
    )
