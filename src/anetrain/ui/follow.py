"""Reading a file as it grows, one complete line at a time (``tail -F`` for programs)."""

from __future__ import annotations

import os
from pathlib import Path


class TailReader:
    """Returns the complete lines appended to a file since the last :meth:`read_lines`.

    An incomplete last line is held back until its newline arrives (:attr:`partial`). A file that is
    replaced (new inode) or truncated is read again from its start. A missing file yields nothing.
    ``max_bytes`` (None: no bound) bounds one read, so catching up on a huge file takes several calls
    rather than one long pause.
    """

    def __init__(self, path: str | os.PathLike[str], max_bytes: int | None = 4 << 20) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.partial = b""
        self._offset = 0
        self._identity: tuple[int, int] | None = None

    def read_lines(self) -> list[bytes]:
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                identity = (st.st_dev, st.st_ino)
                if identity != self._identity or st.st_size < self._offset:
                    self._identity = identity
                    self._offset, self.partial = 0, b""
                f.seek(self._offset)
                data = f.read(-1 if self.max_bytes is None else self.max_bytes)
        except OSError:  # missing, unreadable, a directory: nothing to read (yet)
            return []
        if not data:
            return []
        self._offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        return lines

    def take_partial(self) -> bytes:
        """Hand over the held-back incomplete line and forget it."""
        out, self.partial = self.partial, b""
        return out
