"""The tokenizer interface, and llama2.c's piece table that every tokenizer decodes with.

A llama2.c vocabulary is a list of pieces (raw bytes, with sentencepiece's "▁" already replaced by a
space) and a float32 score per piece. Ids 0, 1, 2 are ``<unk>``, BOS (``"\\n<s>\\n"``) and EOS
(``"\\n</s>\\n"``); ids 3..258 are the byte-fallback pieces ``<0x00>``..``<0xFF>``, so byte b has id b + 3.

Decoding follows llama2.c's ``run.c``: a piece that follows BOS loses one leading space
(sentencepiece's dummy prefix), and a ``<0xHH>`` piece stands for the single raw byte 0xHH.
"""

from __future__ import annotations

import hashlib
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from ..errors import InputError

BOS_ID = 1
EOS_ID = 2
BYTE_OFFSET = 3  # byte b is piece id b + 3 (after <unk>, <s>, </s>)
BOS_PIECE = b"\n<s>\n"
EOS_PIECE = b"\n</s>\n"

_BYTE_PIECE = re.compile(rb"<0x([0-9A-Fa-f]{2})>\Z")


def byte_of_piece(piece: bytes) -> int | None:
    """0xHH for a byte-fallback piece ``<0xHH>``, else None."""
    m = _BYTE_PIECE.match(piece)
    return int(m.group(1), 16) if m else None


class Tokenizer(ABC):
    """What the trainer, the data preparation and generation need from a tokenizer.

    ``pieces`` and ``scores`` are the llama2.c piece table (the content of a ``tokenizer.bin``), which
    :meth:`decode_piece` uses for ``run.c``-exact streaming output whatever the tokenizer's source.
    """

    bos_id: int = BOS_ID
    eos_id: int = EOS_ID

    def __init__(self, path: str | os.PathLike[str], pieces: Sequence[bytes], scores: np.ndarray) -> None:
        self.path = Path(path)
        self.name = self.path.name
        self.pieces: list[bytes] = list(pieces)
        self.scores: np.ndarray = np.asarray(scores, dtype=np.float32)
        self._byte_of = [byte_of_piece(p) for p in self.pieces]
        self._fingerprint: str | None = None

    @property
    def vocab_size(self) -> int:
        """The number of ids this tokenizer knows (0 .. vocab_size-1)."""
        return len(self.pieces)

    @abstractmethod
    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of ``text``, with BOS (1) first and EOS (2) last when asked for."""

    def decode_piece(self, prev_id: int, token_id: int) -> bytes:
        """The bytes ``run.c`` prints for ``token_id`` when it follows ``prev_id`` (for streaming).

        After BOS a piece loses one leading space; ``<0xHH>`` becomes the raw byte. BOS and EOS themselves
        give their pieces ``"\\n<s>\\n"`` and ``"\\n</s>\\n"``, as in ``run.c``.
        """
        piece = self.pieces[token_id]
        if prev_id == self.bos_id and piece[:1] == b" ":
            piece = piece[1:]
            b = byte_of_piece(piece)
        else:
            b = self._byte_of[token_id]
        return piece if b is None else bytes((b,))

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes of a token sequence: run.c's pieces, with BOS and EOS themselves left out.

        The start of the sequence counts as following BOS, so the dummy-prefix space that :meth:`encode`
        adds is dropped there as sentencepiece does, whether or not the ids begin with BOS.
        """
        out = bytearray()
        prev = self.bos_id
        for i in ids:
            i = int(i)
            if i not in (self.bos_id, self.eos_id):
                out += self.decode_piece(prev, i)
            prev = i
        return bytes(out)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of a token sequence (see :meth:`decode_bytes`); invalid UTF-8 becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def fingerprint(self) -> str:
        """The sha256 of the vocabulary (every piece and its score, as llama2.c's tokenizer.bin holds them).

        A sentencepiece ``.model`` and the ``tokenizer.bin`` exported from it have the same fingerprint, so a
        token file made with one is accepted with the other (their encoders differ only in sentencepiece's
        collapsing of repeated spaces, see ``llama2c.py``).
        """
        if self._fingerprint is None:
            h = hashlib.sha256()
            for piece in self.pieces:
                h.update(len(piece).to_bytes(4, "little") + piece)
            h.update(self.scores.astype("<f4").tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def check_covers(self, vocab_size: int, what: str = "the model") -> None:
        """Raise :class:`InputError` when this tokenizer has fewer ids than ``vocab_size``."""
        if self.vocab_size < vocab_size:
            raise InputError(
                self.path,
                f"tokenizer has {self.vocab_size} entries, fewer than {what}'s vocabulary of {vocab_size}",
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, vocab_size={self.vocab_size})"
