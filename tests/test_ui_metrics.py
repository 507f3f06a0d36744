"""The metrics reader, run state, formatting, text charts, run-directory queries and system sampling."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from anetrain.errors import InputError
from anetrain.ui import fmt
from anetrain.ui.charts import ChartMark, ChartSeries, axis_label, hbar, line_chart, spark
from anetrain.ui.follow import TailReader
from anetrain.ui.metrics import MetricsFollower, read_metrics
from anetrain.ui.rundir import RunDir
from anetrain.ui.state import RunState
from anetrain.ui.sysmon import (
    PowerReader,
    ProcessSampler,
    parse_nvidia_smi,
    parse_powermetrics,
    run_quietly,
)
from helpers.run_dir import PHASE_MS, TOKENS_PER_STEP, RunWriter, best_train, fixture_loss, make_run

# ---- the follower -----------------------------------------------------------------------------------


def test_follower_returns_each_record_once_as_the_file_grows(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    f = MetricsFollower(path)
    assert f.poll() == []  # no file yet: nothing, no error
    path.write_text('{"type": "run", "steps": 10}\n{"type": "step", "step": 1, "loss": 9.5}\n')
    assert [r["type"] for r in f.poll()] == ["run", "step"]
    assert f.poll() == []
    with open(path, "a") as fh:
        fh.write('{"type": "step", "step": 2, "loss": 9.1}\n')
    assert [r["step"] for r in f.poll()] == [2]


def test_follower_holds_a_truncated_last_line_until_it_completes(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"type": "step", "step": 1, "loss": 9.5}\n{"type": "step", "st')
    f = MetricsFollower(path)
    assert [r["step"] for r in f.poll()] == [1]
    assert f.has_partial_line()
    assert f.poll() == []
    with open(path, "a") as fh:
        fh.write('ep": 2, "loss": 9.0}\n')
    assert [r["step"] for r in f.poll()] == [2]
    assert not f.has_partial_line()
    assert f.bad_lines == 0


def test_follower_accepts_a_complete_last_line_without_newline_once(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"type": "report", "total_steps": 5}')
    f = MetricsFollower(path)
    assert [r["type"] for r in f.poll()] == ["report"]
    with open(path, "a") as fh:
        fh.write('\n{"type": "step", "step": 6}\n')
    assert [r["type"] for r in f.poll()] == ["step"]  # the report is not repeated


def test_follower_skips_garbage_and_keeps_unknown_types(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(
        b'not json\n[1, 2]\n{"no_type": 1}\n\xff\xfe\n\n'
        b'{"type": "future_kind", "x": 1}\n{"type": "step", "step": 3}\n'
    )
    f = MetricsFollower(path)
    assert [r["type"] for r in f.poll()] == ["future_kind", "step"]
    assert f.bad_lines == 4


def test_follower_starts_over_when_the_file_is_replaced_or_truncated(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"type": "step", "step": 1}\n{"type": "step", "step": 2}\n')
    f = MetricsFollower(path)
    assert len(f.poll()) == 2
    path.write_text('{"type": "step", "step": 7}\n')  # truncated in place (shorter)
    assert [r["step"] for r in f.poll()] == [7]
    tmp = tmp_path / "new"
    tmp.write_text('{"type": "step", "step": 8}\n{"type": "step", "step": 9}\n')
    os.replace(tmp, path)  # a new file (new inode)
    assert [r["step"] for r in f.poll()] == [8, 9]


def test_follower_catches_up_in_bounded_reads(tmp_path: Path) -> None:
    make_run(tmp_path, steps_done=200)
    f = MetricsFollower(tmp_path / "metrics.jsonl", max_bytes=4096)
    total, polls = 0, 0
    while batch := f.poll():
        total += len(batch)
        polls += 1
    assert total == len(read_metrics(tmp_path / "metrics.jsonl"))
    assert polls > 10


def test_tail_reader_returns_complete_lines_only(tmp_path: Path) -> None:
    path = tmp_path / "train.log"
    r = TailReader(path)
    assert r.read_lines() == []
    path.write_bytes(b"one\ntwo\nthr")
    assert r.read_lines() == [b"one", b"two"]
    with open(path, "ab") as fh:
        fh.write(b"ee\n")
    assert r.read_lines() == [b"three"]


# ---- the run state ----------------------------------------------------------------------------------


def test_run_state_tracks_progress_best_losses_and_rates(tmp_path: Path) -> None:
    make_run(tmp_path, steps_done=120, total=1000, ms=50.0)
    st = RunState()
    st.apply_all(read_metrics(tmp_path / "metrics.jsonl"))
    assert st.step == 120 and st.total_steps == 1000
    best, best_step = best_train(120)
    assert st.best_train.value == pytest.approx(best) and st.best_train.step == best_step
    assert st.best_val.value == pytest.approx(min(fixture_loss(50), fixture_loss(100)) + 0.1)
    assert len(st.val_loss) == 2
    assert st.ms_per_step() == pytest.approx(50.0)
    assert st.seconds_per_step() == pytest.approx(0.05)
    assert st.eta_s() == pytest.approx(880 * 0.05)
    assert st.compile_s == pytest.approx(2.5)
    assert st.last_sample is not None and st.last_sample["step"] == 100
    assert set(st.mean_phases()) == {"forward", "backward_dx", "dw", "optimizer", "io", "wait"}
    assert not st.finished


def test_run_state_drops_redone_steps_on_resume_and_keeps_wall_time_running(tmp_path: Path) -> None:
    w = RunWriter(tmp_path)
    w.run(steps=200)
    for s in range(1, 151):
        w.step(s, ms=10.0, loss=5.0 if s != 140 else 1.0)  # best at 140, lost by the crash
    w.elapsed = 0.0  # a new process
    w.run(steps=200, start_step=100, resumed=True)
    for s in range(101, 121):
        w.step(s, ms=10.0, loss=4.0)
    st = RunState()
    st.apply_all(read_metrics(w.metrics))
    assert list(st.train_loss.step) == [float(s) for s in [*range(1, 101), *range(101, 121)]]
    assert st.best_train.value == 4.0 and st.best_train.step == 101
    wall = st.train_loss.wall_s
    assert all(b > a for a, b in itertools.pairwise(wall))  # monotonic across the restart
    assert wall[-1] == pytest.approx(1.5 + 0.2)


def test_run_state_ignores_broken_fields() -> None:
    st = RunState()
    st.apply_all(
        [
            {"type": "step", "step": "x", "loss": 1.0},
            {"type": "step", "step": 1, "loss": None, "ms": float("nan"), "phases": "bad"},
            {"type": "eval", "step": 1},
            {"type": "sample", "text": 5},
            {"type": "whatever"},
        ]
    )
    assert st.step == 1 and len(st.train_loss) == 0 and st.last_eval is None and st.last_sample is None
    assert st.eta_s() is None


# ---- formatting and charts ----------------------------------------------------------------------------


def test_formatting() -> None:
    assert fmt.duration(4.24) == "4.2s"
    assert fmt.duration(125) == "2:05"
    assert fmt.duration(3723) == "1:02:03"
    assert fmt.duration(None) == "n/a"
    assert fmt.si(35210) == "35.2k"
    assert fmt.si(1.5e6) == "1.50M"
    assert fmt.si(812) == "812"
    assert fmt.percent(0.031) == "3.1%"


def test_line_chart_draws_a_braille_diagonal_with_axis_labels() -> None:
    text = line_chart([ChartSeries([0, 1], [0, 1])], width=8 + 1 + 2, height=2)
    lines = text.plain.split("\n")
    # 2 cells wide x 1 row of plot = 4 x 4 dots; the line from bottom-left to top-right:
    # cell 0 holds dots (x0,y3),(x1,y2) -> 0x40|0x20; cell 1 holds (x2,y1),(x3,y0) -> 0x02|0x08
    assert lines[0] == "       1┤" + chr(0x2800 + 0x60) + chr(0x2800 + 0x0A)
    assert lines[1].split() == ["0", "1"]


def test_line_chart_marks_a_point_and_handles_flat_and_empty_data() -> None:
    t = line_chart([ChartSeries([1, 2, 3], [2.0, 2.0, 2.0])], 30, 6, marks=[ChartMark(3, 2.0, "●")])
    lines = t.plain.split("\n")
    assert lines[0].startswith("   2.500┤") and lines[4].startswith("   1.500┤")  # a flat line gets +-0.5
    assert lines[2].startswith("       2┤⠤") and lines[2].endswith("●")
    assert line_chart([ChartSeries([], [])], 30, 6).plain == "no data yet"


def test_line_chart_averages_long_series_per_column() -> None:
    n = 200_000
    t0 = time.perf_counter()
    t = line_chart([ChartSeries(range(n), [float(i % 7) for i in range(n)])], 60, 10)
    assert time.perf_counter() - t0 < 2.0
    assert len(t.plain.split("\n")) == 10


def test_bars_and_sparklines() -> None:
    assert hbar(5, 10, 4) == "██  "
    assert hbar(8, 8, 1) == "█"
    assert hbar(1, 8, 1) == "▏"
    assert hbar(1, 2, 1) == "▌"
    assert hbar(0, 0, 3) == "   "
    assert spark([0, 50, 100], 10, 0, 100) == "▁▅█"
    assert spark([1, 2, 3, 4], 2) == "▁█"
    assert axis_label(1234.5678) == "1235"
    assert axis_label(420.0) == "420"


# ---- the run directory ---------------------------------------------------------------------------------


def test_trainer_pid_is_live_only_while_the_process_exists(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    assert run.trainer_pid() is None
    (tmp_path / "trainer.pid").write_text(f"{os.getpid()}\n")
    assert run.trainer_pid() == os.getpid()
    assert run.heartbeat_age_s() is not None and run.heartbeat_age_s() < 60
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "trainer.pid").write_text(f"{dead.pid}\n")
    assert run.trainer_pid() is None
    (tmp_path / "trainer.pid").write_text("garbage")
    assert run.trainer_pid() is None


def test_control_requests_are_files(tmp_path: Path) -> None:
    RunDir(tmp_path).request("generate")
    assert (tmp_path / "control" / "generate").is_file()


def test_existing_run_dir_and_bad_config(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such run directory"):
        RunDir.existing(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a directory"):
        RunDir.existing(tmp_path / "file")
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(InputError, match=r"config\.json: not valid JSON"):
        RunDir(tmp_path).config()


# ---- system sampling -----------------------------------------------------------------------------------


def test_process_sampler_reports_rss_of_a_live_process_and_none_after_exit() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(64 << 20); time.sleep(30)"])
    try:
        sampler = ProcessSampler(child.pid)
        deadline = time.time() + 20
        sample = sampler.sample()
        while sample is not None and sample.rss_mb < 64 and time.time() < deadline:
            time.sleep(0.1)
            sample = sampler.sample()
        assert sample is not None and sample.rss_mb >= 64
    finally:
        child.kill()
        child.wait()
    assert sampler.sample() is None


def test_power_parsers() -> None:
    text = (
        "CPU Power: 4200 mW\nGPU Power: 150 mW\nANE Power: 1234 mW\n"
        "Combined Power (CPU + GPU + ANE): 5584 mW\n"
    )
    assert parse_powermetrics(text) == {"CPU": 4.2, "GPU": 0.15, "ANE": 1.234}
    assert parse_nvidia_smi("71.53 W\n68.20 W\n") == {"GPU": pytest.approx(139.73)}
    assert parse_nvidia_smi("[N/A]\n") == {}


def test_subprocesses_time_out_instead_of_hanging() -> None:
    t0 = time.monotonic()
    assert run_quietly([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.5) is None
    assert time.monotonic() - t0 < 10
    assert run_quietly(["/nonexistent/binary"]) is None
    assert run_quietly([sys.executable, "-c", "print('ok')"]) == "ok\n"


def test_power_reader_turns_itself_off_after_a_failure() -> None:
    reader = PowerReader(enabled=False)
    assert reader.read() is None and not reader.available
    reader = PowerReader(enabled=True)
    reader.available, reader._read = True, lambda: None  # a source that gives no reading
    assert reader.read() is None
    assert not reader.available


# ---- the fixture builder -----------------------------------------------------------------------------


def test_fixture_run_reads_back_with_the_contract_fields(tmp_path: Path) -> None:
    make_run(tmp_path / "r", steps_done=120, total=1000)
    records = read_metrics(tmp_path / "r" / "metrics.jsonl")
    kinds = [r["type"] for r in records]
    assert kinds.count("step") == 120
    assert kinds.count("eval") == 2
    assert kinds[0] == "run"
    step = next(r for r in records if r["type"] == "step")
    assert set(PHASE_MS) <= set(step["phases"])
    assert step["tokens"] == TOKENS_PER_STEP
