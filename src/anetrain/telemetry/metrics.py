"""metrics.jsonl: one JSON object per line, appended and flushed record by record as the run goes
(docs/run-directory.md); a partial last line left by a killed writer is ended before the next one appends.

Each record is one ``write`` of a whole line to a file opened for appending. A write that fails (a full
disk) is undone (the file is cut back to its last whole line), reported once as a warning, and the run goes
on: later records are written again once there is space.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..fsutil import describe_os_error, end_partial_line


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


class MetricsWriter:
    """Appends records to RUN_DIR/metrics.jsonl; each line is written whole and flushed."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        start_time: float | None = None,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        from ..errors import AnetrainError

        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            end_partial_line(self.path)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # kept for the run
        except OSError as e:
            raise AnetrainError(f"{self.path}: cannot be written ({describe_os_error(e)})") from None
        self.start = start_time or time.time()
        self.listeners: list[Any] = []  # objects with .log(record): W&B, TensorBoard
        self.warn = warn
        self.failing = False  # the last write failed (warned once until a write succeeds again)
        self.lost = 0  # records not written

    def write(self, record_type: str, **fields: Any) -> dict[str, Any]:
        now = time.time()
        record = {
            "type": record_type,
            **_clean(fields),
            "time": round(now, 3),
            "elapsed_s": round(now - self.start, 3),
        }
        self._append((json.dumps(record, separators=(",", ":")) + "\n").encode("utf-8"))
        for listener in self.listeners:
            listener.log(record)
        return record

    def _append(self, data: bytes) -> None:
        """One whole line, or nothing (a partial write is cut off again)."""
        try:
            size = os.fstat(self._fd).st_size
        except OSError:
            size = None
        try:
            done = 0
            while done < len(data):
                done += os.write(self._fd, data[done:])
        except OSError as e:
            if size is not None:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, size)
            self.lost += 1
            if not self.failing and self.warn is not None:
                self.warn(
                    f"warning: {self.path}: write failed ({describe_os_error(e)}); training goes on and "
                    "records are written again once there is space"
                )
            self.failing = True
            return
        if self.failing and self.warn is not None:
            self.warn(f"note: {self.path}: writing again ({self.lost} records were lost)")
        self.failing = False

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)
        for listener in self.listeners:
            listener.close()
