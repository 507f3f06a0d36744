"""Devices: what compiles a program once and then evaluates it on input surfaces, again and again.

A device's :meth:`~Device.load` compiles and loads one program and returns a :class:`LoadedProgram`:
``write(inputs)`` fills its input surfaces, ``evaluate()`` runs one request, ``read()`` returns the outputs,
``release()`` unloads it. Splitting run into these three lets the peak probe time ``evaluate`` alone and the
runtime account copies (IO) apart from compute.

Devices here and elsewhere:

``SimDevice`` (this module)
    the simulator behind the device interface: how the runtime's own machinery (executors, the worker
    process and its restarts) is tested on any machine. It can emulate faults: the ~119-compile leak
    (``leak_limit``), a crashing or a hanging evaluation.
``PrivateAneDevice`` (:mod:`.private`)
    the Neural Engine through ``_ANEInMemoryModel`` (macOS on Apple silicon).
``CoreMLDevice`` (:mod:`.coreml`)
    Core ML's public API with ``CPU_AND_NE`` (macOS).

:class:`ProgramSpec` is everything a device needs from a program without its builder graph, so it can be
sent to a worker process.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ...errors import AnetrainError
from ..dialect import Dialect, dialect_for
from ..sim import SimProgram
from ..surfaces import SurfaceSizes, TensorSpec, binding_order, read_outputs
from .iosurface import HostSurface, fill_inputs


class AneRuntimeError(AnetrainError):
    """A program the device would not compile or a request it would not evaluate; ``status`` when known."""

    def __init__(self, message: str, status: int | None = None) -> None:
        self.status = status
        super().__init__(message)


@dataclass
class ProgramSpec(SurfaceSizes):
    """A program as a device sees it: MIL text, weight blobs, and the tensors in binding order."""

    name: str
    chip: str
    mil_text: str
    weights: dict[str, bytes]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    @classmethod
    def of(cls, program: Any) -> ProgramSpec:
        """The spec of an :class:`~.program.AneProgram` (or anything with the same attributes)."""
        return cls(
            program.name,
            program.chip,
            program.mil_text,
            dict(program.weights),
            binding_order(list(program.inputs)),
            binding_order(list(program.outputs)),
        )

    @property
    def dialect(self) -> Dialect:
        return dialect_for(self.chip)


class LoadedProgram(Protocol):
    """One compiled and loaded program with its surfaces."""

    def write(self, inputs: Mapping[str, np.ndarray]) -> None: ...

    def evaluate(self) -> None: ...

    def read(self) -> dict[str, np.ndarray]: ...

    def release(self) -> None: ...


class Device(Protocol):
    """Compiles programs. ``compiles`` counts successful compile+load pairs in this process (the number the
    ~119-per-process leak of ``_ANEInMemoryModel`` is about)."""

    name: str

    @property
    def compiles(self) -> int: ...

    def load(self, program: Any) -> LoadedProgram: ...

    def close(self) -> None: ...


class SurfaceProgram:
    """The host side shared by devices that bind surfaces: one allocation size per side, binding order."""

    def __init__(self, program: Any, make_surface: Any) -> None:
        self.program = program
        self.inputs = [make_surface(program.input_alloc_bytes) for _ in program.inputs]
        self.outputs = [make_surface(program.output_alloc_bytes) for _ in program.outputs]

    def write(self, inputs: Mapping[str, np.ndarray]) -> None:
        fill_inputs(self.program, inputs, self.inputs)

    def read(self) -> dict[str, np.ndarray]:
        return read_outputs(self.program, self.outputs)

    def close_surfaces(self) -> None:
        for s in self.inputs + self.outputs:
            s.close()
        self.inputs, self.outputs = [], []


class _SimLoaded(SurfaceProgram):
    def __init__(self, device: SimDevice, program: Any, sim: SimProgram) -> None:
        super().__init__(program, HostSurface)
        self.device = device
        self.sim = sim

    def evaluate(self) -> None:
        self.device._before_eval(self.program.name)
        self.sim.evaluate(self.inputs, self.outputs)

    def release(self) -> None:
        self.close_surfaces()


class SimDevice:
    """The simulator as a device, with optional fault emulation for tests of the runtime's machinery.

    ``leak_limit``: compile number ``leak_limit + 1`` fails, as ``_ANEInMemoryModel`` does after ~119
    compiles in one process. ``crash_on``: evaluating the program of that name ends the process at once
    (exit status 70), as a crash in the framework would. ``hang_on``: evaluating it never returns. The
    last two are only for a device inside a worker process.
    """

    name = "sim"

    def __init__(
        self,
        *,
        leak_limit: int | None = None,
        crash_on: str | None = None,
        hang_on: str | None = None,
        strict_matmul: bool = True,
    ) -> None:
        self.leak_limit = leak_limit
        self.crash_on = crash_on
        self.hang_on = hang_on
        self.strict_matmul = strict_matmul
        self._compiles = 0

    @property
    def compiles(self) -> int:
        return self._compiles

    def load(self, program: Any) -> _SimLoaded:
        if self.leak_limit is not None and self._compiles >= self.leak_limit:
            raise AneRuntimeError(
                f"compile of {program.name} failed: simulated compile leak (this process already compiled "
                f"{self._compiles} programs; the limit is {self.leak_limit})"
            )
        sim = SimProgram(
            program.mil_text,
            program.weights,
            program.chip,
            strict_matmul=self.strict_matmul,
            source=program.name,
        )
        self._compiles += 1
        return _SimLoaded(self, program, sim)

    def _before_eval(self, name: str) -> None:
        if name == self.crash_on:
            os._exit(70)
        if name == self.hang_on:
            while True:
                time.sleep(3600)

    def close(self) -> None:
        pass


@dataclass
class ExecutorStats:
    """What an executor has done: compiles (and worker restarts), evaluations, and where the time went.

    ``io_s`` is host-side copying (into and out of surfaces, and across the worker boundary), ``eval_s`` the
    device's evaluations, ``compile_s`` compiling and loading (and starting worker processes).
    """

    compiles: int = 0
    restarts: int = 0
    evals: int = 0
    compile_s: float = 0.0
    io_s: float = 0.0
    eval_s: float = 0.0

    def copy(self) -> ExecutorStats:
        return ExecutorStats(**vars(self))

    def since(self, before: ExecutorStats) -> ExecutorStats:
        """The difference from an earlier snapshot."""
        return ExecutorStats(**{k: v - getattr(before, k) for k, v in vars(self).items()})
