"""Weight blobs: the 128-byte-header fp16 file format the ANE compiler reads constants from.

Layout (docs/ane.md, appendix A.3)::

    byte 0        0x01
    byte 4        0x02
    bytes 64..67  EF BE AD DE     (0xDEADBEEF little-endian: the chunk header starts at 64)
    byte 68       0x01
    bytes 72..75  uint32 data size in bytes
    bytes 80..83  uint32 data offset (128)
    bytes 128..   fp16 data, row-major

MIL refers to a blob as ``BLOBFILE(path = "@model_path/weights/<name>.bin", offset = uint64(64))``: the
offset names the chunk header, not the data.
"""

from __future__ import annotations

import os
import struct

import numpy as np

from ..errors import InputError

HEADER_BYTES = 128
CHUNK_OFFSET = 64  # what the MIL BLOBFILE offset points at
MAGIC = b"\xef\xbe\xad\xde"


def build_blob(values: np.ndarray) -> bytes:
    """The blob file for ``values`` (any shape; stored row-major, rounded to fp16)."""
    data = np.ascontiguousarray(values, dtype=np.float16).astype("<f2").tobytes()
    header = bytearray(HEADER_BYTES)
    header[0] = 0x01
    header[4] = 0x02
    header[CHUNK_OFFSET : CHUNK_OFFSET + 4] = MAGIC
    header[68] = 0x01
    struct.pack_into("<I", header, 72, len(data))
    struct.pack_into("<I", header, 80, HEADER_BYTES)
    return bytes(header) + data


def read_blob(data: bytes, path: str | os.PathLike[str] = "<blob>", offset: int = CHUNK_OFFSET) -> np.ndarray:
    """The fp16 values of a blob (1-D), after checking its header; ``offset`` is the MIL BLOBFILE offset."""
    if offset != CHUNK_OFFSET:
        raise InputError(path, f"BLOBFILE offset {offset} is not supported (single-chunk blobs use 64)")
    if len(data) < HEADER_BYTES:
        raise InputError(path, f"weight blob is {len(data)} bytes, shorter than its 128-byte header")
    if data[CHUNK_OFFSET : CHUNK_OFFSET + 4] != MAGIC:
        raise InputError(path, "weight blob has no DEADBEEF chunk magic at byte 64")
    size, start = struct.unpack_from("<I", data, 72)[0], struct.unpack_from("<I", data, 80)[0]
    if start != HEADER_BYTES or size % 2 or start + size != len(data):
        raise InputError(
            path, f"weight blob header says {size} data bytes at offset {start}, but the file has {len(data)}"
        )
    return np.frombuffer(data, dtype="<f2", offset=start, count=size // 2).astype(np.float16)
