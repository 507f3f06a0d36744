"""ANE work in a worker process that is replaced before the compile leak bites: :class:`WorkerExecutor`.

The executor offers the simulator's seam, ``run(program, inputs) -> outputs``, and does the work in a child
process (``python -m anetrain.ane.runtime.worker``, :mod:`.worker`) that owns the device. It counts the
worker's compiles (the worker reports them); when one more compile would exceed the budget
(:mod:`.budget`, default 100, below the ~119 where ``_ANEInMemoryModel`` fails) it asks the worker to quit,
starts a fresh one, and recompiles programs as they are used again. The user's process is never
``exec()``-ed and its state never leaves memory.

Failures are errors, not hangs: every exchange has a deadline (start, compile, evaluation); a worker that
dies (a crash in the framework) or stops answering is reported in one line naming the program, with the
last line the worker logged, and the next call starts a new worker.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import anetrain

from ...errors import AnetrainError
from ..limits import check_program
from .budget import compile_budget, needs_fresh_process
from .device import AneRuntimeError, ExecutorStats, ProgramSpec
from .ipc import Channel, IoArea, IoLayout, PeerTimeout


@dataclass
class _Registered:
    """A program this executor has seen: kept alive (its id is the key), with its shared tensor area."""

    id: int
    program: Any
    spec: ProgramSpec
    area: IoArea


class _WorkerState:
    """The live worker (process, channel); separate from the executor so a finalizer can stop it."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.proc: subprocess.Popen[bytes] | None = None
        self.chan: Channel | None = None
        self.log_path: str | None = None

    def kill(self) -> None:
        if self.chan is not None:
            self.chan.close()
            self.chan = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
            self.proc = None

    def cleanup(self) -> None:
        self.kill()
        shutil.rmtree(self.directory, ignore_errors=True)


def _last_line(path: str | None) -> str:
    if not path:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def _exit_description(rc: int | None) -> str:
    if rc is None:
        return "stopped answering"
    if rc < 0:
        try:
            return f"was killed by signal {signal.Signals(-rc).name}"
        except ValueError:
            return f"was killed by signal {-rc}"
    return f"exited with status {rc}"


class WorkerExecutor:
    """``run(program, inputs) -> outputs`` with the device in a worker process, restarted within budget.

    ``backend`` is ``private`` (the Neural Engine) or ``sim`` (the simulator: tests, and runs of this
    machinery anywhere); ``options`` go to the simulator device (fault emulation, see
    :class:`.device.SimDevice`). ``budget`` is the most compiles one worker may do.
    """

    def __init__(
        self,
        backend: str = "private",
        *,
        options: dict[str, Any] | None = None,
        budget: int | None = None,
        start_timeout_s: float = 60.0,
        compile_timeout_s: float = 600.0,
        eval_timeout_s: float = 120.0,
        python: str | None = None,
    ) -> None:
        self.backend = backend
        self.name = f"ane-worker/{backend}"
        self.options = dict(options or {})
        self.budget = compile_budget(budget)
        self.start_timeout_s = start_timeout_s
        self.compile_timeout_s = compile_timeout_s
        self.eval_timeout_s = eval_timeout_s
        self.python = python or sys.executable
        self.stats = ExecutorStats()
        self.worker_pid: int | None = None
        self._state = _WorkerState(tempfile.mkdtemp(prefix="anetrain-ane-"))
        self._finalizer = weakref.finalize(self, self._state.cleanup)
        self._programs: dict[int, _Registered] = {}
        self._loaded: set[int] = set()  # ids loaded in the current worker
        self._worker_compiles = 0
        self._workers_started = 0

    # ---- the seam --------------------------------------------------------------------------------
    def load(self, program: Any) -> None:
        """Compile ``program`` in the worker now (a training run's warm-up does this for every program)."""
        self._ensure_loaded(self._register(program))

    def run(self, program: Any, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        reg = self._register(program)
        self._ensure_loaded(reg)
        t0 = time.perf_counter()
        reg.area.write_inputs(inputs, reg.spec.name)
        t1 = time.perf_counter()
        reply = self._call({"op": "run", "id": reg.id}, b"", self.eval_timeout_s, f"running {reg.spec.name}")
        t2 = time.perf_counter()
        out = reg.area.read_outputs()
        t3 = time.perf_counter()
        self.stats.evals += 1
        self.stats.io_s += (t1 - t0) + (t3 - t2) + float(reply.get("io_ms", 0.0)) / 1e3
        self.stats.eval_s += float(reply.get("eval_ms", 0.0)) / 1e3
        return out

    def close(self) -> None:
        """Stop the worker and remove the shared areas."""
        self._stop()
        for reg in self._programs.values():
            reg.area.close()
        self._programs.clear()
        self._finalizer()

    @property
    def worker_compiles(self) -> int:
        """Compiles done by the current worker (0 when none is running)."""
        return self._worker_compiles

    # ---- programs --------------------------------------------------------------------------------
    def _register(self, program: Any) -> _Registered:
        reg = self._programs.get(id(program))
        if reg is None:
            check_program(program)  # over the chip's limits: refused before the worker sees it
            spec = ProgramSpec.of(program)
            pid = len(self._programs)
            layout = IoLayout.of(spec.inputs, spec.outputs)
            area = IoArea(os.path.join(self._state.directory, f"p{pid}.io"), layout, create=True)
            reg = self._programs[id(program)] = _Registered(pid, program, spec, area)
        return reg

    def _ensure_loaded(self, reg: _Registered) -> None:
        if self._state.chan is None:
            self._start()
        if reg.id in self._loaded:
            return
        if needs_fresh_process(self._worker_compiles, self.budget):
            self._stop()
            self.stats.restarts += 1
            self._start()
        spec = reg.spec
        mil = spec.mil_text.encode("utf-8")
        msg = {
            "op": "load",
            "id": reg.id,
            "name": spec.name,
            "chip": spec.chip,
            "inputs": [[t.name, list(t.shape)] for t in spec.inputs],
            "outputs": [[t.name, list(t.shape)] for t in spec.outputs],
            "weights": [[path, len(data)] for path, data in spec.weights.items()],
            "mil_bytes": len(mil),
            "io": reg.area.path,
            "layout": reg.area.layout.to_json(),
        }
        payload = b"".join([mil, *spec.weights.values()])
        t0 = time.perf_counter()
        reply = self._call(msg, payload, self.compile_timeout_s, f"compiling {spec.name}")
        self.stats.compile_s += time.perf_counter() - t0
        self.stats.compiles += 1
        self._worker_compiles = int(reply.get("compiles", self._worker_compiles + 1))
        self._loaded.add(reg.id)

    # ---- the worker process ----------------------------------------------------------------------
    def _start(self) -> None:
        t0 = time.perf_counter()
        st = self._state
        self._workers_started += 1
        st.log_path = os.path.join(st.directory, f"worker-{self._workers_started}.log")
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        env = dict(os.environ)
        root = str(Path(anetrain.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        try:
            with open(st.log_path, "ab") as log:
                st.proc = subprocess.Popen(
                    [self.python, "-m", "anetrain.ane.runtime.worker", str(to_child_r), str(from_child_w)],
                    pass_fds=(to_child_r, from_child_w),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    env=env,
                )
        except OSError as e:
            for fd in (to_child_r, to_child_w, from_child_r, from_child_w):
                os.close(fd)
            raise AnetrainError(f"cannot start the ANE worker process ({e})") from None
        os.close(to_child_r)
        os.close(from_child_w)
        st.chan = Channel(from_child_r, to_child_w)
        self.worker_pid = st.proc.pid
        self._loaded = set()
        self._worker_compiles = 0
        hello = {"op": "hello", "backend": self.backend, "options": self.options}
        self._call(hello, b"", self.start_timeout_s, "starting")
        self.stats.compile_s += (
            time.perf_counter() - t0
        )  # starting a worker is part of getting programs ready

    def _stop(self) -> None:
        """Ask the worker to quit (it releases its programs), then make sure it is gone."""
        st = self._state
        if st.chan is not None and st.proc is not None and st.proc.poll() is None:
            with contextlib.suppress(AnetrainError, EOFError, OSError):
                deadline = time.monotonic() + 10.0
                st.chan.send({"op": "quit"}, b"", deadline)
                st.chan.recv(deadline)
            with contextlib.suppress(subprocess.TimeoutExpired):
                st.proc.wait(timeout=10)
        st.kill()
        self._loaded = set()
        self._worker_compiles = 0
        self.worker_pid = None

    def _call(self, msg: dict[str, Any], payload: bytes, timeout: float, what: str) -> dict[str, Any]:
        st = self._state
        assert st.chan is not None and st.proc is not None
        pid = st.proc.pid
        deadline = time.monotonic() + timeout
        try:
            st.chan.send(msg, payload, deadline)
            reply, _ = st.chan.recv(deadline)
        except PeerTimeout:
            self._stop_after_failure()
            raise AnetrainError(
                f"the ANE worker process (pid {pid}) did not answer within {timeout:g} s while {what}; "
                "it was stopped"
            ) from None
        except EOFError:
            rc = None
            with contextlib.suppress(subprocess.TimeoutExpired):
                rc = st.proc.wait(timeout=10)
            last = _last_line(st.log_path)
            self._stop_after_failure()
            raise AnetrainError(
                f"the ANE worker process (pid {pid}) {_exit_description(rc)} while {what}"
                + (f"; its last output: {last}" if last else "")
            ) from None
        if not reply.get("ok"):
            status = reply.get("status")
            if msg.get("op") == "hello":
                self._stop_after_failure()
            raise AneRuntimeError(
                str(reply.get("error") or "unknown error"), status if isinstance(status, int) else None
            )
        return reply

    def _stop_after_failure(self) -> None:
        self._state.kill()
        self._loaded = set()
        self._worker_compiles = 0
        self.worker_pid = None
