"""Which decoder generates: the native CPU kernels when they can run the model, else torch operators.

``auto`` picks ``native`` for fp32, bf16 and int8 weights on the CPU when the library builds (see
``native.py``), and ``torch`` otherwise (float64, CUDA, no C compiler), saying why in ``Decoder.note``.
``native`` insists (an error if it cannot run); ``torch`` never builds anything.
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
            dec: Decoder = NativeDecoder(weights, n_streams, cache_len, threads)
            dec.note = ""  # type: ignore[attr-defined]
            return dec
        except NativeUnavailable as e:
            if backend == "native":
                raise
            note = f"native kernels not used: {e}"
    if threads:
        torch.set_num_threads(threads)
    dec = TorchDecoder(weights, n_streams, cache_len, threads)
    dec.note = note  # type: ignore[attr-defined]
    return dec
