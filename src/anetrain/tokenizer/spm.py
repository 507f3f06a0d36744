"""Sentencepiece ``.model`` files behind the :class:`Tokenizer` interface, and their llama2.c export.

Encoding and decoding go through the sentencepiece library (so whatever normalization the model carries,
e.g. tok512's collapsing of repeated spaces, applies); :meth:`decode_piece` uses the exported piece table,
so streamed output is the same as with the exported ``tokenizer.bin``.

The export is llama2.c's ``tokenizer.py export``: for every id, its piece with "▁" (U+2581) replaced by a
space, BOS written as ``"\\n<s>\\n"`` and EOS as ``"\\n</s>\\n"``, and its score.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import sentencepiece as spm

from ..errors import InputError
from ..fsutil import TOKENIZER_LIMIT, read_capped, refuse_overwriting_input
from .base import BOS_PIECE, EOS_PIECE, Tokenizer
from .llama2c import write_tokenizer_bin


def load_processor(path: str | os.PathLike[str]) -> spm.SentencePieceProcessor:
    """A sentencepiece processor for ``path``; a file that is not a sentencepiece model is refused."""
    p = Path(path)
    data = read_capped(p, TOKENIZER_LIMIT, "tokenizer")
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(data)
    except (RuntimeError, OSError, TypeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(p, f"not a sentencepiece model ({first})") from None
    if sp.get_piece_size() == 0:
        raise InputError(p, "sentencepiece model has no pieces")
    return sp


def export_pieces(sp: spm.SentencePieceProcessor) -> tuple[list[bytes], np.ndarray]:
    """The llama2.c piece table of a sentencepiece model: (pieces, float32 scores), one per id."""
    pieces: list[bytes] = []
    scores: list[float] = []
    bos, eos = sp.bos_id(), sp.eos_id()
    for i in range(sp.get_piece_size()):
        if i == bos:
            piece = BOS_PIECE
        elif i == eos:
            piece = EOS_PIECE
        else:
            piece = sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8")
        pieces.append(piece)
        scores.append(sp.get_score(i))
    return pieces, np.asarray(scores, dtype=np.float32)


def export_tokenizer_bin(model: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Convert a sentencepiece ``.model`` into a llama2.c ``tokenizer.bin`` (written atomically; never over
    the model itself)."""
    refuse_overwriting_input(out, [model])
    sp = load_processor(model)
    pieces, scores = export_pieces(sp)
    write_tokenizer_bin(out, pieces, [float(s) for s in scores])
    return Path(out)


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece ``.model``: encode and decode by the library, stream with the exported pieces."""

    def __init__(self, path: str | os.PathLike[str], sp: spm.SentencePieceProcessor) -> None:
        pieces, scores = export_pieces(sp)
        super().__init__(path, pieces, scores)
        self.sp = sp
        self.bos_id = sp.bos_id()
        self.eos_id = sp.eos_id()

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SentencePieceTokenizer:
        return cls(path, load_processor(path))

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """sentencepiece's ids of ``text`` (it adds the dummy prefix itself), with BOS/EOS as asked."""
        ids: list[int] = self.sp.encode(text)
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """sentencepiece's decoding (control tokens dropped, byte pieces joined into UTF-8)."""
        return self.sp.decode([int(i) for i in ids])
