"""POSIX drand48, bit-exact and vectorized, so anetrain can reproduce the original trainer's random streams.

drand48 is a 48-bit linear congruential generator::

    X[n+1] = (a * X[n] + c) mod 2**48,   a = 0x5DEECE66D, c = 0xB
    srand48(s):  X[0] = (s << 16) | 0x330E      (s taken as a 32-bit value)
    drand48():   returns X[n+1] / 2**48

The original initializes weights (``u = 2*drand48() - 1``) and picks training windows
(``pos = floor(drand48() * (n - S - 1))``) with it. Generating 110M values one by one in Python would take
minutes, so :meth:`Drand48.random` jumps ahead: k steps of the LCG are again an LCG,
``X[n+k] = A_k X[n] + C_k``, which lets a whole block be produced from the previous block in one numpy
operation. uint64 arithmetic wraps mod 2**64, and 2**48 divides 2**64, so masking to 48 bits afterwards is
exact.
"""

from __future__ import annotations

import numpy as np

_A = 0x5DEECE66D
_C = 0xB
_MASK = (1 << 48) - 1


def _jump(k: int) -> tuple[int, int]:
    """(A_k, C_k) such that k LCG steps equal X -> A_k X + C_k (mod 2**48)."""
    a_total, c_total = 1, 0
    a_step, c_step = _A, _C
    while k:
        if k & 1:
            a_total, c_total = (a_step * a_total) & _MASK, (a_step * c_total + c_step) & _MASK
        a_step, c_step = (a_step * a_step) & _MASK, (a_step * c_step + c_step) & _MASK
        k >>= 1
    return a_total, c_total


class Drand48:
    """A drand48 stream. ``Drand48(seed)`` is ``srand48(seed)``."""

    def __init__(self, seed: int) -> None:
        self.state = (((seed & 0xFFFFFFFF) << 16) | 0x330E) & _MASK

    def next(self) -> float:
        """One ``drand48()`` value in [0, 1)."""
        self.state = (_A * self.state + _C) & _MASK
        return self.state / float(1 << 48)

    def states(self, n: int) -> np.ndarray:
        """The next ``n`` raw 48-bit states (as uint64), advancing the stream by ``n``."""
        out = np.empty(n, dtype=np.uint64)
        if n == 0:
            return out
        # Seed block: the first min(n, 1) state, then double the filled prefix until it covers n.
        out[0] = (_A * self.state + _C) & _MASK
        filled = 1
        mask = np.uint64(_MASK)
        with np.errstate(over="ignore"):
            while filled < n:
                take = min(filled, n - filled)
                a_k, c_k = _jump(filled)
                out[filled : filled + take] = (out[:take] * np.uint64(a_k) + np.uint64(c_k)) & mask
                filled += take
        self.state = int(out[-1])
        return out

    def random(self, n: int) -> np.ndarray:
        """The next ``n`` drand48 values as float64 in [0, 1) (exactly X / 2**48)."""
        return self.states(n).astype(np.float64) / float(1 << 48)

    def uniform_pm1(self, n: int) -> np.ndarray:
        """``2*drand48() - 1`` for the next ``n`` draws, in float64 (the original then rounds to float32)."""
        return 2.0 * self.random(n) - 1.0
