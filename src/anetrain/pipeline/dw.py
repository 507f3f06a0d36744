"""Executors for the weight-gradient GEMMs: run now (serial) or on a worker thread, concurrently with dx.

A pipeline hands each dW GEMM to an executor as soon as its operands exist; ``wait()`` returns once all of
them have run (before the optimizer reads the gradients, or before a buffer they read is overwritten).
Each job writes its own gradient tensor, so jobs never race with each other; they only read activations.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import torch


class SerialDW:
    """Runs each job immediately on the calling thread."""

    name = "serial"

    def __init__(self) -> None:
        self.busy_ms = 0.0

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        t0 = time.perf_counter()
        fn(*args)
        self.busy_ms += (time.perf_counter() - t0) * 1e3

    def wait(self) -> float:
        """Block until every submitted job has run; returns the ms spent waiting (always 0 here)."""
        return 0.0

    def close(self) -> None:
        pass


class ThreadDW:
    """Runs jobs in submission order on one worker thread with its own intra-op thread budget.

    torch's intra-op thread count is process-wide on CPU, so the budget is split by running the worker's
    GEMMs while the main thread keeps its own work small; on CUDA the worker issues onto a side stream.
    """

    name = "thread"

    def __init__(self, stream: Any = None) -> None:
        self._q: queue.Queue[tuple[Callable[..., Any], tuple[Any, ...]] | None] = queue.Queue()
        self._pending = 0
        self._cv = threading.Condition()
        self._error: BaseException | None = None
        self.busy_ms = 0.0
        self._stream = stream
        self._thread = threading.Thread(target=self._run, name="anetrain-dw", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            fn, args = item
            t0 = time.perf_counter()
            try:
                if self._stream is not None:
                    with torch.cuda.stream(self._stream):
                        fn(*args)
                else:
                    fn(*args)
            except BaseException as e:  # surfaced to the main thread at wait()
                self._error = e
            self.busy_ms += (time.perf_counter() - t0) * 1e3
            with self._cv:
                self._pending -= 1
                self._cv.notify_all()

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        with self._cv:
            self._pending += 1
        self._q.put((fn, args))

    def wait(self) -> float:
        t0 = time.perf_counter()
        with self._cv:
            while self._pending:
                self._cv.wait()
        if self._stream is not None:
            torch.cuda.current_stream().wait_stream(self._stream)
        if self._error is not None:
            err, self._error = self._error, None
            raise err
        return (time.perf_counter() - t0) * 1e3

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=5)
