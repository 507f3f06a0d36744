"""Data-parallel training on torch.distributed: the process group, rank-0 duties and the gradient all-reduce.

``torchrun --nproc_per_node=N -m anetrain train ...`` starts N processes with RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT in their environment; :func:`init_world` reads them and joins the process group
(NCCL when the ranks train on CUDA devices, one device per local rank; gloo on CPUs). Without that
environment, or with a world of one, training runs as a single process and nothing here talks to anyone.

Every collective goes through :class:`World`, which turns the backend's failures (a peer that died, a peer
that stalled past ``--dist-timeout``) into one-line :class:`DistributedError` messages, so a job whose rank
died ends with exit status 2 instead of hanging or printing a C++ traceback.

:class:`GradSync` all-reduces the gradients: the pipelines announce each bucket of ``grads.buckets()`` (a
layer's matrices, last layer first, then the rest) as soon as the backward has finished it, and the sync
starts an asynchronous all-reduce of that bucket right away on the last micro-step of an accumulation window
(as DDP's ``no_sync`` does for the others), so communication overlaps the rest of the backward. The trainer
scales each rank's gradients by ``1 / (accum * world_size)``, so the all-reduced sum is the average.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .errors import AnetrainError
from .pipeline.base import Pipeline

T = TypeVar("T")

BACKENDS = ("auto", "gloo", "nccl")


class DistributedError(AnetrainError):
    """Another rank failed, died or stalled past the timeout, or the process group could not be formed."""


def launched_by_torchrun() -> bool:
    """True when this process was started by torchrun (or by hand with its environment)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _env_int(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None:
        if default is None:
            raise DistributedError(f"the environment variable {name} is not set (launch with torchrun)")
        return default
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"the environment variable {name}={raw!r} is not an integer") from None


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = lines[0] if lines else type(e).__name__
    if text.startswith("[") and "] " in text:  # gloo's "[.../pair.cc:553] " source location
        text = text.split("] ", 1)[1]
    return text if len(text) <= 240 else text[:237] + "..."


@dataclass
class World:
    """This process's place in the job. The default is a single process (no process group)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # "gloo" or "nccl" while a process group is up
    device: torch.device = field(
        default_factory=lambda: torch.device("cpu")
    )  # where collectives' tensors live
    timeout_s: float = 300.0

    @property
    def active(self) -> bool:
        """True when there are other ranks to talk to."""
        return self.world_size > 1 and self.backend is not None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes the run directory."""
        return self.rank == 0

    # ---- error handling --------------------------------------------------------------------------
    @contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Turn a backend failure during ``what`` into a one-line :class:`DistributedError`."""
        try:
            yield
        except AnetrainError:
            raise
        except (RuntimeError, dist.DistError) as e:  # gloo/NCCL failures are RuntimeErrors
            raise self.lost(what, e) from e

    def lost(self, what: str, e: BaseException) -> DistributedError:
        return DistributedError(
            f"rank {self.rank}/{self.world_size}: {what} failed: another rank has died or stalled for more "
            f"than --dist-timeout {self.timeout_s:g} s ({_first_line(e)})"
        )

    # ---- collectives (no-ops for a single process) ----------------------------------------------------
    def all_reduce_(self, t: torch.Tensor, what: str = "an all-reduce") -> torch.Tensor:
        """Sum ``t`` over the ranks, in place."""
        if self.active:
            with self.guard(what):
                dist.all_reduce(t)
        return t

    def broadcast_(self, t: torch.Tensor, what: str = "a broadcast") -> torch.Tensor:
        """Overwrite ``t`` with rank 0's ``t``."""
        if self.active:
            with self.guard(what):
                dist.broadcast(t, src=0)
        return t

    def barrier(self, what: str = "a barrier") -> None:
        if self.active:
            self.all_reduce_(torch.zeros(1, device=self.device), what)

    def sum_values(self, values: list[float], what: str = "an all-reduce") -> list[float]:
        """Element-wise sums of a few numbers over the ranks (float64)."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        return [float(x) for x in self.all_reduce_(t, what).cpu()]

    def broadcast_json(self, obj: Any, what: str = "a broadcast") -> Any:
        """Rank 0's ``obj`` (anything JSON can carry) on every rank; no pickling."""
        if not self.active:
            return obj
        data = json.dumps(obj).encode("utf-8") if self.is_main else b""
        size = self.broadcast_(torch.tensor([len(data)], dtype=torch.int64, device=self.device), what)
        buf = torch.zeros(int(size.item()), dtype=torch.uint8, device=self.device)
        if self.is_main:
            buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        self.broadcast_(buf, what)
        return json.loads(buf.cpu().numpy().tobytes().decode("utf-8"))

    def gather_json(self, obj: Any, what: str = "a gather") -> list[Any]:
        """Every rank's ``obj`` (JSON-serializable), in rank order, on every rank; no pickling."""
        if not self.active:
            return [obj]
        data = json.dumps(obj).encode("utf-8")
        sizes = torch.zeros(self.world_size, dtype=torch.int64, device=self.device)
        sizes[self.rank] = len(data)
        self.all_reduce_(sizes, what)
        width = int(sizes.max().item())
        buf = torch.zeros(self.world_size, width, dtype=torch.uint8, device=self.device)
        if data:
            buf[self.rank, : len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device)
        self.all_reduce_(buf, what)  # each row is non-zero on one rank only
        rows = buf.cpu()
        return [
            json.loads(rows[r, : int(sizes[r])].numpy().tobytes().decode("utf-8"))
            for r in range(self.world_size)
        ]

    # ---- agreement on failures -------------------------------------------------------------------------
    def from_main(self, fn: Callable[[], T], what: str) -> T:
        """Run ``fn`` on rank 0 only and hand its JSON-able result to every rank. If it raises an
        AnetrainError, rank 0 re-raises it and the other ranks raise a DistributedError quoting it."""
        if not self.active:
            return fn()
        err: AnetrainError | None = None
        doc: dict[str, Any] = {}
        if self.is_main:
            try:
                doc = {"ok": fn()}
            except AnetrainError as e:
                err, doc = e, {"error": str(e)}
        doc = self.broadcast_json(doc, what)
        if err is not None:
            raise err
        if "error" in doc:
            raise DistributedError(f"rank 0 failed during {what}: {doc['error']}")
        return doc["ok"]  # type: ignore[no-any-return]

    def agree(self, fn: Callable[[], T], what: str) -> T:
        """Run ``fn`` on every rank; if any rank raises an AnetrainError, every rank stops (the failing ones
        with their own error, the others naming the ranks that failed)."""
        if not self.active:
            return fn()
        err: AnetrainError | None = None
        result: Any = None
        try:
            result = fn()
        except AnetrainError as e:
            err = e
        flags = torch.zeros(self.world_size, dtype=torch.int64, device=self.device)
        flags[self.rank] = int(err is not None)
        self.all_reduce_(flags, what)
        if err is not None:
            raise err
        failed = [r for r in range(self.world_size) if int(flags[r])]
        if failed:
            raise DistributedError(f"rank(s) {', '.join(map(str, failed))} failed during {what}; stopping")
        return result  # type: ignore[no-any-return]

    # ---- teardown ----------------------------------------------------------------------------------
    def close(self) -> None:
        """Leave the process group (every rank calls this at the end, error or not)."""
        if self.backend is not None and dist.is_initialized():
            with contextlib.suppress(Exception):  # a broken group cannot be torn down more cleanly
                dist.destroy_process_group()
        self.backend = None


def resolve_backend(choice: str, use_cuda: bool) -> str:
    """gloo for CPU tensors, NCCL for CUDA devices, unless one is named."""
    if choice not in BACKENDS:
        raise AnetrainError(f"--dist-backend must be one of {', '.join(BACKENDS)}, got {choice!r}")
    if choice == "auto":
        return "nccl" if use_cuda else "gloo"
    if choice == "nccl" and not (use_cuda and dist.is_nccl_available()):
        raise AnetrainError("--dist-backend nccl needs CUDA devices and a torch built with NCCL; use gloo")
    return choice


def wants_cuda(backend_option: str) -> bool:
    """Whether the trainer's ``--backend`` puts the tensors on CUDA devices."""
    return backend_option == "cuda" or (backend_option == "auto" and torch.cuda.is_available())


def init_world(timeout_s: float = 300.0, backend: str = "auto", use_cuda: bool = False) -> World:
    """Join the process group described by torchrun's environment; a single-process World without one.

    With CUDA, local rank r trains on device r (``torch.cuda.set_device``), so ``cuda`` means that device.
    ``timeout_s`` bounds the rendezvous and every collective: a rank that dies or stalls makes the others
    fail within it.
    """
    if timeout_s <= 0:
        raise AnetrainError(f"--dist-timeout must be positive, got {timeout_s:g}")
    if not launched_by_torchrun():
        return World(timeout_s=timeout_s)
    world_size = _env_int("WORLD_SIZE")
    rank = _env_int("RANK")
    local_rank = _env_int("LOCAL_RANK", rank)
    if world_size < 1 or not 0 <= rank < world_size:
        raise DistributedError(f"RANK={rank} does not fit WORLD_SIZE={world_size}")
    if world_size == 1:
        return World(timeout_s=timeout_s)
    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed; data-parallel training needs it")
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise DistributedError(f"{' and '.join(missing)} not set (launch with torchrun)")
    name = resolve_backend(backend, use_cuda)
    device = torch.device("cpu")
    if use_cuda:
        if not torch.cuda.is_available() or local_rank >= torch.cuda.device_count():
            raise DistributedError(
                f"local rank {local_rank} has no CUDA device (this machine has {torch.cuda.device_count()}); "
                "lower --nproc-per-node"
            )
        torch.cuda.set_device(local_rank)
        if name == "nccl":
            device = torch.device("cuda", local_rank)
    world = World(rank, world_size, local_rank, None, device, timeout_s)
    # Importing torch._inductor.config after the process group exists (torch.use_deterministic_algorithms and
    # torch.compile do) keeps the group alive past destroy_process_group (seen with torch 2.13), and its gloo
    # threads then abort the process at exit ("terminate called without an active exception"); importing it
    # first avoids that.
    importlib.import_module("torch._inductor.config")

    try:
        dist.init_process_group(
            name,
            timeout=timedelta(seconds=timeout_s),
            rank=rank,
            world_size=world_size,
            device_id=device if name == "nccl" else None,
        )
    except (RuntimeError, ValueError, dist.DistError) as e:
        raise world.lost("joining the process group", e) from e
    world.backend = name
    return world


# ------------------------------------------------------------------------------------------------
# Gradient all-reduce


class GradSync:
    """All-reduces a pipeline's gradients over the ranks, overlapped with its backward where it can.

    Per step: :meth:`arm` before each micro-step (``True`` on the last one of the accumulation window only),
    then :meth:`finish` before anything reads the gradients. With a pipeline that announces finished buckets
    (``announces_buckets``), each bucket's all-reduce starts on the dW executor the moment it is complete;
    otherwise (e.g. ``--dw-device``, whose gradients arrive only at the end) the whole buffer is all-reduced
    in :meth:`finish`. The all-reduced values are identical on every rank, so the gradient norm, clipping,
    the fp16 overflow decision and the update are too, and the weights stay in sync. For a single process it
    does nothing.
    """

    def __init__(self, world: World, pipe: Pipeline) -> None:
        self.world = world
        self.grads: torch.Tensor = pipe.grads.flat
        #: all-reduces start during the backward (else the whole buffer is all-reduced after it)
        self.overlap = world.active and pipe.announces_buckets
        if self.overlap:
            pipe.grad_ready_hook = self._on_ready
        self._armed = False
        self._works: list[Any] = []
        self._t_first: float | None = None
        self._error: BaseException | None = None
        self.buckets_reduced = 0  # per step, for tests and the curious

    def arm(self, last_micro_step: bool) -> None:
        """Whether the coming micro-step completes the accumulation window (only then is anything sent)."""
        self._armed = last_micro_step and self.world.active

    def _on_ready(self, bucket: torch.Tensor) -> None:
        """Called by the pipeline (on its dW executor) with each bucket whose gradient is complete."""
        if not self._armed or self._error is not None:
            return
        try:
            if self._t_first is None:
                self._t_first = time.perf_counter()
            self._works.append(dist.all_reduce(bucket, async_op=True))
        except BaseException as e:  # surfaced on the main thread by finish()
            self._error = e

    def finish(self) -> tuple[float, float]:
        """Wait for every bucket's all-reduce; returns (exposed ms: how long the trainer waited for them,
        total ms: from the first bucket's launch until the trainer holds them all, i.e. the communication
        hidden behind the backward plus the exposed part). Raises DistributedError when a peer is gone."""
        if not self.world.active:
            return 0.0, 0.0
        cuda = self.grads.device.type == "cuda"
        if cuda:
            torch.cuda.current_stream().synchronize()  # the compute is done; what follows is communication
        t0 = time.perf_counter()
        works, error, first = self._works, self._error, self._t_first
        self._armed, self._works, self._error, self._t_first = False, [], None, None
        with self.world.guard("the gradient all-reduce"):
            if error is not None:
                raise error
            if works:
                for work in works:
                    work.wait()
            else:  # no overlap: one all-reduce of the whole buffer now
                first = t0
                dist.all_reduce(self.grads)
            if cuda:
                torch.cuda.current_stream().synchronize()
        t1 = time.perf_counter()
        self.buckets_reduced = max(1, len(works))
        return (t1 - t0) * 1e3, (t1 - (first if first is not None else t0)) * 1e3


# ------------------------------------------------------------------------------------------------
# Debug: are the weights still identical everywhere?


def weights_digest(flat: torch.Tensor) -> str:
    """A hash of the exact bytes of a tensor (for the --dist-check-every consistency check)."""
    import hashlib

    return hashlib.sha256(flat.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def check_in_sync(world: World, flat: torch.Tensor, step: int) -> None:
    """Raise DistributedError if any rank's weights differ from rank 0's (bit for bit)."""
    if not world.active:
        return
    digests = world.gather_json(weights_digest(flat), "the weight consistency check")
    bad = [r for r, d in enumerate(digests) if d != digests[0]]
    if bad:
        raise DistributedError(
            f"step {step}: the weights of rank(s) {', '.join(map(str, bad))} differ from rank 0's "
            "(the ranks have diverged)"
        )
