"""The device's peak matrix-multiply throughput, measured once by a short GEMM probe and cached.

Utilization in the Efficiency Report is model TFLOPS divided by this number. The probe times square GEMMs
in the training precision for about a second and keeps the best rate; the result is cached per machine
(CPU model or GPU name, core count, torch version, dtype) in ``~/.cache/anetrain/peak.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..fsutil import atomic_write_text


def cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "anetrain" / "peak.json"


def machine_key(device: torch.device, dtype: torch.dtype) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_name()
    blas = "onednn+" + os.environ.get("OPENBLAS_CORETYPE", "") if dtype == torch.float32 else ""
    return f"{name}|{device.type}|threads={torch.get_num_threads()}|torch={torch.__version__}|{dtype}|{blas}"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _best_rate(matmul: Callable[[], object], n: int, seconds: float, sync: Callable[[], None]) -> float:
    best = 0.0
    for _ in range(2):
        matmul()  # warm-up
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        sync()
        t0 = time.perf_counter()
        matmul()
        sync()
        best = max(best, 2.0 * n**3 / (time.perf_counter() - t0) / 1e12)
    return best


def probe_peak_tflops(device: torch.device, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """The best square-GEMM rate in ``dtype``, through every BLAS anetrain uses for it (for float32 on the
    CPU that includes oneDNN and numpy's OpenBLAS, which the optimized pipeline uses: backends/gemm.py)."""
    n = 2048 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    best = _best_rate(lambda: a @ b, n, seconds, sync)
    if device.type == "cpu" and dtype == torch.float32:
        from ..backends.gemm import onednn_available, onednn_matmul

        an, bn = a.numpy(), b.numpy()
        best = max(best, _best_rate(lambda: an @ bn, n, seconds, sync))
        if onednn_available():
            out = torch.empty(n, n)
            best = max(best, _best_rate(lambda: onednn_matmul(a, b, out), n, seconds, sync))
    return best


def peak_tflops(device: torch.device, dtype: torch.dtype, *, refresh: bool = False) -> float:
    """Cached measured peak for (machine, dtype); probes on first use."""
    key = machine_key(device, dtype)
    path = cache_path()
    cache: dict[str, float] = {}
    try:
        cache = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        cache = {}
    if not isinstance(cache, dict):  # a damaged cache is measured again and rewritten, never an error
        cache = {}
    cached = cache.get(key)
    if not refresh and isinstance(cached, int | float) and not isinstance(cached, bool) and 0 < cached < 1e9:
        return float(cached)
    value = probe_peak_tflops(device, dtype)
    cache[key] = value
    with contextlib.suppress(Exception):  # a read-only home must not stop training
        atomic_write_text(path, json.dumps(cache, indent=1))
    return value
