"""Crash safety with real processes: kill -9 at random moments and in the middle of checkpoint writes, and
SIGTERM / SIGINT / control/stop, each followed by a resume."""

from __future__ import annotations

import os
import pty
import random
import select
import signal
import subprocess
import sys
import time

import pytest

from anetrain.checkpoint import find_checkpoint, load_checkpoint, verify_checkpoint
from anetrain.distributed import World
from anetrain.train.stop import StopController
from helpers.train import (
    LARGER,
    dirs,
    kill9,
    n_step_records,
    records,
    resume_argv,
    run_cli,
    spawn,
    step_values,
    train_argv,
    valid_head_tokens,
    wait_until,
    write_model,
)

FOREVER = 1_000_000  # --steps for runs that are stopped from outside


def _check_resumable(run):
    """find_checkpoint names a checkpoint that verifies and loads completely; its step."""
    found = find_checkpoint(run)
    assert found is not None, sorted(p.name for p in (run / "checkpoints").iterdir())
    ckpt = load_checkpoint(found)
    assert ckpt.optimizer is not None and ckpt.optimizer.t == ckpt.step
    assert found.name == f"step_{ckpt.step:08d}"
    return ckpt.step


@pytest.mark.slow
def test_kill_9_at_random_moments_leaves_a_resumable_checkpoint(tmp_path):
    rng = random.Random(20240520)
    run, log = tmp_path / "r", tmp_path / "train.log"
    argv = train_argv(
        write_model(tmp_path), valid_head_tokens(), run, steps=FOREVER, ckpt_every=5, eval_every=0
    )
    step = 0
    for attempt in range(3):
        proc = spawn(argv if attempt == 0 else resume_argv(run), tmp_path, log)
        before = n_step_records(run)
        wait_until(lambda b=before: n_step_records(run) > b and find_checkpoint(run) is not None, proc, log)
        time.sleep(rng.uniform(0.0, 0.3))
        assert kill9(proc) == -signal.SIGKILL
        now = _check_resumable(run)
        assert now >= step
        step = now
    res = run_cli(resume_argv(run, stop_at=step + 2))
    assert res.rc == 0, res.err
    assert f"resuming from {run / 'checkpoints' / f'step_{step:08d}'} (step {step})" in res.err
    assert verify_checkpoint(find_checkpoint(run))["step"] == step + 2
    assert records(run, "run")[-1]["start_step"] == step


@pytest.mark.slow
def test_kill_9_during_checkpoint_writes_keeps_a_complete_checkpoint(tmp_path):
    """A larger model, a checkpoint after every step (most of the wall time is spent writing them), killed
    repeatedly: at a random sub-second moment, or just after a temporary checkpoint directory appears, until
    at least one kill has landed in the middle of a checkpoint write (a half-written directory is left)."""
    rng = random.Random(7)
    run, log = tmp_path / "r", tmp_path / "train.log"
    root = run / "checkpoints"
    model = write_model(tmp_path, "larger", **LARGER)
    argv = train_argv(model, valid_head_tokens(), run, steps=FOREVER, ckpt_every=1, eval_every=0)
    step, kills, torn = 0, 0, 0
    while kills < 3 or (torn == 0 and kills < 8):
        proc = spawn(argv if kills == 0 else resume_argv(run), tmp_path, log)
        before = n_step_records(run)
        wait_until(lambda b=before: n_step_records(run) > b and find_checkpoint(run) is not None, proc, log)
        if kills % 2:
            wait_until(lambda: bool(dirs(root, ".tmp-")), proc, log)
            time.sleep(rng.uniform(0.0, 0.005))
        else:
            time.sleep(rng.uniform(0.0, 0.5))
        kill9(proc)
        kills += 1
        torn += bool(dirs(root, ".tmp-"))  # the killed process was writing a checkpoint
        now = _check_resumable(run)
        assert now >= step
        step = now
    assert torn >= 1, f"none of {kills} kills landed in the middle of a checkpoint write"
    res = run_cli(resume_argv(run, stop_at=step + 1))
    assert res.rc == 0, res.err
    assert verify_checkpoint(find_checkpoint(run))["step"] == step + 1
    assert dirs(root, ".tmp-") == [] and dirs(root, ".old-") == []  # strays of the killed processes are gone


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_checkpoints_exits_and_resumes(tmp_path, sig, code):
    run, log = tmp_path / "r", tmp_path / "train.log"
    argv = train_argv(
        write_model(tmp_path), valid_head_tokens(), run, steps=FOREVER, ckpt_every=10_000, eval_every=0
    )
    proc = spawn(argv, tmp_path, log)
    wait_until(lambda: n_step_records(run) >= 3, proc, log)
    proc.send_signal(sig)
    assert proc.wait(timeout=60) == code, log.read_text()
    last = max(step_values(run, "loss"))
    ckpt = records(run, "checkpoint")[-1]
    assert (ckpt["step"], ckpt["kind"]) == (last, "interrupt")
    manifest = verify_checkpoint(find_checkpoint(run))
    assert (manifest["step"], manifest["kind"]) == (last, "interrupt")
    text = log.read_text()
    assert sig.name in text and f"--resume {run}" in text
    assert "Traceback" not in text
    assert (run / "report.json").exists() and not (run / "trainer.pid").exists()
    assert not (run / "trainer.lock").exists()
    res = run_cli(resume_argv(run, stop_at=last + 2))
    assert res.rc == 0, res.err
    assert list(step_values(run, "loss"))[-3:] == [last, last + 1, last + 2]


def test_sigterm_is_honoured_between_the_micro_steps_of_a_long_accumulation(tmp_path):
    """--accum 10^9 makes one step last for ever: SIGTERM still stops the trainer within a micro-step, with
    a checkpoint of the last whole step (here: none was taken, step 0) whose sampler is where that step
    began, so a resume draws the same windows."""
    run, log = tmp_path / "r", tmp_path / "train.log"
    argv = train_argv(write_model(tmp_path), valid_head_tokens(), run, steps=2, accum=10**9, eval_every=0)
    proc = spawn(argv, tmp_path, log)
    try:
        metrics = run / "metrics.jsonl"
        wait_until(lambda: metrics.exists() and b'"type":"compile"' in metrics.read_bytes(), proc, log)
        time.sleep(0.5)  # well inside the first step's micro-steps
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 143, log.read_text()
    finally:
        if proc.poll() is None:
            kill9(proc)
    manifest = verify_checkpoint(find_checkpoint(run))
    assert (manifest["step"], manifest["kind"]) == (0, "interrupt")
    assert manifest["sampler"]["drawn"] == 0
    assert records(run, "step") == []


def test_closing_the_terminal_checkpoints_and_exits_129(tmp_path):
    """SIGHUP, as when the terminal the trainer runs in is closed (its writes to the terminal then fail with
    EIO): a checkpoint as for SIGTERM, exit status 129, no pid or lock file left, train.log complete."""
    run = tmp_path / "r"
    argv = train_argv(
        write_model(tmp_path), valid_head_tokens(), run, steps=FOREVER, ckpt_every=10_000, eval_every=0
    )
    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k not in ("ANETRAIN_DEBUG", "ANETRAIN_STDERR_IS_LOG")}
    env["XDG_CACHE_HOME"] = str(tmp_path / ".cache")
    proc = subprocess.Popen(
        [sys.executable, "-m", "anetrain", *argv],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        cwd=tmp_path,
        env=env,
        start_new_session=True,
    )
    os.close(slave)
    try:
        deadline = time.monotonic() + 60
        while n_step_records(run) < 3:  # read the terminal meanwhile, so the trainer never waits on it
            assert proc.poll() is None and time.monotonic() < deadline, "the trainer did not start"
            if select.select([master], [], [], 0.05)[0]:
                os.read(master, 65536)
        os.close(master)  # the terminal is gone: writes to it fail from now on
        proc.send_signal(signal.SIGHUP)
        assert proc.wait(timeout=60) == 129
    finally:
        if proc.poll() is None:
            kill9(proc)
    last = max(step_values(run, "loss"))
    manifest = verify_checkpoint(find_checkpoint(run))
    assert (manifest["step"], manifest["kind"]) == (last, "interrupt")
    log = (run / "train.log").read_text("utf-8")
    assert f"SIGHUP: checkpointing at step {last}" in log and "=== Efficiency Report ===" in log
    assert "Traceback" not in log
    assert not (run / "trainer.pid").exists() and not (run / "trainer.lock").exists()


def test_control_stop_file_checkpoints_and_stops_like_sigint(tmp_path):
    run = tmp_path / "r"
    (run / "control").mkdir(parents=True)
    (run / "control" / "stop").touch()
    res = run_cli(train_argv(write_model(tmp_path), valid_head_tokens(), run, steps=50, eval_every=0))
    assert res.rc == 130
    assert not (run / "control" / "stop").exists()
    assert verify_checkpoint(find_checkpoint(run))["kind"] == "interrupt"
    assert list(step_values(run, "loss")) == [1]


def test_the_dashboards_stop_file_and_sigint_together_are_one_request(tmp_path):
    """The dashboard's q writes control/stop and sends SIGINT: a signal after the stop file is the same
    request (training still checkpoints), while a second signal stops at once."""
    lines: list[str] = []
    stop = StopController(World(), tmp_path, lines.append)
    (tmp_path / "control").mkdir()
    (tmp_path / "control" / "stop").touch()
    stop.poll_control_file()
    assert stop.signal == signal.SIGINT and not (tmp_path / "control" / "stop").exists()
    with stop.watching_signals():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs in this (the main) thread
        assert stop.signal == signal.SIGINT
        assert lines == ["SIGINT received: finishing this step, then checkpointing"]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
