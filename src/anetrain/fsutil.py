"""Writing files so that a crash, a kill -9 or a full disk never leaves a half-written file in place.

:func:`atomic_write` writes to a temporary file in the destination's directory, flushes and fsyncs it, then
renames it over the destination (atomic on POSIX) and fsyncs the directory. If anything fails, the temporary
file is removed and the previous file, if any, is untouched.

Files that grow one line per record (metrics.jsonl, train.log) are appended instead, each record flushed as
it is written; a writer killed in the middle of a record leaves a partial last line, which
:func:`open_for_append` ends before the next writer appends, so only that one line is lost (and readers skip
it).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, TextIO

from .errors import AnetrainError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory so that a rename inside it is durable (no-op where unsupported)."""
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def describe_os_error(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return "no space left on device"
    return e.strerror or str(e)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[BinaryIO]:
    """Open a temporary file for writing; on success it replaces ``path`` atomically.

    Raises :class:`AnetrainError` naming ``path`` if the write fails (for example ENOSPC); the previous
    content of ``path`` is then still there.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    ok = False
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        with os.fdopen(fd, mode) as f:
            yield f  # type: ignore[misc]
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
        ok = True
    except OSError as e:
        raise AnetrainError(
            f"{dest}: write failed ({describe_os_error(e)}); the previous file is unchanged"
        ) from e
    finally:
        if not ok:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_write(path) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The hex sha256 of a file's bytes, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def end_partial_line(path: str | os.PathLike[str]) -> None:
    """If a line-per-record file ends without a newline (its writer was killed mid-record), end that line."""
    try:
        with open(path, "rb+") as f:
            if f.seek(0, os.SEEK_END) > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
    except FileNotFoundError:
        pass


def open_for_append(path: str | os.PathLike[str]) -> TextIO:
    """A line-per-record text file (UTF-8) opened for appending, a partial last line ended first."""
    end_partial_line(path)
    return open(path, "a", encoding="utf-8")
