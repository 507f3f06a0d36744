"""The run directory's writers (docs/run-directory.md): config.json, metrics.jsonl and the trackers that
follow it, the trainer.pid heartbeat, report.json, and the run's log (train.log and the console).

config.json, report.json and trainer.pid are replaced atomically; metrics.jsonl and train.log are appended,
one whole line per record, flushed as it is written, so a crash loses at most a partial last line (which
every reader skips). Only rank 0 of a data-parallel job writes; the other ranks' writers build the records
(the loop reads them) and write nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .. import __version__
from ..config import ModelConfig
from ..distributed import World
from ..errors import AnetrainError
from ..fsutil import atomic_write_text, describe_os_error, open_for_append
from ..lora import LoraConfig
from ..telemetry.metrics import MetricsWriter
from .options import TrainOptions


class NullMetrics:
    """The metrics writer of a rank other than 0: records are built (the loop reads them) but not written."""

    def __init__(self) -> None:
        self.listeners: list[Any] = []

    def write(self, record_type: str, **fields: Any) -> dict[str, Any]:
        return {"type": record_type, **fields}

    def close(self) -> None:
        pass


class RunFiles:
    """What rank 0 writes into RUN_DIR besides checkpoints; a data-parallel rank's writes nothing."""

    def __init__(self, run_dir: Path, world: World, started: float, warn: Callable[[str], None]) -> None:
        self.run_dir = run_dir
        self.warn = warn  # the log: what a full disk costs is said there
        self.writes = world.is_main
        self.started = started  # the metrics' elapsed_s counts from here
        self.pid_file = run_dir / "trainer.pid"
        self.metrics: MetricsWriter | NullMetrics = NullMetrics()

    def open(self, opts: TrainOptions) -> None:
        """Start appending to metrics.jsonl, with the experiment trackers the options ask for."""
        if not self.writes:
            return
        self.metrics = MetricsWriter(self.run_dir / "metrics.jsonl", start_time=self.started, warn=self.warn)
        if opts.wandb or opts.tensorboard:
            try:
                from ..ui.trackers import make_trackers
            except ImportError as e:
                raise AnetrainError(f"experiment tracking is unavailable: {e}") from None
            self.metrics.listeners += make_trackers(
                self.run_dir,
                wandb=opts.wandb,
                wandb_project=opts.wandb_project,
                wandb_name=opts.wandb_name,
                wandb_mode=opts.wandb_mode,
                tensorboard=opts.tensorboard,
            )

    def write(self, record_type: str, **fields: Any) -> dict[str, Any]:
        """Append one record to metrics.jsonl (and the trackers); returns it."""
        return self.metrics.write(record_type, **fields)

    def write_config(self, cfg: ModelConfig, opts: TrainOptions, world_size: int) -> None:
        """config.json: the model and every option, with the data paths made absolute."""

        def absolute(path: str | None) -> str | None:
            return str(Path(path).resolve()) if path else None

        doc = {
            "model": cfg.to_dict(),
            "train": asdict(opts),
            "tokenizer": absolute(opts.tokenizer),
            "data": absolute(opts.data),
            "val_data": absolute(opts.val_data),
            "world_size": world_size,
            "anetrain_version": __version__,
        }
        if self.writes:
            atomic_write_text(self.run_dir / "config.json", json.dumps(doc, indent=1))

    def write_report(self, report: dict[str, Any]) -> None:
        """report.json (and the "report" record); at the end of a run a failed write is only a warning (the
        checkpoint is safe, and the report is in the log)."""
        self.write("report", **report)
        if self.writes:
            try:
                atomic_write_text(self.run_dir / "report.json", json.dumps(report, indent=1))
            except AnetrainError as e:
                self.warn(f"warning: {e}")

    @contextlib.contextmanager
    def live(self) -> Iterator[None]:
        """trainer.pid while the trainer runs (the dashboard's sign of life); removed when it ends."""
        if self.writes:
            atomic_write_text(self.pid_file, f"{os.getpid()}\n")
        try:
            yield
        finally:
            if self.writes:
                self.pid_file.unlink(missing_ok=True)

    def heartbeat(self) -> None:
        """Touch trainer.pid (its mtime tells a dashboard the trainer is alive)."""
        if self.writes:
            with contextlib.suppress(OSError):
                self.pid_file.touch()

    def close(self) -> None:
        self.metrics.close()


class RunLog:
    """The run's log: lines go to RUN_DIR/train.log and to the console (above the progress bar, if any):
    progress to stderr, the run's result (the Efficiency Report, the final sample, where the run is and what
    to do next) to stdout.

    Under ``anetrain train --dashboard`` the training child's stderr already is train.log (so that tracebacks
    land there too); the parent sets ANETRAIN_STDERR_IS_LOG and the child then writes each line only once.
    Neither a closed terminal (after SIGHUP) nor a full disk stops the run: the console or the file is
    then given up on, with a warning where one can still be seen.
    """

    def __init__(self, path: Path, sink: Callable[[str], None] | None = None) -> None:
        self.path = path
        self.to_file = not os.environ.get("ANETRAIN_STDERR_IS_LOG")
        try:
            self.file = open_for_append(path) if self.to_file else None
        except OSError as e:
            raise AnetrainError(f"{path}: cannot be written ({describe_os_error(e)})") from None
        self.sink = sink
        self.progress: Any = None
        self.console = True  # False once the console is gone (the terminal closed)

    def __call__(self, line: str) -> None:
        self._console(line, sys.stderr)
        self.file_only(line)

    def result(self, text: str) -> None:
        """The run's result: stdout (and train.log)."""
        self.end_progress()  # the bar ends before the result is printed under it
        self._console(text, sys.stdout)
        self.file_only(text)

    def _console(self, line: str, stream: Any) -> None:
        if self.sink is not None:
            self.sink(line)
            return
        if not self.console:
            return
        try:
            if self.progress is not None:
                self.progress.log(line)
            else:
                print(line, file=stream, flush=True)
        except OSError:  # the terminal went away (SIGHUP): train.log goes on
            self.console = False

    def file_only(self, line: str) -> None:
        if self.file is None:
            return
        try:
            self.file.write(line + "\n")
            self.file.flush()
        except OSError as e:
            self.file = None  # a full disk: the console goes on; nothing more is written to train.log
            problem = describe_os_error(e)
            warning = f"warning: {self.path}: write failed ({problem}); the log goes on here only"
            self._console(warning, sys.stderr)

    def end_progress(self) -> None:
        """Close the progress bar (if the terminal is gone, just forget it)."""
        if self.progress is not None:
            try:
                self.progress.close()
            except OSError:
                self.console = False
            self.progress = None

    def close(self) -> None:
        self.end_progress()
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.file.close()


class RankLog:
    """The log of a data-parallel rank other than 0: only warnings reach stderr, prefixed with the rank
    (rank 0 writes train.log and the console for the job)."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def __call__(self, line: str) -> None:
        if line.lstrip().lower().startswith(("warning", "error")):
            with contextlib.suppress(OSError):
                print(f"[rank {self.rank}] {line}", file=sys.stderr, flush=True)

    def result(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def progress_printer(
    log: Callable[[str], None], end: int, start_step: int, log_every: int, is_main: bool
) -> Callable[[dict[str, Any]], None]:
    """A callback for each step record: a progress bar on a terminal, plain lines otherwise (and in
    train.log every ``log_every`` steps). Rank 0 only."""
    if not is_main:
        return lambda rec: None
    from ..ui.progress import ConsoleProgress

    bar = ConsoleProgress(end, start_step=start_step, stream=sys.stderr, log_every=log_every)
    # our own console: the bar shows the lines, which then go to train.log only
    own = log if isinstance(log, RunLog) and log.sink is None else None
    if own is not None:
        own.progress = bar

    def update(rec: dict[str, Any]) -> None:
        if own is None or own.console:
            try:
                bar.update_record(rec)
            except OSError:  # the terminal went away (SIGHUP): the log goes on in train.log
                if own is not None:
                    own.console = False
                    own.progress = None
        if rec["step"] % max(1, log_every) == 0 or rec["step"] == end:
            line = bar.format_line(rec["step"], rec["loss"], rec["tokens_per_s"], rec["lr"], rec["ms"])
            if own is not None:
                own.file_only(line)
            else:
                log(line)

    return update


def next_steps(run_dir: Path, unfinished: bool, has_tokenizer: bool) -> str:
    """The end of a run's result: where the run is and the commands that use it next."""
    d = shlex.quote(str(run_dir))
    lines = [f"run directory: {run_dir}"]
    if unfinished:
        lines.append(f"  continue:  anetrain train --resume {d}")
    tokenizer = "" if has_tokenizer else " --tokenizer TOKENIZER"
    return "\n".join(
        [
            *lines,
            f"  generate:  anetrain generate --model {d}{tokenizer} --prompt 'Once upon a time'",
            f"  inspect:   anetrain info {d}    anetrain dashboard {d}",
            f"  export:    anetrain export {d} model.bin --format llama2c-v0   (or --format hf)",
        ]
    )


def pipeline_lines(
    labels: dict[str, str],
    opts: TrainOptions,
    world: World,
    global_batch: int,
    tokens_per_step: int,
    grad_sync: Any,
) -> list[str]:
    """The log's lines about how the run trains: pipeline, device, precision, batch, optimizer; with several
    ranks, a note when the pipeline announces no gradient buckets (``grad_sync.overlap`` False)."""
    line = pipeline_line(labels, opts, world, global_batch, tokens_per_step)
    if world.active and not grad_sync.overlap:
        return [
            line,
            "note: this pipeline announces no gradient buckets; the all-reduce runs after the backward",
        ]
    return [line]


def pipeline_line(
    labels: dict[str, str], opts: TrainOptions, world: World, global_batch: int, tokens_per_step: int
) -> str:
    """The log's line about how the run trains: pipeline, device, precision, batch, optimizer."""
    ranks = ""
    if world.active:
        ranks = f", {world.world_size} ranks over {world.backend} (global batch {global_batch} sequences)"
    fusion = f" ({labels['fusion']} fusion)" if "fusion" in labels else ""
    return (
        f"pipeline: {labels['pipeline']} on {labels['backend']} in {labels['precision']}{fusion}; batch "
        f"{opts.batch}x{opts.seq}, accum {opts.accum}{ranks} ({tokens_per_step:,} tokens/step); "
        f"{opts.optimizer} lr {opts.lr:g}"
    )


def fine_tuning_lines(lora: LoraConfig | None, trainable: int, total: int, masked: bool) -> list[str]:
    """The log's lines about LoRA and a loss mask (none for plain training)."""
    lines = []
    if lora is not None:
        lines.append(
            f"LoRA: rank {lora.rank}, alpha {lora.alpha:g}, on {','.join(lora.targets)}: {trainable:,} "
            f"trainable parameters ({100 * trainable / total:.2f}%); the base is frozen"
        )
    if masked:
        lines.append("loss mask: the loss covers only the completion/assistant tokens of the data")
    return lines


def fine_tuning_fields(lora: LoraConfig | None, trainable: int, masked: bool) -> dict[str, Any]:
    """The "run" record's fields about LoRA and a loss mask."""
    return {
        "lora": lora.to_dict() if lora is not None else None,
        "trainable_params": trainable,
        "loss_masked": masked,
    }
