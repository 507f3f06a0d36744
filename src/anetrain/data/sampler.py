"""Where training windows come from: seq+1 tokens at random offsets, reproducibly, on one rank or many.

``random`` (the default): offsets from numpy's PCG64 seeded with ``seed + 1000 * rank``, so every rank of a
data-parallel job draws its own stream. Checkpoints keep every rank's exact generator state, so a resumed run
with the same number of ranks draws the very windows an uninterrupted run would. Resumed with a different
number of ranks, each rank's stream is re-derived from ``(seed, step, rank)`` (numpy's SeedSequence), which is
deterministic but not the stream an uninterrupted run would have drawn.

``shared``: one PCG64 stream seeded with ``seed`` (rank 0's ``random`` stream) for the whole job, dealt to the
ranks batch by batch: of every ``world_size`` consecutive batches, rank r takes the r-th. A job of W ranks
with ``--accum A`` therefore trains on exactly the windows of a 1-process run with ``--accum W*A`` (rank r's
micro-batch i is that run's micro-batch ``i*W + r``), its state does not depend on the number of ranks, and a
resume with any number of ranks continues the same stream. With one rank it is ``random``.

``drand48``: the original trainer's order exactly. It seeds ``srand48(42 + start)`` when a run starts or
resumes (``start`` counting windows already drawn, i.e. the original's micro-steps of one 256-token sequence)
and draws ``pos = floor(drand48() * (n - S - 1))`` for each window. Like the original, a resumed run reseeds,
so its windows differ from an uninterrupted run's. With several ranks the one stream is dealt as ``shared``
deals it, and ``start`` counts the windows the whole job drew, so the order does not depend on the number of
ranks either.

Training windows lie in ``[0, n_train)``; a held-out tail (``--val-fraction``) is never sampled.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..rng import Drand48

SAMPLERS = ("random", "shared", "drand48")


def gather_windows(tokens: np.ndarray, positions: np.ndarray, length: int) -> torch.Tensor:
    """[B, length] int64 windows starting at ``positions``, copied out of the (memory-mapped) tokens."""
    idx = positions[:, None] + np.arange(length)[None, :]
    return torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))


class RandomSampler:
    """One PCG64 stream per rank (``seed + 1000 * rank``)."""

    name = "random"
    #: each rank's state differs, so a checkpoint must collect every rank's
    per_rank = True

    def __init__(
        self,
        tokens: np.ndarray,
        n_train: int,
        seq: int,
        batch: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.tokens, self.n_train, self.seq, self.batch = tokens, n_train, seq, batch
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.rng = np.random.Generator(np.random.PCG64(self._stream_seed()))
        self.drawn = 0  # windows this rank has drawn
        self.last_positions = np.zeros(0, dtype=np.int64)  # start offsets of the last batch

    def _stream_seed(self) -> int:
        return self.seed + 1000 * self.rank

    def _positions(self) -> np.ndarray:
        return self.rng.integers(0, self.n_train - self.seq, size=self.batch)  # pos + S + 1 <= n_train

    def next_batch(self) -> torch.Tensor:
        """[B, S+1] int64 (their start offsets stay in ``last_positions``)."""
        pos = self._positions()
        self.drawn += self.batch
        self.last_positions = pos
        return gather_windows(self.tokens, pos, self.seq + 1)

    def state(self) -> dict[str, Any]:
        """This rank's state (JSON-serializable)."""
        return {
            "name": self.name,
            "seed": self.seed,
            "rank": self.rank,
            "bit_generator": self.rng.bit_generator.state,
            "drawn": self.drawn,
        }

    def job_state(self, states: list[dict[str, Any]]) -> dict[str, Any]:
        """The checkpoint's sampler state from every rank's :meth:`state` (in rank order): rank 0's fields
        at the top (as a single-process run stores them), and with several ranks, all of them in ``ranks``."""
        job = {**states[0], "world_size": len(states)}
        if len(states) > 1:
            job["ranks"] = states
        return job

    def restore(self, state: dict[str, Any], step: int = 0) -> None:
        """Continue from a checkpoint's :meth:`job_state`: this rank's exact state when the checkpoint has
        as many ranks as this job, else a stream re-derived from (seed, step, rank)."""
        saved_world = int(state.get("world_size", 1))
        if saved_world == self.world_size:
            own = state["ranks"][self.rank] if "ranks" in state else state
            self.rng.bit_generator.state = own["bit_generator"]
            self.drawn = int(own["drawn"])
            return
        seed = int(state.get("seed", self.seed))
        self.rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, step, self.rank])))
        self.drawn = 0


class SharedSampler(RandomSampler):
    """One PCG64 stream (``seed``) for the whole job, dealt to the ranks batch by batch."""

    name = "shared"
    per_rank = False

    def _stream_seed(self) -> int:
        return self.seed

    def next_batch(self) -> torch.Tensor:
        """This rank's [B, S+1] batch of the next ``world_size`` batches of the stream."""
        mine = None
        for r in range(self.world_size):
            pos = self._positions()
            if r == self.rank:
                mine = pos
        self.drawn += self.batch * self.world_size
        assert mine is not None
        self.last_positions = mine
        return gather_windows(self.tokens, mine, self.seq + 1)

    def state(self) -> dict[str, Any]:
        """The stream's state (the same on every rank; ``drawn`` counts the whole job's windows)."""
        return {
            "name": self.name,
            "seed": self.seed,
            "bit_generator": self.rng.bit_generator.state,
            "drawn": self.drawn,
        }

    def job_state(self, states: list[dict[str, Any]]) -> dict[str, Any]:
        return {**states[0], "world_size": len(states)}

    def restore(self, state: dict[str, Any], step: int = 0) -> None:
        """The same stream, whatever the number of ranks then and now."""
        self.rng.bit_generator.state = state["bit_generator"]
        self.drawn = int(state["drawn"])


class Drand48Sampler:
    """The original trainer's drand48 window order (one stream, dealt to the ranks as ``shared`` is)."""

    name = "drand48"
    per_rank = False

    def __init__(
        self,
        tokens: np.ndarray,
        n_train: int,
        seq: int,
        batch: int,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.tokens, self.n_train, self.seq, self.batch = tokens, n_train, seq, batch
        self.rank, self.world_size = rank, world_size
        self.rng = Drand48(42 + start)
        self.drawn = start  # windows the whole job has drawn
        self.last_positions = np.zeros(0, dtype=np.int64)  # start offsets of the last batch

    def next_batch(self) -> torch.Tensor:
        span = self.n_train - self.seq - 1
        mine = None
        for r in range(self.world_size):
            u = self.rng.random(self.batch)
            if r == self.rank:
                mine = np.floor(u * span).astype(np.int64)
        self.drawn += self.batch * self.world_size
        assert mine is not None
        self.last_positions = mine
        return gather_windows(self.tokens, mine, self.seq + 1)

    def state(self) -> dict[str, Any]:
        return {"name": self.name, "drawn": self.drawn}

    def job_state(self, states: list[dict[str, Any]]) -> dict[str, Any]:
        return {**states[0], "world_size": len(states)}

    def restore(self, state: dict[str, Any], step: int = 0) -> None:
        # As the original: reseed from the number of windows already drawn (by the whole job).
        self.drawn = int(state["drawn"])
        self.rng = Drand48(42 + self.drawn)


#: any of the samplers (they offer the same methods)
WindowSampler = RandomSampler | Drand48Sampler


def make_sampler(
    kind: str,
    tokens: np.ndarray,
    n_train: int,
    seq: int,
    batch: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
) -> WindowSampler:
    """The ``--sampler`` for this rank of a job of ``world_size`` ranks."""
    if kind == "drand48":
        return Drand48Sampler(tokens, n_train, seq, batch, rank=rank, world_size=world_size)
    if kind == "shared":
        return SharedSampler(tokens, n_train, seq, batch, seed, rank, world_size)
    if kind == "random":
        return RandomSampler(tokens, n_train, seq, batch, seed, rank, world_size)
    raise ValueError(f"unknown sampler {kind!r} (known: {', '.join(SAMPLERS)})")


def eval_starts(lo: int, hi: int, seq: int, batch: int, n_batches: int) -> list[np.ndarray]:
    """The start offsets of :func:`eval_windows`' batches."""
    n = batch * n_batches
    top = hi - seq - 1  # last valid start
    starts = np.linspace(lo, top, n).round().astype(np.int64) if n > 1 else np.array([lo], dtype=np.int64)
    return [starts[i * batch : (i + 1) * batch] for i in range(n_batches)]


def eval_windows(
    tokens: np.ndarray, lo: int, hi: int, seq: int, batch: int, n_batches: int
) -> list[torch.Tensor]:
    """A fixed set of validation batches from ``tokens[lo:hi]``, the same at every evaluation.

    The ``batch * n_batches`` windows start at evenly spaced offsets across the region (non-overlapping when
    it is long enough), so the estimate covers the whole validation data rather than a random sample of it.
    """
    return [gather_windows(tokens, s, seq + 1) for s in eval_starts(lo, hi, seq, batch, n_batches)]


def gather_masks(mask: np.ndarray, positions: np.ndarray, seq: int) -> torch.Tensor:
    """[B, S] bool: which targets of the windows starting at ``positions`` count in the loss (the mask of
    tokens pos+1 .. pos+S, the ones the window predicts)."""
    return gather_windows(mask, positions + 1, seq).bool()
