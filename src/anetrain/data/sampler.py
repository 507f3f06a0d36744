"""Where training windows come from: seq+1 tokens at random offsets, reproducibly.

``random`` (the default): offsets from numpy's PCG64 seeded with ``seed + 1000 * rank``; its exact state is
saved in checkpoints, so a resumed run draws the very windows an uninterrupted run would.

``drand48``: the original trainer's order exactly. It seeds ``srand48(42 + start)`` when a run starts or
resumes (``start`` counting windows already drawn, i.e. the original's micro-steps of one 256-token sequence)
and draws ``pos = floor(drand48() * (n - S - 1))`` for each window. Like the original, a resumed run reseeds,
so its windows differ from an uninterrupted run's.

Training windows lie in ``[0, n_train)``; a held-out tail (``--val-fraction``) is never sampled.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..rng import Drand48


def gather_windows(tokens: np.ndarray, positions: np.ndarray, length: int) -> torch.Tensor:
    """[B, length] int64 windows starting at ``positions``, copied out of the (memory-mapped) tokens."""
    idx = positions[:, None] + np.arange(length)[None, :]
    return torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))


class RandomSampler:
    name = "random"

    def __init__(
        self, tokens: np.ndarray, n_train: int, seq: int, batch: int, seed: int, rank: int = 0
    ) -> None:
        self.tokens, self.n_train, self.seq, self.batch = tokens, n_train, seq, batch
        self.rng = np.random.Generator(np.random.PCG64(seed + 1000 * rank))
        self.drawn = 0

    def next_batch(self) -> torch.Tensor:
        """[B, S+1] int64."""
        pos = self.rng.integers(0, self.n_train - self.seq, size=self.batch)  # pos + S + 1 <= n_train
        self.drawn += self.batch
        return gather_windows(self.tokens, pos, self.seq + 1)

    def state(self) -> dict[str, Any]:
        return {"name": self.name, "bit_generator": self.rng.bit_generator.state, "drawn": self.drawn}

    def restore(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["bit_generator"]
        self.drawn = int(state["drawn"])


class Drand48Sampler:
    name = "drand48"

    def __init__(self, tokens: np.ndarray, n_train: int, seq: int, batch: int, start: int = 0) -> None:
        self.tokens, self.n_train, self.seq, self.batch = tokens, n_train, seq, batch
        self.rng = Drand48(42 + start)
        self.drawn = start

    def next_batch(self) -> torch.Tensor:
        span = self.n_train - self.seq - 1
        pos = np.floor(self.rng.random(self.batch) * span).astype(np.int64)
        self.drawn += self.batch
        return gather_windows(self.tokens, pos, self.seq + 1)

    def state(self) -> dict[str, Any]:
        return {"name": self.name, "drawn": self.drawn}

    def restore(self, state: dict[str, Any]) -> None:
        # As the original: reseed from the number of windows already drawn.
        self.drawn = int(state["drawn"])
        self.rng = Drand48(42 + self.drawn)


def eval_windows(
    tokens: np.ndarray, lo: int, hi: int, seq: int, batch: int, n_batches: int
) -> list[torch.Tensor]:
    """A fixed set of validation batches from ``tokens[lo:hi]``, the same at every evaluation."""
    rng = np.random.Generator(np.random.PCG64(20240520))
    top = hi - seq - 1  # last valid start
    return [
        gather_windows(tokens, lo + rng.integers(0, top - lo + 1, size=batch), seq + 1)
        for _ in range(n_batches)
    ]
