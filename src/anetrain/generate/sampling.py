"""Choosing the next token from logits, exactly as llama2.c's ``run.c`` does, plus an optional top-k.

- temperature 0: argmax (the first maximum wins);
- otherwise: logits / temperature, softmax (float32), a coin from run.c's xorshift64* generator, then
  inverse-CDF sampling over all tokens (top-p <= 0 or >= 1) or top-p ("nucleus") sampling: drop
  candidates below (1 - p) / (n - 1), sort descending, cut where the cumulative probability first exceeds p,
  and sample inside that prefix with the coin scaled by the prefix's mass.

``top_k`` (not in run.c; 0 = off) keeps only the k largest logits before the softmax. All arithmetic is
float32 with sequential sums, in run.c's order. (run.c sorts with qsort, whose order among equal
probabilities is unspecified; here equal probabilities keep index order.)
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..errors import AnetrainError

_MASK64 = (1 << 64) - 1
_XORSHIFT_MUL = 0x2545F4914F6CDD1D


class XorShiftRng:
    """run.c's xorshift64* generator: ``random_u32`` and ``random_f32`` from a 64-bit state."""

    def __init__(self, seed: int) -> None:
        self.state = seed & _MASK64
        if self.state == 0:
            raise AnetrainError("the random seed must not be 0 (xorshift stays at 0 forever)")

    def u32(self) -> int:
        s = self.state
        s ^= s >> 12
        s ^= (s << 25) & _MASK64
        s ^= s >> 27
        self.state = s
        return ((s * _XORSHIFT_MUL) & _MASK64) >> 32

    def f32(self) -> np.float32:
        """A float32 in [0, 1) with 24 random bits."""
        return np.float32((self.u32() >> 8) / 16777216.0)


def time_seed() -> int:
    """run.c's default seed, ``(unsigned int)time(NULL)``."""
    return int(time.time()) & 0xFFFFFFFF


def softmax_f32(x: np.ndarray) -> np.ndarray:
    """run.c's softmax: subtract the max, expf, a sequential float32 sum, divide."""
    e = np.exp(x - x.max(), dtype=np.float32)
    total = np.cumsum(e, dtype=np.float32)[-1]
    return e / total


def sample_mult(probs: np.ndarray, coin: np.float32) -> int:
    """The first index whose cumulative probability exceeds ``coin`` (the last one on rounding)."""
    cdf = np.cumsum(probs, dtype=np.float32)
    hits = np.flatnonzero(coin < cdf)
    return int(hits[0]) if hits.size else len(probs) - 1


def sample_topp(probs: np.ndarray, top_p: float, coin: np.float32) -> int:
    """run.c's ``sample_topp``."""
    n = len(probs)
    topp = np.float32(top_p)
    cutoff = (np.float32(1.0) - topp) / np.float32(n - 1) if n > 1 else np.float32(0.0)
    cand = np.flatnonzero(probs >= cutoff)
    if cand.size == 0:
        return sample_mult(probs, coin)
    order = cand[np.argsort(-probs[cand], kind="stable")]  # descending, index order among ties
    p = probs[order]
    cum = np.cumsum(p, dtype=np.float32)
    over = np.flatnonzero(cum > topp)
    last = int(over[0]) if over.size else len(order) - 1
    r = coin * cum[last]
    hits = np.flatnonzero(r < cum[: last + 1])
    return int(order[hits[0]] if hits.size else order[last])


@dataclass
class Sampler:
    """Next-token selection with run.c's semantics; ``seed`` None (or <= 0) seeds from the clock as run.c."""

    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise AnetrainError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 <= self.top_p <= 1:
            raise AnetrainError(f"top-p must be in [0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise AnetrainError(f"top-k must be >= 0 (0 = off), got {self.top_k}")
        if self.seed is None or self.seed <= 0:
            self.seed = time_seed()
        self.rng = XorShiftRng(self.seed)

    def sample(self, logits: np.ndarray) -> int:
        """The next token for ``logits`` [V] (any float dtype; sampling itself is float32)."""
        return sample_logits(logits, self.temperature, self.top_p, self.top_k, self.rng)


def sample_logits(logits: np.ndarray, temperature: float, top_p: float, top_k: int, rng: XorShiftRng) -> int:
    """One draw with run.c's semantics (module docstring) from ``rng`` (advanced unless greedy)."""
    x = np.asarray(logits, dtype=np.float32)
    if temperature == 0:
        return int(np.argmax(x))  # first maximum
    x = x / np.float32(temperature)
    if 0 < top_k < len(x):
        keep = np.argsort(-x, kind="stable")[:top_k]
        masked = np.full_like(x, -np.inf)
        masked[keep] = x[keep]
        x = masked
    probs = softmax_f32(x)
    coin = rng.f32()
    if top_p <= 0 or top_p >= 1:
        return sample_mult(probs, coin)
    return sample_topp(probs, top_p, coin)


def stream_seed(seed: int, stream: int) -> int:
    """The xorshift state of stream ``stream`` of ``--num-samples`` from one seed: stream 0 is ``seed`` itself
    (so one sample is what run.c draws), the others splitmix64 of (seed, stream), never 0."""
    if stream == 0:
        return seed & _MASK64
    z = (seed + stream * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return z or 1
