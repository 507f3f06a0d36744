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
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, TextIO

from .errors import AnetrainError, InputError

#: the largest config, manifest or index JSON file a reader accepts (real ones are kilobytes)
CONFIG_LIMIT = 16 << 20
#: the largest tokenizer file a reader accepts (Llama 3's tokenizer.json is 9 MB)
TOKENIZER_LIMIT = 64 << 20


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


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (on this machine)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


#: what follows ".NAME." in an atomic_write temporary file: the writer's pid, mkstemp's 8 characters, .tmp
_TEMP_SUFFIX = re.compile(r"(\d+)\.[a-z0-9_]{8}\.tmp")


def remove_stale_temps(dest: Path) -> None:
    """Remove the temporary files that writers of ``dest`` killed mid-write left (``.NAME.PID.*.tmp`` whose
    process is gone)."""
    prefix = f".{dest.name}."
    with contextlib.suppress(OSError):
        for entry in os.scandir(dest.parent):
            m = _TEMP_SUFFIX.fullmatch(entry.name[len(prefix) :]) if entry.name.startswith(prefix) else None
            if m and not pid_alive(int(m.group(1))):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def _write_failed(dest: Path, e: OSError) -> AnetrainError:
    return AnetrainError(f"{dest}: write failed ({describe_os_error(e)}); the previous file is unchanged")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[BinaryIO]:
    """Open a temporary file for writing; on success it replaces ``path`` atomically.

    Raises :class:`AnetrainError` naming ``path`` if the write fails (for example ENOSPC, or a directory that
    cannot be written); the previous content of ``path`` is then still there.
    """
    dest = Path(path)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(dest)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.{os.getpid()}.", suffix=".tmp", dir=dest.parent)
    except OSError as e:
        raise _write_failed(dest, e) from None
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
        raise _write_failed(dest, e) from e
    finally:
        if not ok:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A new, empty temporary directory next to ``path``; when the block succeeds it takes ``path``'s place
    as a whole. An existing ``path`` is first renamed aside (``.NAME.old-PID``) and removed after the swap,
    so a reader, or a kill at any moment, sees the old directory or the new one, never a mixture (a kill
    between the two renames leaves ``path`` absent and both versions next to it, the old one complete).

    What a killed writer left is put right first: its half-written new version is removed, and an old
    version it had moved aside without putting the new one in place is moved back.

    Raises :class:`AnetrainError` naming ``path`` if writing fails; the previous directory is then intact.
    """
    dest = Path(path)
    parent = dest.parent
    tmp = parent / f".{dest.name}.tmp-{os.getpid()}"
    old = parent / f".{dest.name}.old-{os.getpid()}"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _recover_directory(dest)
        tmp.mkdir()
    except OSError as e:
        raise _write_failed(dest, e) from None
    ok = False
    try:
        yield tmp
        fsync_dir(tmp)
        if dest.exists():
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
        fsync_dir(parent)
        ok = True
    except OSError as e:
        raise _write_failed(dest, e) from e
    finally:
        if not ok:
            shutil.rmtree(tmp, ignore_errors=True)
            if old.exists() and not dest.exists():  # failed between the two renames: the old one back
                with contextlib.suppress(OSError):
                    os.replace(old, dest)


def _recover_directory(dest: Path) -> None:
    """Undo what writers of ``dest`` killed inside :func:`atomic_directory` left: new versions in progress
    (``.NAME.tmp-PID``) are removed; an old version moved aside (``.NAME.old-PID``) goes back in place when
    nothing replaced it, and is removed otherwise."""
    pattern = re.compile(rf"\.{re.escape(dest.name)}\.(tmp|old)-(\d+)")
    for entry in sorted(dest.parent.iterdir()):
        m = pattern.fullmatch(entry.name)
        if m is None or (int(m.group(2)) != os.getpid() and pid_alive(int(m.group(2)))):
            continue
        if m.group(1) == "old" and not dest.exists():
            os.replace(entry, dest)
        else:
            shutil.rmtree(entry, ignore_errors=True)


def read_capped(path: str | os.PathLike[str], limit: int, what: str) -> bytes:
    """The bytes of a small input file, refused (one line naming it) when larger than ``limit`` bytes or
    unreadable; never reads more than ``limit + 1`` bytes (``/dev/zero`` is refused, not read forever)."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except IsADirectoryError:
        raise InputError(path, f"is a directory, expected a {what}") from None
    except OSError as e:
        raise InputError(path, f"cannot read ({describe_os_error(e)})") from None
    if len(data) > limit:
        raise InputError(path, f"is larger than {limit:,} bytes: too large for a {what}")
    return data


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether two paths name the same existing file (through links and relative paths)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def refuse_overwriting_input(
    out: str | os.PathLike[str], inputs: list[str | os.PathLike[str]], flag: str = "--out"
) -> None:
    """Refuse (one line) an output path that names one of the command's inputs."""
    for src in inputs:
        if same_file(out, src):
            raise AnetrainError(
                f"{flag} {out} is the input {src}; it would be overwritten (choose another {flag})"
            )


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
    except OSError:  # absent (nothing to end), or a full disk (the appender reports it)
        pass


def open_for_append(path: str | os.PathLike[str]) -> TextIO:
    """A line-per-record text file (UTF-8) opened for appending, a partial last line ended first."""
    end_partial_line(path)
    return open(path, "a", encoding="utf-8")
