"""The run directory from a viewer's side: its files, whether the trainer is alive, and control requests
(layout in ``docs/run-directory.md``; checkpoints are found and read by :mod:`anetrain.checkpoint`)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import psutil

from ..errors import InputError
from ..fsutil import atomic_write_bytes


class RunDir:
    """Paths and read-only queries of one run directory; only :meth:`request` writes (a control file)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.metrics = self.path / "metrics.jsonl"
        self.log = self.path / "train.log"
        self.config_path = self.path / "config.json"
        self.control = self.path / "control"
        self.pid_file = self.path / "trainer.pid"
        self.checkpoints = self.path / "checkpoints"

    @classmethod
    def existing(cls, path: str | os.PathLike[str]) -> RunDir:
        """A RunDir for a directory that must exist (InputError otherwise)."""
        p = Path(path)
        if not p.exists():
            raise InputError(p, "no such run directory")
        if not p.is_dir():
            raise InputError(p, "not a directory (expected a run directory written by anetrain train)")
        return cls(p)

    @property
    def name(self) -> str:
        return self.path.resolve().name

    # ---- the live trainer ----------------------------------------------------------------------------
    def trainer_pid(self) -> int | None:
        """The pid in ``trainer.pid`` when that process is alive; None for no file or a stale one."""
        try:
            words = self.pid_file.read_text(encoding="utf-8", errors="replace").split()
            pid = int(words[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if pid > 0 and psutil.pid_exists(pid) else None

    def heartbeat_age_s(self) -> float | None:
        """Seconds since the trainer last touched ``trainer.pid`` (None when there is none)."""
        try:
            return max(0.0, time.time() - self.pid_file.stat().st_mtime)
        except OSError:
            return None

    def request(self, name: str) -> Path:
        """Create ``control/<name>`` (``generate`` or ``stop``): its presence is the request."""
        path = self.control / name
        atomic_write_bytes(path, b"")
        return path

    # ---- files ---------------------------------------------------------------------------------------
    def config(self) -> dict[str, Any] | None:
        """``config.json`` as a dict, or None when absent; InputError when it is not valid JSON."""
        try:
            raw = self.config_path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise InputError(self.config_path, f"cannot read ({e.strerror or e})") from None
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(self.config_path, f"not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise InputError(self.config_path, "expected a JSON object")
        return data
