"""Matrix products into preallocated outputs, from whichever BLAS is fastest for the dtype here.

16-bit products go through torch (oneDNN: AVX512-BF16/AMX kernels on CPU, cuBLAS on CUDA). For float32 on the
CPU, torch's own path (MKL, which runs generic code on AMD CPUs) is the slowest choice: on the AMD EPYC
development machine torch reached 0.15-0.20 TFLOPS, numpy's OpenBLAS 0.23 (0.42-0.46 with the
environment's ``OPENBLAS_CORETYPE=Haswell`` override unset; anetrain leaves your environment alone) and
oneDNN's fp32 kernels 0.38-0.45 TFLOPS. oneDNN is reached through torch's ``mkldnn::_linear_pointwise``,
which returns a new tensor: the "onednn" path copies it into the given output, so float32 products allocate
their results (from the heap, reused step after step); the 16-bit and numpy paths write into the given output
and allocate nothing.

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


#: largest result (bytes) one oneDNN call returns; bigger products are formed in column blocks, so every
#: result stays under glibc's mmap threshold and reuses heap memory instead of fresh pages each call
ONEDNN_MAX_RESULT = 8 << 20


def onednn_matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """out = a @ b for float32 on the CPU through oneDNN (2-D; batched products go to torch).

    oneDNN is fast on row-major inputs and on a weight that is row-major or a whole transposed matrix; it is
    ~3x slower on a transposed input and orders of magnitude slower on a slice of a transposed weight
    (measured with torch 2.13). So a transposed ``a`` is copied first, and big results are formed in blocks
    of output columns (row-major weight) or of rows (transposed weight, passed whole)."""
    if a.dim() != 2:
        torch_matmul(a, b, out)
        return
    if a.stride(-1) != 1:
        a = a.contiguous()
    w = b.t()  # linear(a, w) = a @ w^T = a @ b
    m, n = a.shape[0], w.shape[0]
    if w.stride(-1) == 1:
        step = max(1, min(n, ONEDNN_MAX_RESULT // (4 * m)))
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            out[:, lo:hi].copy_(torch.ops.mkldnn._linear_pointwise(a, w[lo:hi], None, "none", [], ""))
    else:
        step = max(1, min(m, ONEDNN_MAX_RESULT // (4 * n)))
        for lo in range(0, m, step):
            hi = min(m, lo + step)
            out[lo:hi].copy_(torch.ops.mkldnn._linear_pointwise(a[lo:hi], w, None, "none", [], ""))


def onednn_available() -> bool:
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def choose(dtype: torch.dtype, device: torch.device, prefer: str = "auto") -> tuple[str, MatMul]:
    """("torch" | "numpy" | "onednn", function) for products in ``dtype`` on ``device``. "auto": oneDNN for
    float32 on the CPU where torch has it, else numpy; torch for everything else."""
    fp32_cpu = dtype == torch.float32 and device.type == "cpu"
    if prefer in ("numpy", "onednn") and not fp32_cpu:
        raise ValueError(f"the {prefer} BLAS path is for float32 on the CPU")
    if prefer == "onednn" or (prefer == "auto" and fp32_cpu and onednn_available()):
        return "onednn", onednn_matmul
    if prefer == "numpy" or (prefer == "auto" and fp32_cpu):
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
