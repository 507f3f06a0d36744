"""``--backend ane``: the ANE pipeline with its programs on the Neural Engine of this Mac.

The training step is :class:`~.pipeline.AneSimPipeline`'s; only the executor differs. An executor offers
``run(program, inputs) -> outputs`` (MIL input names to fp16 arrays, MIL output names to fp16 arrays):

:class:`AneRuntimeExecutor`
    a device in this process, each program compiled once (on first use), never more than the compile
    budget allows (:mod:`.budget`);
:class:`~.supervisor.WorkerExecutor`
    the device in a worker process that is replaced before the budget runs out: the default for training,
    so a long session never hits the ~119-compile leak and the user's process is never restarted.

Runtimes (:data:`RUNTIMES`): ``private`` (AppleNeuralEngine.framework's in-memory model, :mod:`.private`),
``coreml`` (Core ML with ``CPU_AND_NE``, :mod:`.coreml`; in-process, it has no leak) and ``sim`` (the
simulator behind the same machinery: runs anywhere, for tests and for checking this code path).
``$ANETRAIN_ANE_RUNTIME`` picks the runtime when the caller does not.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from ...data.compaction import VocabCompaction
from ...errors import AnetrainError, ConfigError
from ...params import ModelParams
from ..limits import check_program
from ..machine import ChipInfo, require_apple_silicon, resolve_chip, resolve_sim_chip
from ..pipeline import AneSimPipeline
from .budget import compile_budget, needs_fresh_process
from .device import Device, ExecutorStats, LoadedProgram

RUNTIMES = ("private", "coreml", "sim")
ENV_RUNTIME = "ANETRAIN_ANE_RUNTIME"


class AneRuntimeExecutor:
    """``run(program, inputs) -> outputs`` on a device in this process; each program compiled once."""

    def __init__(self, device: Device, *, budget: int | None = None) -> None:
        self.device = device
        self.name = f"ane/{device.name}"
        self.budget = compile_budget(budget)
        self.stats = ExecutorStats()
        self._loaded: dict[int, tuple[Any, LoadedProgram]] = {}  # id -> (program kept alive, loaded form)

    def load(self, program: Any) -> LoadedProgram:
        """The loaded form of ``program``, compiling it on first use."""
        key = id(program)
        if key not in self._loaded:
            check_program(program)  # over the chip's limits: refused before the device sees it
            if needs_fresh_process(self.device.compiles, self.budget):
                raise AnetrainError(
                    f"the compile budget of {self.budget} programs per process is used up (compiling "
                    f"{program.name}); more compiles would hit the Neural Engine's per-process leak. Run the "
                    "programs through a worker process (the default for training) or raise the budget"
                )
            t0 = time.perf_counter()
            loaded = self.device.load(program)
            self.stats.compile_s += time.perf_counter() - t0
            self.stats.compiles += 1
            self._loaded[key] = (program, loaded)
        return self._loaded[key][1]

    def run(self, program: Any, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        loaded = self.load(program)
        t0 = time.perf_counter()
        loaded.write(inputs)
        t1 = time.perf_counter()
        loaded.evaluate()
        t2 = time.perf_counter()
        out = loaded.read()
        t3 = time.perf_counter()
        self.stats.evals += 1
        self.stats.io_s += (t1 - t0) + (t3 - t2)
        self.stats.eval_s += t2 - t1
        return out

    def release(self, program: Any) -> None:
        entry = self._loaded.pop(id(program), None)
        if entry is not None:
            entry[1].release()

    def close(self) -> None:
        for _, loaded in self._loaded.values():
            loaded.release()
        self._loaded.clear()
        self.device.close()


def runtime_name(runtime: str | None) -> str:
    """The runtime to use: ``runtime``, else ``$ANETRAIN_ANE_RUNTIME``, else ``private``."""
    name = runtime or os.environ.get(ENV_RUNTIME) or "private"
    if name not in RUNTIMES:
        raise ConfigError(f"unknown ANE runtime {name!r} (known: {', '.join(RUNTIMES)})")
    return name


def make_device(runtime: str, **options: Any) -> Device:
    """A device in this process: ``private`` and ``coreml`` need macOS; ``sim`` takes SimDevice options."""
    if runtime == "private":
        require_apple_silicon("the Neural Engine runtime (--backend ane)")
        from .private import PrivateAneDevice

        return PrivateAneDevice()
    if runtime == "coreml":
        from .coreml import CoreMLDevice

        return CoreMLDevice(**options)
    if runtime == "sim":
        from .device import SimDevice

        return SimDevice(**options)
    raise ConfigError(f"unknown ANE runtime {runtime!r} (known: {', '.join(RUNTIMES)})")


def make_executor(
    runtime: str | None = None,
    *,
    isolate: bool | None = None,
    budget: int | None = None,
    options: dict[str, Any] | None = None,
) -> Any:
    """An executor for ``runtime``. ``isolate`` (default: True for ``private``) runs the device in a worker
    process restarted within the compile budget; Core ML always runs in this process."""
    name = runtime_name(runtime)
    if name == "private":
        require_apple_silicon("the Neural Engine runtime (--backend ane)")
    if isolate is None:
        isolate = name == "private"
    if isolate and name != "coreml":
        from .supervisor import WorkerExecutor

        return WorkerExecutor(name, options=options, budget=budget)
    return AneRuntimeExecutor(make_device(name, **(options or {})), budget=budget)


def resolve_runtime_chip(chip: str, runtime: str) -> ChipInfo:
    """The chip whose dialect the programs use. On the hardware ``auto`` means this Mac's chip; the
    simulator has none, so ``auto`` means this Mac's chip on a Mac and m4 elsewhere
    (:func:`~.machine.resolve_sim_chip`)."""
    if runtime == "sim":
        return ChipInfo(resolve_sim_chip(chip)[0])
    require_apple_silicon("the Neural Engine runtime (--backend ane)")
    return resolve_chip(chip)


class AneRuntimePipeline(AneSimPipeline):
    """The ANE pipeline with a hardware executor: ``--backend ane``."""

    name = "ane"
    backend = "ane"


def make_runtime_pipeline(
    params: ModelParams,
    *,
    chip: str = "auto",
    programs: str = "original",
    inputs: str = "packed",
    compaction: VocabCompaction | None = None,
    loss_chunk: int | None = None,
    runtime: str | None = None,
    isolate: bool | None = None,
    budget: int | None = None,
    executor: Any = None,
    seq: int | None = None,
) -> AneRuntimePipeline:
    """The ANE pipeline on this Mac's Neural Engine (what ``--backend ane`` builds).

    ``chip`` picks the MIL dialect (``auto``: detect it); ``runtime`` is ``private`` (default, or
    ``$ANETRAIN_ANE_RUNTIME``), ``coreml`` or ``sim``; ``isolate``/``budget`` as in :func:`make_executor`;
    an explicit ``executor`` replaces all of that. Raises a one-line :class:`AnetrainError` on any machine
    that cannot run it (not macOS, not Apple silicon, the framework or one of its classes missing).
    """
    name = runtime_name(runtime)
    info = resolve_runtime_chip(chip, name)
    if executor is None:
        executor = make_executor(name, isolate=isolate, budget=budget)
    try:
        return AneRuntimePipeline(
            params,
            chip=info.chip,
            programs=programs,
            inputs=inputs,
            executor=executor,
            compaction=compaction,
            loss_chunk=loss_chunk,
            seq=seq,
            chip_note=f"auto: {info.brand or 'detected'}" if chip.lower() == "auto" else "given",
        )
    except BaseException:
        close = getattr(executor, "close", None)
        if close is not None:
            close()
        raise
