"""One trainer per run directory: ``RUN_DIR/trainer.lock``, held with an exclusive ``flock`` for the run.

Two trainers writing one run directory would mix their checkpoints, config.json and metrics (and one's pruning
would delete the other's checkpoint while it is being written), so a second ``anetrain train --out RUN_DIR``,
or a ``--resume RUN_DIR`` while a trainer runs there, is refused with one line naming the process that holds
the directory. The lock belongs to the open file, so the kernel releases it when its process ends in any way
(``kill -9`` included): a lock file left by a dead process is simply taken over (and the log says so). The
file holds the holder's process id; it is removed when the run ends.

Where the file system cannot lock (``flock`` fails with something other than "held"), the process id in the
file decides: a living process other than this one holds the directory.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from ..errors import AnetrainError
from ..fsutil import pid_alive

try:
    import fcntl
except ImportError:  # not POSIX: only the process id in the file protects the directory
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = "trainer.lock"


class RunDirInUse(AnetrainError):
    """Another living trainer holds the run directory."""


def _holder(path: Path) -> int | None:
    """The process id written in a lock file (None if absent or unreadable)."""
    try:
        text = path.read_text("utf-8", errors="replace").split()
    except OSError:
        return None
    return int(text[0]) if text and text[0].isdigit() else None


def _in_use(run_dir: Path, pid: int | None) -> RunDirInUse:
    who = f"process {pid}" if pid else "another process"
    return RunDirInUse(
        f"{run_dir} is in use by another trainer ({who}); wait for it to end, stop it "
        f"(`anetrain dashboard {run_dir}`, q), or choose another --out"
    )


class RunLock:
    """The exclusive lock on a run directory (see the module docstring)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.fd: int | None = None
        self.taken_over: int | None = None  # the process id of a dead holder whose lock file was left

    def acquire(self) -> None:
        """Take the lock or raise :class:`RunDirInUse` (:attr:`taken_over`: a dead holder's process id)."""
        for _ in range(10):  # the file may be removed by its holder between our open and our lock
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise AnetrainError(
                    f"{self.path}: cannot create the run directory's lock ({e.strerror or e})"
                ) from None
            try:
                locked = self._lock(fd)
            except BaseException:
                os.close(fd)
                raise
            if not locked:
                os.close(fd)
                raise _in_use(self.run_dir, _holder(self.path))
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        else:
            raise AnetrainError(f"{self.path}: could not take the run directory's lock")
        self.fd = fd
        stale = _holder(self.path)
        if stale is not None and stale != os.getpid() and not pid_alive(stale):
            self.taken_over = stale
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        with contextlib.suppress(OSError):
            os.fsync(fd)

    def _lock(self, fd: int) -> bool:
        """Lock the open file; False when another process holds it."""
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                return False
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    return False
        # no locking here: the process id in the file decides
        pid = _holder(self.path)
        return pid is None or pid == os.getpid() or not pid_alive(pid)

    def release(self) -> None:
        """Remove the lock file and let go of the lock (removed first, so that nobody takes a file that is
        about to disappear: a waiting process re-checks that the file it locked is still the one there)."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self.fd)
        self.fd = None


def check_not_in_use(run_dir: Path) -> None:
    """Raise :class:`RunDirInUse` if a trainer holds ``run_dir`` now (for a launcher about to start one)."""
    lock = RunLock(run_dir)
    try:
        fd = os.open(lock.path, os.O_RDONLY)
    except OSError:  # no lock file: nobody holds the directory
        return
    try:
        if not lock._lock(fd):
            raise _in_use(lock.run_dir, _holder(lock.path))
    finally:
        os.close(fd)  # a lock taken here is given back at once (the file stays as it was)
