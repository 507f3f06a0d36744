"""Reading ``metrics.jsonl``: tolerant, incremental, and safe to point at a file that is still growing.

The trainer appends one JSON object per line. A reader may see the file in the middle of a write, so the
last line can be incomplete; it may also meet record types or fields that a newer trainer added. The
:class:`MetricsFollower` returns only complete records, keeps an incomplete tail until its newline arrives,
skips lines that are not JSON objects with a string ``"type"`` (counting them in ``bad_lines``), and starts
over if the file is replaced or truncated. It never raises for a missing file: it simply has nothing yet.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .follow import TailReader

Record = dict[str, Any]

# The record types of docs/run-directory.md. Readers keep others too (callers ignore what they don't know).
KNOWN_TYPES = frozenset({"run", "step", "eval", "checkpoint", "sample", "compile", "report"})


def parse_line(line: bytes) -> Record | None:
    """One metrics line as a record, or None when it is blank or not a JSON object with a ``type``."""
    line = line.strip()
    if not line:
        return None
    try:
        obj = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        return None
    return obj


class MetricsFollower:
    """Follows a ``metrics.jsonl`` as it grows, returning each complete record exactly once.

    ``max_bytes`` bounds how much one :meth:`poll` reads, so that attaching to a very long run catches up
    over several polls instead of freezing the caller.
    """

    def __init__(self, path: str | os.PathLike[str], max_bytes: int | None = 4 << 20) -> None:
        self.path = Path(path)
        self.bad_lines = 0
        self._tail = TailReader(path, max_bytes)

    def poll(self) -> list[Record]:
        """The records completed since the last call (empty when there are none or no file yet)."""
        records = []
        for line in self._tail.read_lines():
            rec = parse_line(line)
            if rec is not None:
                records.append(rec)
            elif line.strip():
                self.bad_lines += 1
        # A last line without its newline counts once it parses: a JSON object cut short never does.
        tail = parse_line(self._tail.partial)
        if tail is not None:
            self._tail.take_partial()
            records.append(tail)
        return records

    def has_partial_line(self) -> bool:
        """True while an incomplete last line is pending (the trainer is mid-write or was killed)."""
        return bool(self._tail.partial.strip())


def read_metrics(path: str | os.PathLike[str]) -> list[Record]:
    """Every complete record of a metrics file, in order (for plots and exports)."""
    follower = MetricsFollower(path, max_bytes=None)
    return follower.poll()
