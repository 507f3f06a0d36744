"""metrics.jsonl: one JSON object per line, appended and flushed record by record as the run goes
(docs/run-directory.md); a partial last line left by a killed writer is ended before the next one appends."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from ..fsutil import open_for_append


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

    def __init__(self, path: str | os.PathLike[str], start_time: float | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open_for_append(self.path)  # kept open for the run
        self.start = start_time or time.time()
        self.listeners: list[Any] = []  # objects with .log(record): W&B, TensorBoard

    def write(self, record_type: str, **fields: Any) -> dict[str, Any]:
        now = time.time()
        record = {
            "type": record_type,
            **_clean(fields),
            "time": round(now, 3),
            "elapsed_s": round(now - self.start, 3),
        }
        self._f.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._f.flush()
        for listener in self.listeners:
            listener.log(record)
        return record

    def close(self) -> None:
        self._f.close()
        for listener in self.listeners:
            listener.close()
