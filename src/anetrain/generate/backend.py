"""Which decoder generates: the native CPU kernels when they can run the model, else torch operators.

``auto`` picks ``native`` for fp32, bf16 and int8 weights on the CPU when the library builds (see
``native.py``), and ``torch`` otherwise (float64, CUDA, no C compiler), saying why in ``Decoder.note``.
``native`` insists (an error if it cannot run); ``torch`` never builds anything.

Threads: unless told, the native decoder uses torch's thread count, except for models under
``SMALL_MODEL_PARAMS`` parameters, which decode on one thread: their per-layer stages are a few
microseconds of work, less than the threads' synchronisation costs (stories260K: ~10,000 tok/s on one
thread, a few hundred on two of a busy machine's cores).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from ..errors import AnetrainError
from .decoder import TorchDecoder
from .native import NativeDecoder, NativeUnavailable
from .weights import DecodeWeights

BACKENDS = ("auto", "native", "torch")
SMALL_MODEL_PARAMS = 4_000_000


def default_threads(weights: DecodeWeights) -> int:
    """The native decoder's threads when none are asked for (module docstring)."""
    return 1 if weights.cfg.param_count() < SMALL_MODEL_PARAMS else torch.get_num_threads()


class Decoder(Protocol):
    """What the generation loop needs of a decoder (``NativeDecoder`` and ``TorchDecoder`` provide it)."""

    backend: str
    description: str
    dtype: str
    threads: int
    n_streams: int
    cache_len: int

    def forward(self, tokens, streams, positions, logit_rows=()) -> np.ndarray: ...
    def sample(self, logits, streams, temperature, top_p, top_k, states) -> list[int]: ...
    def decode(self, tokens, streams, positions, temperature, top_p, top_k, states) -> list[int]: ...
    def copy_stream(self, src: int, dst: int, n_pos: int) -> None: ...


def make_decoder(
    weights: DecodeWeights,
    n_streams: int = 1,
    cache_len: int | None = None,
    backend: str = "auto",
    threads: int | None = None,
) -> Decoder:
    """A decoder for ``n_streams`` streams of up to ``cache_len`` positions (default: the model's seq_len)."""
    if backend not in BACKENDS:
        raise AnetrainError(f"unknown generation backend {backend!r} (known: {', '.join(BACKENDS)})")
    if n_streams < 1:
        raise AnetrainError(f"the number of samples must be at least 1, got {n_streams}")
    note = ""
    if backend in ("auto", "native"):
        try:
            dec: Decoder = NativeDecoder(weights, n_streams, cache_len, threads or default_threads(weights))
            dec.note = ""  # type: ignore[attr-defined]
            return dec
        except NativeUnavailable as e:
            if backend == "native":
                raise
            note = f"native kernels not used: {e}"
    dec = TorchDecoder(weights, n_streams, cache_len, threads)
    dec.note = note  # type: ignore[attr-defined]
    return dec
