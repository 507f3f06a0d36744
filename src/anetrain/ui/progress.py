"""Training progress on the console: a live bar on a terminal, plain log lines everywhere else.

On a terminal, :class:`ConsoleProgress` shows a rich progress bar with the step, ETA, loss and tokens/s,
and :meth:`ConsoleProgress.log` prints lines above it without breaking it. When the stream is not a
terminal (CI, ``> file``, a dashboard's child) it prints one plain line every ``log_every`` steps (and the
last step), so logs stay readable and greppable.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.text import Text

from . import fmt
from .state import number


def is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class ConsoleProgress:
    """Progress of ``total_steps`` optimizer steps, starting after ``start_step`` (non-zero on resume)."""

    def __init__(
        self,
        total_steps: int,
        start_step: int = 0,
        stream: TextIO | None = None,
        log_every: int = 10,
        tty: bool | None = None,
    ) -> None:
        self.total = total_steps
        self.start_step = start_step
        self.stream = stream if stream is not None else sys.stderr
        self.log_every = max(1, log_every)
        self.tty = is_terminal(self.stream) if tty is None else tty
        self._t0 = time.monotonic()
        self._last_line: str | None = None
        self._last_step_logged = start_step
        self._closed = False
        self._progress: Progress | None = None
        if self.tty:
            console = Console(file=self.stream, force_terminal=True, highlight=False)
            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[stats]}"),
                console=console,
                transient=False,
            )
            self._task = self._progress.add_task("train", total=total_steps, completed=start_step, stats="")
            self._progress.start()

    def __enter__(self) -> ConsoleProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def eta_s(self, step: int) -> float | None:
        """Remaining seconds at the mean rate since the first step of this session."""
        done = step - self.start_step
        if done <= 0:
            return None
        return (time.monotonic() - self._t0) / done * max(0, self.total - step)

    def format_line(
        self,
        step: int,
        loss: float,
        tokens_per_s: float | None = None,
        lr: float | None = None,
        ms_per_step: float | None = None,
        val_loss: float | None = None,
    ) -> str:
        """One plain progress line, e.g.::

        step 120/1000 | loss 3.4521 | val 3.5012 | lr 4.90e-04 | 35.2k tok/s | 58.2 ms/step | eta 0:51
        """
        parts = [f"step {step}/{self.total}", f"loss {fmt.num(loss)}"]
        if val_loss is not None:
            parts.append(f"val {fmt.num(val_loss)}")
        if lr is not None:
            parts.append(f"lr {lr:.2e}")
        if tokens_per_s is not None:
            parts.append(f"{fmt.si(tokens_per_s)} tok/s")
        if ms_per_step is not None:
            parts.append(f"{ms_per_step:.1f} ms/step")
        parts.append(f"eta {fmt.duration(self.eta_s(step))}")
        return " | ".join(parts)

    def update(
        self,
        step: int,
        loss: float,
        tokens_per_s: float | None = None,
        lr: float | None = None,
        ms_per_step: float | None = None,
        val_loss: float | None = None,
    ) -> None:
        """Record that ``step`` (1-based, completed optimizer steps) finished with these numbers."""
        if self._progress is not None:
            stats = f"loss {fmt.num(loss)}"
            if tokens_per_s is not None:
                stats += f"  {fmt.si(tokens_per_s)} tok/s"
            if lr is not None:
                stats += f"  lr {lr:.2e}"
            self._progress.update(self._task, completed=step, stats=stats)
            return
        line = self.format_line(step, loss, tokens_per_s, lr, ms_per_step, val_loss)
        if step % self.log_every == 0 or step >= self.total:
            self._write(line)
            self._last_step_logged = step
            self._last_line = None
        else:
            self._last_line = line

    def update_record(self, record: dict) -> None:
        """:meth:`update` from a ``step`` metrics record (docs/run-directory.md)."""
        self.update(
            int(record["step"]),
            float(record["loss"]),
            tokens_per_s=number(record.get("tokens_per_s")),
            lr=number(record.get("lr")),
            ms_per_step=number(record.get("ms")),
        )

    def log(self, line: str) -> None:
        """Print a line (above the bar on a terminal)."""
        if self._progress is not None:
            self._progress.console.print(Text(line))
        else:
            self._write(line)

    def _write(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Stop the bar; in plain mode print the last step if it was not printed yet."""
        if self._closed:
            return
        self._closed = True
        if self._progress is not None:
            self._progress.stop()
        elif self._last_line is not None:
            self._write(self._last_line)
