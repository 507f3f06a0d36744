"""llama2.c ``tokenizer.bin``: reading, writing, and run.c's encoder.

File layout (little-endian, no vocabulary count): int32 ``max_token_length``, then for each id in order
float32 score, int32 byte length n, n raw bytes. The reader takes the number of entries from the model
(``vocab_size``) or reads to the end of the file.

The encoder reproduces llama2.c's ``run.c`` ``encode()`` exactly: optional BOS; the id of
the piece ``" "`` as a dummy prefix when the text is not empty; one token per UTF-8 code point when the
code point is a piece, else one byte-fallback token (byte + 3) per byte; then, repeatedly, the adjacent pair
whose concatenation is the piece with the highest score (leftmost on ties; scores must beat -1e10) is
merged; optional EOS. ``run.c`` rescans the whole sequence for every merge (quadratic); here candidate
pairs sit in a heap keyed by (score rank, position), with stale entries skipped, which picks the same pair
each time.
"""

from __future__ import annotations

import heapq
import math
import os
import struct
from collections.abc import Sequence

import numpy as np

from ..errors import InputError
from ..fsutil import TOKENIZER_LIMIT, atomic_write, read_capped
from .base import BOS_ID, BYTE_OFFSET, EOS_ID, Tokenizer

_HEADER = struct.Struct("<i")
_ENTRY = struct.Struct("<fi")
# run.c starts its best score at -1e10 and needs a strictly greater score to merge.
_MERGE_FLOOR = float(np.float32(-1e10))
# Far beyond any real vocabulary (Llama-2: 27 bytes); a larger header value means the file is not a tokenizer.
_MAX_PIECE_BYTES = 1 << 16


def read_tokenizer_bin(
    path: str | os.PathLike[str], vocab_size: int | None = None
) -> tuple[int, list[bytes], np.ndarray]:
    """(max_token_length, pieces, float32 scores) of a ``tokenizer.bin``.

    With ``vocab_size``, exactly that many entries are read (a longer file is fine, as in ``run.c``) and a
    file with fewer is refused; without it the entries run to the end of the file, which must end on an
    entry boundary.
    """
    raw = read_capped(path, TOKENIZER_LIMIT, "tokenizer")
    if len(raw) < _HEADER.size:
        raise InputError(path, f"truncated: {len(raw)} bytes, too short for a llama2.c tokenizer.bin header")
    (max_len,) = _HEADER.unpack_from(raw, 0)
    if not 0 < max_len <= _MAX_PIECE_BYTES:
        raise InputError(
            path, f"not a llama2.c tokenizer.bin (max_token_length {max_len} is not in 1..{_MAX_PIECE_BYTES})"
        )
    pieces: list[bytes] = []
    scores: list[float] = []
    off = _HEADER.size
    end = len(raw)
    while (vocab_size is None and off < end) or (vocab_size is not None and len(pieces) < vocab_size):
        i = len(pieces)
        if off == end:
            raise InputError(
                path, f"has {i} entries, fewer than the model's vocabulary of {vocab_size} tokens"
            )
        if off + _ENTRY.size > end:
            raise InputError(path, f"truncated in the header of entry {i} (at byte {off})")
        score, n = _ENTRY.unpack_from(raw, off)
        off += _ENTRY.size
        if not 0 <= n <= max_len:
            raise InputError(
                path,
                f"entry {i} has length {n}, outside 0..{max_len} (max_token_length): not a tokenizer.bin",
            )
        if off + n > end:
            raise InputError(path, f"truncated in the bytes of entry {i} (needs {n} bytes at byte {off})")
        if math.isnan(score):
            raise InputError(path, f"entry {i} has a NaN score: not a tokenizer.bin")
        pieces.append(raw[off : off + n])
        scores.append(score)
        off += n
    if not pieces:
        raise InputError(path, "has no entries")
    return max_len, pieces, np.asarray(scores, dtype=np.float32)


def write_tokenizer_bin(
    path: str | os.PathLike[str], pieces: Sequence[bytes], scores: Sequence[float]
) -> None:
    """Write a ``tokenizer.bin`` atomically, as llama2.c's ``tokenizer.py export`` does."""
    if len(pieces) != len(scores) or not pieces:
        raise ValueError("need one score per piece, and at least one piece")
    with atomic_write(path) as f:
        f.write(struct.pack("<I", max(len(p) for p in pieces)))
        for piece, score in zip(pieces, scores, strict=True):
            f.write(struct.pack("<fI", score, len(piece)))
            f.write(piece)


class BinTokenizer(Tokenizer):
    """A ``tokenizer.bin`` with ``run.c``'s encoder and decoder."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        pieces: Sequence[bytes],
        scores: np.ndarray,
        max_token_length: int | None = None,
    ) -> None:
        super().__init__(path, pieces, scores)
        self.max_token_length = max_token_length or max(len(p) for p in self.pieces)
        self._ids: dict[bytes, int] = {}
        for i, p in enumerate(self.pieces):
            self._ids.setdefault(p, i)
        # Pieces a merge may produce: id and score rank (0 = the highest score; equal scores, equal rank).
        # Among duplicate pieces the lowest id wins.
        mergeable = {p: i for p, i in self._ids.items() if float(self.scores[i]) > _MERGE_FLOOR}
        distinct = sorted({float(self.scores[i]) for i in mergeable.values()}, reverse=True)
        rank = {s: r for r, s in enumerate(distinct)}
        self._merges: dict[bytes, tuple[int, int]] = {
            p: (i, rank[float(self.scores[i])]) for p, i in mergeable.items()
        }
        self._space_id = self._ids.get(b" ")
        self._char_ids: dict[str, tuple[int, ...]] = {}

    @classmethod
    def load(cls, path: str | os.PathLike[str], vocab_size: int | None = None) -> BinTokenizer:
        max_len, pieces, scores = read_tokenizer_bin(path, vocab_size)
        return cls(path, pieces, scores, max_len)

    # ---- encoding ------------------------------------------------------------------------------
    def _code_point_ids(self, ch: str) -> tuple[int, ...]:
        """One code point's tokens: its piece, or its UTF-8 bytes as byte-fallback ids."""
        ids = self._char_ids.get(ch)
        if ids is None:
            b = ch.encode("utf-8", errors="surrogatepass")
            i = self._ids.get(b)
            ids = (i,) if i is not None else tuple(x + BYTE_OFFSET for x in b)
            self._char_ids[ch] = ids
        return ids

    def _bytes_ids(self, data: bytes) -> list[int]:
        """run.c's UTF-8 walk over raw bytes: a lead byte and at most 3 continuation bytes per group."""
        out: list[int] = []
        n = len(data)
        start = 0
        while start < n:
            stop = start + 1
            while stop < n and (data[stop] & 0xC0) == 0x80 and stop - start < 4:
                stop += 1
            group = data[start:stop]
            i = self._ids.get(group)
            if i is not None:
                out.append(i)
            else:
                out.extend(x + BYTE_OFFSET for x in group)
            start = stop
        return out

    def encode(self, text: str | bytes, bos: bool = True, eos: bool = False) -> list[int]:
        """``run.c``'s ``encode(text, bos, eos)``; ``text`` may also be raw bytes (not necessarily UTF-8).

        Unlike run.c, whose C string ends at a NUL, a NUL character is encoded (as ``<0x00>``).
        """
        ids: list[int] = [BOS_ID] if bos else []
        if text and self._space_id is not None:
            ids.append(self._space_id)  # sentencepiece's add_dummy_prefix
        if isinstance(text, bytes):
            ids += self._bytes_ids(text)
        else:
            code_point_ids = self._code_point_ids
            for ch in text:
                ids += code_point_ids(ch)
        ids = self._merge(ids)
        if eos:
            ids.append(EOS_ID)
        return ids

    def _merge(self, ids: list[int]) -> list[int]:
        """Merge the best-scoring adjacent pair until none merges (leftmost pair on equal scores).

        The tokens form a linked list over their original positions. ``cand[i]`` is the merge of the pair
        that starts at live position i (its id and score rank, or None), kept current as neighbours merge;
        the heap holds keys rank * n + i, so the smallest key is the best pair, leftmost among equals. A
        popped key whose position no longer has a candidate of that rank is stale and skipped.
        """
        n = len(ids)
        if n < 2:
            return ids
        pieces, merges = self.pieces, self._merges
        sym = list(ids)  # token at each original position (meaningful while the position is live)
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))
        cand: list[tuple[int, int] | None] = [None] * n
        heap: list[int] = []
        for i in range(n - 1):
            m = merges.get(pieces[sym[i]] + pieces[sym[i + 1]])
            if m is not None:
                cand[i] = m
                heap.append(m[1] * n + i)
        heapq.heapify(heap)
        pop, push = heapq.heappop, heapq.heappush
        while heap:
            r, i = divmod(pop(heap), n)
            m = cand[i]
            if m is None or m[1] != r:
                continue  # stale
            new = m[0]
            j = nxt[i]
            sym[i] = new
            cand[j] = None  # position j is gone
            k = nxt[j]
            nxt[i] = k
            m = None
            if k != -1:
                prv[k] = i
                m = merges.get(pieces[new] + pieces[sym[k]])
                if m is not None:
                    push(heap, m[1] * n + i)
            cand[i] = m
            h = prv[i]
            if h != -1:
                m = merges.get(pieces[sym[h]] + pieces[new])
                cand[h] = m
                if m is not None:
                    push(heap, m[1] * n + h)
        out = []
        i = 0
        while i != -1:
            out.append(sym[i])
            i = nxt[i]
        return out
