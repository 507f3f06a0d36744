"""Executors for the weight-gradient GEMMs: run now, on a worker thread, on a second CUDA stream, or on
another device, concurrently with the dx kernels.

A pipeline hands each dW GEMM to an executor as soon as its operands exist; ``wait()`` returns once all of
them have run (before the optimizer reads the gradients, or before a buffer they read is overwritten), and
``flush(grads)`` moves any gradients accumulated elsewhere into the pipeline's gradients. Jobs run in
submission order, so two jobs that add into the same tensor (a tied embedding and classifier) never race.
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
        """Block until every submitted job has run; returns the ms spent waiting."""
        return 0.0

    def flush(self, grads: Any) -> None:
        pass

    def close(self) -> None:
        pass


class ThreadDW:
    """Runs jobs in submission order on one worker thread that uses ``threads`` intra-op threads.

    OpenMP's thread count is per calling thread, so the worker's GEMMs use ``threads`` cores while the main
    thread uses what it sets for itself (the optimized pipeline gives each half of the cores in the backward).
    """

    name = "thread"

    def __init__(self, threads: int | None = None) -> None:
        self._q: queue.Queue[tuple[Callable[..., Any], tuple[Any, ...]] | None] = queue.Queue()
        self._pending = 0
        self._cv = threading.Condition()
        self._error: BaseException | None = None
        self.busy_ms = 0.0
        self._threads = threads
        self._thread = threading.Thread(target=self._run, name="anetrain-dw", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        if self._threads:
            torch.set_num_threads(self._threads)
        while True:
            item = self._q.get()
            if item is None:
                return
            fn, args = item
            t0 = time.perf_counter()
            try:
                with torch.no_grad():
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
        if self._error is not None:
            err, self._error = self._error, None
            raise err
        return (time.perf_counter() - t0) * 1e3

    def flush(self, grads: Any) -> None:
        pass

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=5)


class StreamDW:
    """CUDA: issues each job on a second stream that first waits for the work submitted so far."""

    name = "stream"

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        self.busy_ms = 0.0  # host-side issue time; GPU time overlaps and is not measured here

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        t0 = time.perf_counter()
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            fn(*args)
        self.busy_ms += (time.perf_counter() - t0) * 1e3

    def wait(self) -> float:
        t0 = time.perf_counter()
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return (time.perf_counter() - t0) * 1e3

    def flush(self, grads: Any) -> None:
        pass

    def close(self) -> None:
        pass


class DeviceDW:
    """Runs dW on another device (as the original's Metal option): each job's tensor operands are copied
    to that device into staging buffers (one set per job slot, reused every step), its gradient accumulates
    in a remote fp32 accumulator, and :meth:`flush` adds the accumulators into the pipeline's gradients.

    Jobs have the form ``fn(grad, *operands)``.
    """

    name = "device"

    def __init__(self, device: torch.device, home: torch.device) -> None:
        self.device = device
        self.home = home
        self.inner: ThreadDW | StreamDW = ThreadDW() if device.type == "cpu" else StreamDW(device)
        self._acc: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(grad) -> (grad, remote accumulator)
        self._slots: list[list[torch.Tensor]] = []  # staging buffers per job slot
        self._slot = 0

    @property
    def busy_ms(self) -> float:
        return self.inner.busy_ms

    def _stage(self, operands: tuple[Any, ...]) -> list[Any]:
        if self._slot == len(self._slots):
            self._slots.append(
                [
                    torch.empty(t.shape, dtype=t.dtype, device=self.device)
                    if isinstance(t, torch.Tensor)
                    else t
                    for t in operands
                ]
            )
        bufs = self._slots[self._slot]
        self._slot += 1
        for b, t in zip(bufs, operands, strict=True):
            if isinstance(t, torch.Tensor):
                b.copy_(t, non_blocking=False)
        return [b if isinstance(t, torch.Tensor) else t for b, t in zip(bufs, operands, strict=True)]

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        grad, *operands = args
        acc = self._acc.get(id(grad))
        if acc is None:
            acc = (grad, torch.zeros(grad.shape, dtype=grad.dtype, device=self.device))
            self._acc[id(grad)] = acc
        self.inner.submit(fn, acc[1], *self._stage(tuple(operands)))

    def wait(self) -> float:
        ms = self.inner.wait()
        self._slot = 0
        return ms

    def flush(self, grads: Any) -> None:
        for grad, remote in self._acc.values():
            grad.add_(remote.to(self.home))
            remote.zero_()

    def close(self) -> None:
        self.inner.close()
