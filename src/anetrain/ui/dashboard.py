"""The live training dashboard (textual): attach to a run directory and follow it.

Everything shown comes from the run directory (``docs/run-directory.md``): ``metrics.jsonl`` (followed),
``train.log`` (followed), ``trainer.pid`` (is the trainer alive, whose CPU and memory to sample) and the
checkpoints (to generate text once the run has finished). The dashboard writes only control requests
(``control/generate``, ``control/stop``). When it launched the training itself (``child``), quitting stops
the run cleanly: ``control/stop`` plus SIGINT, then a bounded wait for the checkpoint to be written.

Keys: q quit, g generate now, p toggle log auto-scroll, arrows/page keys scroll the log.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import ClassVar

from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.events import Resize
from textual.widget import Widget
from textual.widgets import Footer, RichLog

from ..errors import AnetrainError
from . import panels
from .follow import TailReader
from .metrics import MetricsFollower
from .rundir import RunDir
from .state import RunState
from .sysmon import PowerReader, ProcessSampler

NARROW_COLS = 100  # below this many columns the panels stack
MAX_LOG_LINES = 5000


class Panel(Widget):
    """A bordered panel whose text is drawn by a function of its content size (re-drawn on refresh)."""

    DEFAULT_CSS = """
    Panel { border: round $primary-darken-1; padding: 0 1; text-wrap: nowrap; text-overflow: ellipsis; }
    """

    def __init__(self, draw, title: str, **kwargs) -> None:  # draw: (width, height) -> Text
        super().__init__(**kwargs)
        self._draw = draw
        self.border_title = title

    def render(self) -> Text:
        size = self.content_size
        return self._draw(max(1, size.width), max(1, size.height))

    def text(self) -> str:
        """The panel's current text, as shown (for tests and screenshots)."""
        return self.render().plain


def exit_status(returncode: int | None) -> int:
    """A shell-style status for a child's return code (128+N when killed by signal N)."""
    if returncode is None:
        return 0
    return 128 - returncode if returncode < 0 else returncode


class DashboardApp(App[int]):
    """The dashboard of one run directory; ``child`` is the training process when the dashboard owns it."""

    TITLE = "anetrain dashboard"
    ENABLE_COMMAND_PALETTE = False
    CSS = """
    Screen { layout: vertical; }
    #header { height: 2; padding: 0 1; background: $boost; }
    #body { height: 1fr; scrollbar-size-vertical: 1; }
    #top { height: 14; }
    #loss { width: 1fr; height: 100%; }
    #stats { width: 56; height: 100%; }
    #middle { height: 8; }
    #phases { width: 1fr; height: 100%; }
    #system { width: 1fr; height: 100%; }
    #sample { height: 5; text-wrap: wrap; }
    #log { height: 1fr; min-height: 8; border: round $primary-darken-1; padding: 0 1; scrollbar-size: 1 1; }
    .narrow #top, .narrow #middle { layout: vertical; height: auto; }
    .narrow #loss { width: 100%; height: 12; }
    .narrow #stats { width: 100%; height: auto; }
    .narrow #phases, .narrow #system { width: 100%; height: 9; }
    .narrow #log { height: 14; }
    """
    BINDINGS: ClassVar = [
        Binding("q", "quit_dashboard", "quit"),
        Binding("ctrl+c", "quit_dashboard", "quit", show=False, priority=True),
        Binding("g", "generate", "generate"),
        Binding("p", "toggle_autoscroll", "auto-scroll"),
        Binding("up", "scroll_log(-1)", "scroll", show=False),
        Binding("down", "scroll_log(1)", "scroll", show=False),
        Binding("pageup", "scroll_log(-10)", show=False),
        Binding("pagedown", "scroll_log(10)", show=False),
    ]

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        child: subprocess.Popen | None = None,
        poll_s: float = 0.5,
        system_s: float = 1.0,
        power: bool = True,
        stop_timeout_s: float = 120.0,
    ) -> None:
        super().__init__()
        self.run_dir = RunDir(run_dir)
        self.child = child
        self.poll_s = poll_s
        self.system_s = system_s
        self.stop_timeout_s = stop_timeout_s
        self.state = RunState()
        self.system_view = panels.SystemView()
        self.follower = MetricsFollower(self.run_dir.metrics)
        self.log_tail = TailReader(self.run_dir.log)
        self.power = PowerReader(enabled=power)
        if not power:
            self.system_view.power_source = "off"
        elif self.power.available:
            self.system_view.power_source = self.power.source
        else:
            self.system_view.power_source = "not available here"
        self.sampler: ProcessSampler | None = None
        self.sample_title = "Generated text"
        self.sample_text = Text("none yet: press g to generate", style="dim")
        self.generating = False
        self.stopping = False
        self._samples_shown = 0
        self._power_busy = threading.Lock()

    # ---- layout --------------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        # The widgets are kept as attributes: timers and threads reach them without a DOM query, which
        # would fail while the app is shutting down.
        self.w_header = Panel(self._draw_header, "", id="header")
        self.w_loss = Panel(self._draw_loss, "Loss", id="loss")
        self.w_stats = Panel(self._draw_stats, "Training stats", id="stats")
        self.w_phases = Panel(self._draw_phases, "Step phases (ms)", id="phases")
        self.w_system = Panel(self._draw_system, "System", id="system")
        self.w_sample = Panel(self._draw_sample, "Generated text", id="sample")
        self.w_log = RichLog(id="log", max_lines=MAX_LOG_LINES, wrap=False, auto_scroll=True)
        self.w_log.border_title = "Log"
        yield self.w_header
        with VerticalScroll(id="body"):
            with Horizontal(id="top") as self.w_top:
                yield self.w_loss
                yield self.w_stats
            with Horizontal(id="middle"):
                yield self.w_phases
                yield self.w_system
            yield self.w_sample
            yield self.w_log
        yield Footer()

    def on_mount(self) -> None:
        self.w_header.styles.border = ("none", "black")
        self._apply_size(self.size.width)
        self.poll_files()
        self.sample_system()
        self.set_interval(self.poll_s, self.poll_files)
        self.set_interval(self.system_s, self.sample_system)

    def on_resize(self, event: Resize) -> None:
        self._apply_size(event.size.width)

    def _apply_size(self, width: int) -> None:
        """Stack the panels on narrow terminals, the training stats first."""
        narrow = width < NARROW_COLS
        self.screen.set_class(narrow, "narrow")
        top, loss, stats = self.w_top, self.w_loss, self.w_stats
        first_is_stats = top.children[0] is stats
        if narrow and not first_is_stats:
            top.move_child(stats, before=loss)
        elif not narrow and first_is_stats:
            top.move_child(loss, before=stats)

    # ---- drawing -------------------------------------------------------------------------------------
    def _draw_header(self, width: int, height: int) -> Text:
        return panels.header(self.state, self.run_dir.name, self.status())

    def _draw_loss(self, width: int, height: int) -> Text:
        self.w_loss.border_subtitle = panels.loss_legend(self.state)
        if not self.run_dir.metrics.exists() and not self.state.records:
            return Text(f"waiting for {self.run_dir.metrics}…", style="dim")
        return panels.loss_chart(self.state, width, height)

    def _draw_stats(self, width: int, height: int) -> Text:
        return panels.stats(self.state, width)

    def _draw_phases(self, width: int, height: int) -> Text:
        return panels.phases(self.state, width)

    def _draw_system(self, width: int, height: int) -> Text:
        return panels.system(self.system_view, self.state, width)

    def _draw_sample(self, width: int, height: int) -> Text:
        self.w_sample.border_title = self.sample_title
        return self.sample_text

    def status(self) -> Text:
        """Live / finished / stopped, with the trainer's pid and heartbeat."""
        if self.stopping:
            return Text("■ stopping: writing a checkpoint… (q again: kill)", "bold yellow")
        if self.child is not None and self.child.poll() is not None:
            code = exit_status(self.child.returncode)
            return Text(f"■ training exited ({code})", "bold" if code == 0 else "bold red")
        pid = self.live_pid()
        if pid is not None:
            age = self.run_dir.heartbeat_age_s()
            beat = f", heartbeat {age:.0f}s ago" if age is not None and age >= 10 else ""
            return Text(f"● live (pid {pid}{beat})", "bold green")
        if self.state.complete:
            return Text("■ finished", "bold")
        if self.state.finished:
            return Text(f"■ stopped at step {self.state.step} (resumable)", "bold yellow")
        if not self.state.records:
            return Text("… waiting for metrics", "dim")
        return Text("■ not running", "bold yellow")

    def live_pid(self) -> int | None:
        """The running trainer's pid: from trainer.pid, else our child while it runs."""
        pid = self.run_dir.trainer_pid()
        if pid is None and self.child is not None and self.child.poll() is None:
            pid = self.child.pid
        return pid

    # ---- following the run ---------------------------------------------------------------------------
    def poll_files(self) -> int:
        """Read new metrics records and log lines, redraw what changed; returns how many records came."""
        records = self.follower.poll()
        if records:
            self.state.apply_all(records)
            if self.state.samples_seen != self._samples_shown and self.state.last_sample is not None:
                self._samples_shown = self.state.samples_seen
                s = self.state.last_sample
                self.set_sample(f"Generated text (step {s.get('step')})", Text(s["text"]))
            for w in (self.w_loss, self.w_stats, self.w_phases):
                w.refresh()
        lines = self.log_tail.read_lines()
        if lines:
            log = self.w_log
            for raw in lines:
                line = raw.decode("utf-8", errors="replace").rstrip("\r")
                log.write(Text(line, style=panels.log_line_style(line)))
        self.w_header.refresh()
        return len(records)

    def sample_system(self) -> None:
        """CPU and RSS of the live trainer (psutil, cheap); power on a worker thread (may take a second)."""
        pid = self.live_pid()
        if pid is None:
            self.sampler = None
            self.system_view.process = ""
        else:
            if self.sampler is None or self.sampler.pid != pid:
                self.sampler = ProcessSampler(pid)
            sample = self.sampler.sample()
            if sample is not None:
                self.system_view.cpu.append(sample.cpu_percent)
                self.system_view.rss_mb.append(sample.rss_mb)
                self.system_view.process = f"trainer pid {pid}"
        if self.power.available and self._power_busy.acquire(blocking=False):
            threading.Thread(target=self._read_power, daemon=True).start()
        self.w_system.refresh()

    def _read_power(self) -> None:
        try:
            watts = self.power.read()
        finally:
            self._power_busy.release()
        if watts:
            self._from_thread(self._got_power, watts)
        elif not self.power.available:
            self.system_view.power_source = f"n/a: {self.power.source} gave no reading"

    def _from_thread(self, fn, *args) -> None:
        """Run ``fn(*args)`` on the app's thread; dropped when the app has already closed."""
        with contextlib.suppress(RuntimeError):
            self.call_from_thread(fn, *args)

    def _got_power(self, watts: dict[str, float]) -> None:
        self.system_view.power_detail = watts
        self.system_view.power_w.append(sum(watts.values()))

    def set_sample(self, title: str, text: Text) -> None:
        self.sample_title, self.sample_text = title, text
        self.w_sample.refresh()

    # ---- keys ----------------------------------------------------------------------------------------
    def action_scroll_log(self, lines: int) -> None:
        log = self.w_log
        log.scroll_to(y=log.scroll_y + lines, animate=False)

    def action_toggle_autoscroll(self) -> None:
        log = self.w_log
        log.auto_scroll = not log.auto_scroll
        if log.auto_scroll:
            log.scroll_end(animate=False)
        self.notify(f"log auto-scroll {'on' if log.auto_scroll else 'off'}")

    def action_generate(self) -> None:
        """Ask the live trainer for a sample, or generate from the newest checkpoint of a stopped run."""
        if self.live_pid() is not None:
            try:
                self.run_dir.request("generate")
            except AnetrainError as e:
                self.notify(str(e), severity="error")
                return
            self.set_sample(
                f"Generated text (requested at step {self.state.step})",
                Text("waiting for the trainer's sample…", style="dim"),
            )
            return
        if self.generating:
            self.notify("already generating")
            return
        self.generating = True
        self.set_sample("Generated text", Text("generating from the newest checkpoint…", style="dim"))
        threading.Thread(target=self._generate_offline, daemon=True).start()

    def _generate_offline(self) -> None:
        from .sampling import generate_from_checkpoint

        try:
            sample = generate_from_checkpoint(self.run_dir)
            title = (
                f"Generated text (checkpoint {sample.checkpoint.name}, step {sample.step}, "
                f"{sample.tokens_per_s:.0f} tok/s)"
            )
            text = Text(sample.text)
        except AnetrainError as e:
            title, text = "Generated text", Text(f"cannot generate: {e}", style="red")
        except Exception as e:  # a bug in generation must not take the dashboard down
            title, text = "Generated text", Text(f"generation failed: {type(e).__name__}: {e}", style="red")
        self._from_thread(self._generated, title, text)

    def _generated(self, title: str, text: Text) -> None:
        self.generating = False
        self.set_sample(title, text)

    def action_quit_dashboard(self) -> None:
        """Quit; a training run this dashboard launched is first stopped with a checkpoint."""
        child = self.child
        if child is None or child.poll() is not None:
            self.exit(exit_status(child.returncode if child else None))
            return
        if self.stopping:  # second q: do not wait for the checkpoint
            child.kill()
            child.wait()
            self.exit(exit_status(child.returncode))
            return
        self.stopping = True
        self.w_header.refresh()
        threading.Thread(target=self._stop_child_then_exit, daemon=True).start()

    def _stop_child_then_exit(self) -> None:
        code = stop_child(self.run_dir, self.child, self.stop_timeout_s)
        self._from_thread(self.exit, code)


def stop_child(run: RunDir, child: subprocess.Popen, timeout_s: float) -> int:
    """Ask a training child to checkpoint and stop (control/stop + SIGINT); wait, then force if needed."""
    if child.poll() is None:
        with contextlib.suppress(AnetrainError):  # the signal alone is enough
            run.request("stop")
        try:
            child.send_signal(signal.SIGINT)
            child.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            child.terminate()
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        except ProcessLookupError:
            pass
    return exit_status(child.poll())


def run_dashboard(
    run_dir: str | os.PathLike[str],
    child: subprocess.Popen | None = None,
    power: bool = True,
    stop_timeout_s: float = 120.0,
) -> int:
    """Show the dashboard until the user quits; the exit status is the child's (0 without a child).

    For ``anetrain train --dashboard``: the trainer starts the same command as ``child`` (stdout and stderr
    to RUN_DIR/train.log) and calls this. Without a child the run directory must exist already.
    """
    if child is None:
        RunDir.existing(run_dir)
    app = DashboardApp(run_dir, child=child, power=power, stop_timeout_s=stop_timeout_s)
    try:
        code = app.run()
    finally:
        if child is not None and child.poll() is None:  # the app ended some other way: still stop cleanly
            stop_child(RunDir(run_dir), child, stop_timeout_s)
    if child is not None:
        return exit_status(child.poll())
    return int(code or 0)


def screenshot(
    run_dir: str | os.PathLike[str],
    size: tuple[int, int] = (120, 40),
    settle_s: float = 0.3,
    power: bool = False,
) -> str:
    """An SVG of the dashboard on ``run_dir`` rendered headless at ``size`` (columns, rows).

    ``settle_s`` is how long it runs before the picture is taken (the system panel samples once a second).
    """
    import asyncio

    RunDir.existing(run_dir)

    async def shoot() -> str:
        app = DashboardApp(run_dir, power=power)
        async with app.run_test(size=size) as pilot:
            while app.poll_files():  # catch up with a long metrics file
                pass
            await pilot.pause(settle_s)
            return app.export_screenshot(title=f"anetrain dashboard: {Path(run_dir).name}")

    return asyncio.run(shoot())


__all__ = ["DashboardApp", "run_dashboard", "screenshot", "stop_child"]
