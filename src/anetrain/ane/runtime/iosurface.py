"""Surfaces the runtime fills and reads: IOSurfaces on a Mac, plain host memory for tests and the simulator.

An ANE request reads its inputs from and writes its outputs to IOSurfaces. Each one is a flat byte buffer
(docs/ane.md, appendix A.2): width = bytes, height 1, one byte per element, pixel format 0, created with
``IOSurfaceCreate`` from a properties dictionary (:func:`surface_properties`). The CPU touches it only
between ``IOSurfaceLock`` and ``IOSurfaceUnlock``, at ``IOSurfaceGetBaseAddress``.

A tensor ``[1, C, 1, W]`` sits at the start of its surface, fp16, row-major (element (c, w) at byte
``2 (c W + w)``); all input surfaces of one program share one allocation size, as do all outputs, and
they bind in alphabetical order of the MIL names (:mod:`.surfaces`). :func:`fill_inputs` writes a
program's inputs into its surfaces in that order; :func:`.surfaces.read_outputs` reads the outputs.

:class:`SurfaceMemory` holds the one copy routine both kinds share, so the bytes a test sees in a
:class:`HostSurface` are the bytes an :class:`IOSurface` would hold.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from ctypes import POINTER, c_int, c_size_t, c_uint32, c_void_p
from typing import Any

import numpy as np

from ...errors import AnetrainError
from ..surfaces import binding_order
from .objc import ObjCRuntime, load_library

IOSURFACE_FRAMEWORK = "/System/Library/Frameworks/IOSurface.framework/IOSurface"
COREFOUNDATION = "/System/Library/Frameworks/CoreFoundation.framework/CoreFoundation"
LOCK_READ_ONLY = 0x1  # kIOSurfaceLockReadOnly
PROPERTY_KEYS = (
    "kIOSurfaceWidth",
    "kIOSurfaceHeight",
    "kIOSurfaceBytesPerElement",
    "kIOSurfaceBytesPerRow",
    "kIOSurfaceAllocSize",
    "kIOSurfacePixelFormat",
)


def surface_properties(nbytes: int) -> dict[str, int]:
    """The IOSurfaceCreate properties of an ``nbytes`` ANE surface: one row of ``nbytes`` 1-byte pixels."""
    if nbytes <= 0:
        raise ValueError(f"a surface needs a positive size, got {nbytes}")
    return {
        "kIOSurfaceWidth": nbytes,
        "kIOSurfaceHeight": 1,
        "kIOSurfaceBytesPerElement": 1,
        "kIOSurfaceBytesPerRow": nbytes,
        "kIOSurfaceAllocSize": nbytes,
        "kIOSurfacePixelFormat": 0,
    }


class SurfaceMemory:
    """``alloc`` bytes the CPU can map; tensors are written to and read from the start."""

    alloc: int

    @contextmanager
    def mapped(self, read_only: bool) -> Iterator[int]:
        """The base address while the memory is accessible to the CPU."""
        raise NotImplementedError
        yield 0  # pragma: no cover

    def write(self, values: np.ndarray) -> None:
        """Store ``values`` as fp16, row-major, at the start of the surface."""
        a = np.ascontiguousarray(values, dtype="<f2")
        if a.nbytes > self.alloc:
            raise ValueError(f"{a.nbytes} bytes do not fit a {self.alloc}-byte surface")
        with self.mapped(read_only=False) as addr:
            ctypes.memmove(addr, a.ctypes.data, a.nbytes)

    def read(self, shape: tuple[int, ...]) -> np.ndarray:
        """The fp16 tensor of ``shape`` at the start of the surface (a copy)."""
        out = np.empty(shape, dtype="<f2")
        if out.nbytes > self.alloc:
            raise ValueError(f"a {list(shape)} fp16 tensor does not fit a {self.alloc}-byte surface")
        with self.mapped(read_only=True) as addr:
            ctypes.memmove(out.ctypes.data, addr, out.nbytes)
        return out.astype(np.float16, copy=False)

    def contents(self) -> bytes:
        """Every byte of the surface (for tests and debugging)."""
        with self.mapped(read_only=True) as addr:
            return ctypes.string_at(addr, self.alloc)


class HostSurface(SurfaceMemory):
    """Plain process memory with the surface interface: the simulator device and the tests use it."""

    def __init__(self, alloc: int) -> None:
        self.alloc = int(alloc)
        self._buf = (ctypes.c_char * self.alloc)()

    @contextmanager
    def mapped(self, read_only: bool) -> Iterator[int]:
        yield ctypes.addressof(self._buf)

    def close(self) -> None:
        pass


class IOSurfaceApi:
    """IOSurface.framework's C API (and CFRelease), loaded and typed."""

    def __init__(self, rt: ObjCRuntime) -> None:
        self.rt = rt
        lib = self.lib = load_library(IOSURFACE_FRAMEWORK, "IOSurface.framework")
        cf = self.cf = load_library(COREFOUNDATION, "CoreFoundation")
        lib.IOSurfaceCreate.restype, lib.IOSurfaceCreate.argtypes = c_void_p, [c_void_p]
        lib.IOSurfaceLock.restype, lib.IOSurfaceLock.argtypes = c_int, [c_void_p, c_uint32, POINTER(c_uint32)]
        lib.IOSurfaceUnlock.restype = c_int
        lib.IOSurfaceUnlock.argtypes = [c_void_p, c_uint32, POINTER(c_uint32)]
        lib.IOSurfaceGetBaseAddress.restype, lib.IOSurfaceGetBaseAddress.argtypes = c_void_p, [c_void_p]
        lib.IOSurfaceGetAllocSize.restype, lib.IOSurfaceGetAllocSize.argtypes = c_size_t, [c_void_p]
        cf.CFRelease.restype, cf.CFRelease.argtypes = None, [c_void_p]
        self.keys: dict[str, int] = {}
        for name in PROPERTY_KEYS:
            try:
                self.keys[name] = c_void_p.in_dll(lib, name).value or 0
            except ValueError:
                self.keys[name] = 0
            if not self.keys[name]:
                raise AnetrainError(f"IOSurface.framework does not export {name} on this macOS version")

    def create(self, nbytes: int) -> IOSurface:
        """A new ``nbytes`` surface (released by :meth:`IOSurface.close`)."""
        rt = self.rt
        with rt.pool():
            props = rt.nsdict({self.keys[k]: rt.nsnumber(v) for k, v in surface_properties(nbytes).items()})
            ref = self.lib.IOSurfaceCreate(props)
        if not ref:
            raise AnetrainError(f"IOSurfaceCreate failed for a {nbytes}-byte surface")
        size = self.lib.IOSurfaceGetAllocSize(ref)
        if size < nbytes:
            self.cf.CFRelease(ref)
            raise AnetrainError(f"IOSurfaceCreate gave {size} bytes where {nbytes} were asked for")
        return IOSurface(self, ref, nbytes)


class IOSurface(SurfaceMemory):
    """An IOSurfaceRef; reads and writes hold its lock."""

    def __init__(self, api: IOSurfaceApi, ref: int, alloc: int) -> None:
        self.api = api
        self.ref = ref
        self.alloc = int(alloc)

    @contextmanager
    def mapped(self, read_only: bool) -> Iterator[int]:
        opts = LOCK_READ_ONLY if read_only else 0
        rc = self.api.lib.IOSurfaceLock(self.ref, opts, None)
        if rc != 0:
            raise AnetrainError(f"IOSurfaceLock failed (kern_return 0x{rc & 0xFFFFFFFF:x})")
        try:
            addr = self.api.lib.IOSurfaceGetBaseAddress(self.ref)
            if not addr:
                raise AnetrainError("IOSurfaceGetBaseAddress returned NULL")
            yield addr
        finally:
            self.api.lib.IOSurfaceUnlock(self.ref, opts, None)

    def close(self) -> None:
        if self.ref:
            self.api.cf.CFRelease(self.ref)
            self.ref = 0


def fill_inputs(program: Any, arrays: Mapping[str, np.ndarray], surfaces: list[Any]) -> None:
    """Write each MIL input's values into its surface; ``surfaces`` are in binding (alphabetical) order."""
    specs = binding_order(program.inputs)
    if len(specs) != len(surfaces):
        raise ValueError(f"program {program.name}: {len(surfaces)} surfaces for {len(specs)} inputs")
    missing = [t.name for t in specs if t.name not in arrays]
    if missing:
        raise ValueError(f"program {program.name}: no data for input(s) {', '.join(missing)}")
    for t, s in zip(specs, surfaces, strict=True):
        a = np.asarray(arrays[t.name])
        if a.size != math.prod(t.shape):
            raise ValueError(
                f"program {program.name}: input {t.name} needs shape {list(t.shape)}, got {list(a.shape)}"
            )
        s.write(a)
