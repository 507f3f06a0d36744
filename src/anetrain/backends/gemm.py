"""Matrix products into preallocated outputs, from whichever BLAS is fastest for the dtype here.

16-bit products go through torch (oneDNN: AVX512-BF16/AMX kernels on CPU, cuBLAS on CUDA). For float32 on the
CPU, numpy's OpenBLAS can be much faster than torch's own path: on the AMD EPYC development machines torch
reached 0.10-0.16 TFLOPS in fp32 and numpy 0.24 TFLOPS (0.42-0.46 with the environment's
``OPENBLAS_CORETYPE=Haswell`` override unset; anetrain leaves your environment alone). Both write into the
given output (numpy views of the same memory), so nothing is allocated.

OpenBLAS and torch's OpenMP threads each spin-wait after their work; interleaved on the same cores they starve
each other. A pipeline that uses the numpy path therefore runs torch's own (elementwise, memory-bound) work
with one intra-op thread, see :func:`blas_threads`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch

MatMul = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


def torch_matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """out = a @ b (2-D or batched 3-D) with torch."""
    if a.dim() == 2:
        torch.mm(a, b, out=out)
    else:
        torch.bmm(a, b, out=out)


def numpy_matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """out = a @ b with numpy's BLAS on the tensors' own memory (CPU, float32; ``out`` contiguous)."""
    np.matmul(a.numpy(), b.numpy(), out=out.numpy())


def choose(dtype: torch.dtype, device: torch.device, prefer: str = "auto") -> tuple[str, MatMul]:
    """("torch" | "numpy", function) for products in ``dtype`` on ``device``."""
    if prefer == "numpy" or (prefer == "auto" and dtype == torch.float32 and device.type == "cpu"):
        if dtype != torch.float32 or device.type != "cpu":
            raise ValueError("the numpy BLAS path is for float32 on the CPU")
        return "numpy", numpy_matmul
    return "torch", torch_matmul


@contextmanager
def blas_threads(name: str) -> Iterator[None]:
    """While numpy's BLAS does the products, torch's own work runs on one thread (see the module doc)."""
    if name != "numpy":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
