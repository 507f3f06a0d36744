"""What the runtime and its worker process exchange: framed messages over pipes, tensors in shared memory.

Messages. Each message is a frame: an 8-byte header (two little-endian uint32: the length of a UTF-8 JSON
object, then the length of a raw payload), the JSON, the payload. Nothing is pickled: a message can only
ever be data. Reads and writes take a deadline, so a dead or stuck peer is an error, never a hang.

Tensors. Each program gets an :class:`IoArea`: a file mapped into both processes (``mmap``) holding its
inputs then its outputs, fp16, each at a 64-byte aligned offset given by :class:`IoLayout`. The parent
writes the inputs, sends ``run``, the worker copies them to the device's surfaces, evaluates, copies the
outputs back; the parent reads them. Big weight inputs thus cross the process boundary as one memory copy
instead of a pipe transfer.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import select
import struct
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...errors import AnetrainError

HEADER = struct.Struct("<II")
MAX_JSON = 64 << 20
ALIGN = 64


class ProtocolError(AnetrainError):
    """A malformed frame: a bug on one side or a process that wrote something else to the pipe."""


class PeerTimeout(AnetrainError):
    """The peer did not read or answer before the deadline."""


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    return max(0.0, deadline - time.monotonic())


class Channel:
    """One end of a framed, bidirectional connection over two pipe file descriptors."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self.read_fd = read_fd
        self.write_fd = write_fd

    def send(
        self, msg: dict[str, Any], payload: bytes | memoryview = b"", deadline: float | None = None
    ) -> None:
        body = json.dumps(msg, separators=(",", ":")).encode("utf-8")
        self._write_all(HEADER.pack(len(body), len(payload)) + body, deadline)
        if len(payload):
            self._write_all(payload, deadline)

    def recv(self, deadline: float | None = None) -> tuple[dict[str, Any], bytes]:
        """The next message; raises EOFError when the peer closed its end, PeerTimeout past the deadline."""
        n_json, n_payload = HEADER.unpack(self._read_exact(HEADER.size, deadline, first=True))
        if n_json > MAX_JSON:
            raise ProtocolError(f"message header announces {n_json} bytes of JSON; the stream is corrupt")
        try:
            msg = json.loads(self._read_exact(n_json, deadline).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ProtocolError(f"message is not valid JSON ({e})") from None
        if not isinstance(msg, dict):
            raise ProtocolError("message is not a JSON object")
        return msg, self._read_exact(n_payload, deadline)

    def _write_all(self, data: bytes | memoryview, deadline: float | None) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            _, writable, _ = select.select([], [self.write_fd], [], _remaining(deadline))
            if not writable:
                raise PeerTimeout("the peer did not read its messages in time")
            try:
                n = os.write(self.write_fd, view[: 1 << 20])
            except BrokenPipeError:
                raise EOFError("the peer closed its end of the pipe") from None
            view = view[n:]

    def _read_exact(self, n: int, deadline: float | None, first: bool = False) -> bytes:
        chunks, got = [], 0
        while got < n:
            readable, _, _ = select.select([self.read_fd], [], [], _remaining(deadline))
            if not readable:
                raise PeerTimeout("the peer did not answer in time")
            chunk = os.read(self.read_fd, min(n - got, 1 << 20))
            if not chunk:
                if first and got == 0:
                    raise EOFError("the peer closed its end of the pipe")
                raise EOFError(f"the peer closed the pipe in the middle of a message ({got} of {n} bytes)")
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


@dataclass(frozen=True)
class IoLayout:
    """Byte offsets of a program's tensors in its shared area: inputs, then outputs, each 64-aligned."""

    inputs: tuple[tuple[str, tuple[int, ...], int], ...]  # (name, shape, offset)
    outputs: tuple[tuple[str, tuple[int, ...], int], ...]
    size: int

    @classmethod
    def of(cls, inputs: list[Any], outputs: list[Any]) -> IoLayout:
        """Layout for TensorSpec-likes (``.name``, ``.shape``), kept in the given order."""
        off = 0
        sides: list[tuple[tuple[str, tuple[int, ...], int], ...]] = []
        for specs in (inputs, outputs):
            entries = []
            for t in specs:
                entries.append((t.name, tuple(int(s) for s in t.shape), off))
                off += -(-2 * math.prod(t.shape) // ALIGN) * ALIGN
            sides.append(tuple(entries))
        return cls(sides[0], sides[1], max(off, ALIGN))

    def to_json(self) -> dict[str, Any]:
        return {
            "inputs": [[n, list(s), o] for n, s, o in self.inputs],
            "outputs": [[n, list(s), o] for n, s, o in self.outputs],
            "size": self.size,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> IoLayout:
        try:
            return cls(
                tuple((str(n), tuple(int(x) for x in s), int(o)) for n, s, o in d["inputs"]),
                tuple((str(n), tuple(int(x) for x in s), int(o)) for n, s, o in d["outputs"]),
                int(d["size"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ProtocolError(f"bad tensor layout in message ({e})") from None


class IoArea:
    """A file mapped into memory, with one fp16 numpy view per tensor of an :class:`IoLayout`."""

    def __init__(self, path: str, layout: IoLayout, create: bool) -> None:
        self.path = path
        self.layout = layout
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, layout.size)
            elif os.fstat(fd).st_size < layout.size:
                raise ProtocolError(f"{path}: shared tensor area is smaller than its layout says")
            self._mm = mmap.mmap(fd, layout.size)
        finally:
            os.close(fd)
        self.inputs = {n: self._view(s, o) for n, s, o in layout.inputs}
        self.outputs = {n: self._view(s, o) for n, s, o in layout.outputs}

    def _view(self, shape: tuple[int, ...], offset: int) -> np.ndarray:
        return np.ndarray(shape, dtype="<f2", buffer=self._mm, offset=offset)

    def write_inputs(self, arrays: dict[str, np.ndarray], program: str) -> None:
        for name, view in self.inputs.items():
            if name not in arrays:
                raise ValueError(f"program {program}: no data for input {name}")
            a = np.asarray(arrays[name])
            if a.size != view.size:
                raise ValueError(
                    f"program {program}: input {name} needs shape {list(view.shape)}, got {list(a.shape)}"
                )
            np.copyto(view, a.reshape(view.shape), casting="unsafe")

    def read_outputs(self) -> dict[str, np.ndarray]:
        return {n: v.astype(np.float16, copy=True) for n, v in self.outputs.items()}

    def close(self) -> None:
        self.inputs, self.outputs = {}, {}
        with contextlib.suppress(BufferError, ValueError):
            self._mm.close()
