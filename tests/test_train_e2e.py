"""The paths a user runs, end to end: ``anetrain train`` with no data (the embedded default), fp16 training
with its loss scaler, the dashboard's control files on a live trainer, and ``anetrain train --dashboard``."""

from __future__ import annotations

import bz2
import json
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from fcntl import ioctl
from pathlib import Path

import pytest

from anetrain.checkpoint import find_checkpoint, verify_checkpoint
from anetrain.data.embedded import EXCERPT, cache_dir, clean_tinystories
from helpers.data import shared_file
from helpers.train import (
    OPTIMIZED_FP32,
    records,
    run_cli,
    spawn,
    step_values,
    train_argv,
    valid_head_tokens,
    wait_until,
    write_model,
)

FOREVER = 1_000_000


# ---- the embedded default ----------------------------------------------------------------------------------


def test_embedded_default_unpacks_its_text_trains_reports_and_tells_a_story(tmp_path, monkeypatch):
    """`anetrain train` with no --data: the TinyStories excerpt is unpacked, a tokenizer trained on it, the
    text tokenized, stories260K trained and evaluated, the Efficiency Report written and a story generated;
    the result on stdout. The same code path as a user's first run, with fewer and smaller steps (options the
    test gives)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    small = ["--steps", "24", "--batch", "4", "--seq", "64", "--warmup", "4", "--eval-batches", "4"]
    small += ["--sample-tokens", "60", "--peak-tflops", "1", "--threads", "1"]
    res = run_cli(["train", "--out", str(run), *small])
    assert res.rc == 0, res.err
    data = cache_dir()
    assert data == tmp_path / "cache" / "anetrain" / "embedded-v2-tinystories-vocab512"
    corpus = (data / "stories.txt").read_text("ascii")
    assert corpus == bz2.decompress(EXCERPT.read_bytes()).decode("ascii")
    assert corpus.startswith("Spot. Spot saw the shiny car and said,") and corpus.count("\n\n") == 4300 - 1
    sidecar = json.loads((data / "stories.bin.json").read_text("utf-8"))
    assert sidecar["n_documents"] == 4300
    assert sidecar["n_tokens"] == (data / "stories.bin").stat().st_size // 2 > 300_000
    assert (data / "tok512.bin").stat().st_size > 0 and (data / "tok512.model").stat().st_size > 0
    config = json.loads((run / "config.json").read_text("utf-8"))
    assert config["data"] == str(data / "stories.bin") and config["tokenizer"] == str(data / "tok512.bin")
    assert config["train"]["model"] == "stories260K" and config["train"]["lr"] == 2e-3  # embedded settings
    (rec,) = records(run, "run")
    described = (rec["model_name"], rec["pipeline"], rec["batch"], rec["seq"])
    assert described == ("stories260K", "optimized", 4, 64)
    evals = records(run, "eval")
    assert [e["step"] for e in evals] == [0, 24]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.3  # it learned something in 24 steps
    (sample,) = records(run, "sample")
    assert sample["step"] == 24 and sample["text"].strip()
    # decoded by the tokenizer trained on the corpus (24 steps in, byte pieces may not form UTF-8 yet)
    assert {c for c in sample["text"] if c.isprintable() and c != "\ufffd"} <= set(corpus)
    report = json.loads((run / "report.json").read_text("utf-8"))
    assert report["total_steps"] == 24 and report["final_loss"] == step_values(run, "loss")[24]
    assert verify_checkpoint(find_checkpoint(run))["kind"] == "final"
    assert "unpacking the embedded TinyStories excerpt (CDLA-Sharing-1.0)" in res.err
    for line in ("=== Efficiency Report ===", "sample at step 24:", f"run directory: {run}"):
        assert line in res.out
    again = run_cli(["train", "--out", str(tmp_path / "again"), *small, "--steps", "1", "--eval-every", "0"])
    assert again.rc == 0, again.err
    assert "unpacking" not in again.err and "tokenized" not in again.err  # the cached data is reused


def test_the_embedded_excerpt_is_the_shared_tinystories_text_cleaned():
    """The shipped excerpt is reproducible: clean_tinystories of the source (TINYSTORIES-NOTICE.md)."""
    source = shared_file("tinystories_valid_head.txt").read_text("utf-8")
    assert bz2.decompress(EXCERPT.read_bytes()).decode("ascii") == clean_tinystories(source)
    notice = (EXCERPT.parent / "TINYSTORIES-NOTICE.md").read_text("utf-8")
    assert "CDLA-Sharing-1.0" in notice and "https://cdla.dev/sharing-1-0/" in notice


# ---- fp16 and its loss scaler ------------------------------------------------------------------------------


def test_fp16_loss_scaling_scales_the_gradients_and_skips_overflowing_steps(tmp_path):
    """fp16 through the trainer: the loss scale multiplies the backward and is removed before the norm, so the
    gradient norm matches an fp32 run's; a scale so large that the gradients overflow skips the update (the
    optimizer's step count says so) and halves the scale until the gradients fit."""
    model, data = write_model(tmp_path), valid_head_tokens()
    common = {"steps": 4, "eval_every": 0, "sampler": "drand48"}
    assert run_cli(train_argv(model, data, tmp_path / "fp32", **OPTIMIZED_FP32, **common)).rc == 0
    res = run_cli(train_argv(model, data, tmp_path / "fp16", dtype="fp16", **common))
    assert res.rc == 0, res.err
    (run,) = records(tmp_path / "fp16", "run")
    assert run["precision"] == "fp16"
    fp16, fp32 = records(tmp_path / "fp16", "step"), records(tmp_path / "fp32", "step")
    assert [r["loss_scale"] for r in fp16] == [32768.0] * 4 and not any(r["skipped"] for r in fp16)
    for a, b in zip(fp16, fp32, strict=True):
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=2e-2)  # not 32768x, not 1/32768x
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-2)

    run_dir = tmp_path / "overflow"
    res = run_cli(train_argv(model, data, run_dir, dtype="fp16", loss_scale=2.0**24, steps=12, eval_every=0))
    assert res.rc == 0, res.err
    steps = records(run_dir, "step")
    skipped = [r["step"] for r in steps if r["skipped"]]
    assert skipped and skipped == list(range(1, len(skipped) + 1)) and len(skipped) < 12
    for r in steps[: len(skipped)]:
        assert r["grad_norm"] is None  # not finite (written as null)
        assert r["loss_scale"] == 2.0**24 / 2 ** r["step"]  # halved at every overflow
    after = steps[len(skipped) :]
    assert all(r["loss_scale"] == 2.0**24 / 2 ** len(skipped) and r["grad_norm"] > 0 for r in after)
    manifest = verify_checkpoint(find_checkpoint(run_dir))
    assert manifest["adam_t"] == 12 - len(skipped)  # the skipped steps did not update
    assert manifest["loss_scaler"]["skipped"] == len(skipped)


# ---- the dashboard's control files on a live trainer -------------------------------------------------------


def test_control_generate_makes_a_live_trainer_write_a_sample_and_control_stop_ends_it(tmp_path):
    """What the dashboard does (g, q): RUN_DIR/control/generate makes the running trainer write a "sample"
    record with its current weights; RUN_DIR/control/stop makes it checkpoint and exit as SIGINT does."""
    run, log = tmp_path / "r", tmp_path / "train.log"
    tok = shared_file("tok512.bin")
    argv = train_argv(write_model(tmp_path), valid_head_tokens(), run, steps=FOREVER, eval_every=0)
    proc = spawn([*argv, "--tokenizer", str(tok), "--sample-tokens", "40"], tmp_path, log)
    try:
        wait_until(lambda: len(step_values_safe(run)) >= 2, proc, log)
        (run / "control").mkdir(exist_ok=True)
        asked_after = max(step_values_safe(run))
        (run / "control" / "generate").touch()
        wait_until(lambda: bool(records_safe(run, "sample")), proc, log)
        assert not (run / "control" / "generate").exists()  # the request was taken
        (run / "control" / "stop").touch()
        assert proc.wait(timeout=60) == 130, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    (sample,) = records(run, "sample")
    assert sample["step"] >= asked_after and len(sample["text"]) > 20
    assert f"sample at step {sample['step']}:" in log.read_text()
    last = records(run, "checkpoint")[-1]
    assert last["kind"] == "interrupt" and last["step"] == max(step_values(run, "loss"))
    assert not (run / "control" / "stop").exists() and not (run / "trainer.pid").exists()


def records_safe(run: Path, kind: str) -> list[dict]:
    """records() of a file the trainer is still appending to (its last line may be half written)."""
    try:
        lines = (run / "metrics.jsonl").read_text("utf-8").splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("type") == kind:
            out.append(rec)
    return out


def step_values_safe(run: Path) -> list[int]:
    return [r["step"] for r in records_safe(run, "step")]


# ---- anetrain train --dashboard ----------------------------------------------------------------------------


def _drain(fd: int, sink: bytearray) -> None:
    """Read the terminal's output until it closes (a full pty would block the dashboard)."""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            return
        if not chunk:
            return
        sink += chunk


def test_train_dashboard_shows_the_run_and_q_stops_the_trainer_with_a_checkpoint(tmp_path):
    """`anetrain train --dashboard` in a terminal: the trainer runs as a child writing train.log (each line
    once), the dashboard follows it, and q asks the trainer to checkpoint and stop; the command exits with
    the trainer's status (130, as after Ctrl-C)."""
    run = tmp_path / "r"
    argv = train_argv(
        write_model(tmp_path), valid_head_tokens(), run, steps=FOREVER, eval_every=0, log_every=5
    )
    master, slave = pty.openpty()
    ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("ANETRAIN_DEBUG", "ANETRAIN_STDERR_IS_LOG")}
    env |= {"TERM": "xterm-256color", "XDG_CACHE_HOME": str(tmp_path / ".cache")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "anetrain", *argv, "--dashboard"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        cwd=tmp_path,
        env=env,
        start_new_session=True,
    )
    os.close(slave)
    screen = bytearray()
    reader = threading.Thread(target=_drain, args=(master, screen), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while len(step_values_safe(run)) < 3 or b"Training stats" not in screen:
            assert proc.poll() is None, screen.decode(errors="replace")[-2000:]
            assert time.monotonic() < deadline, "the dashboard or the trainer did not start"
            time.sleep(0.05)
        os.write(master, b"q")
        assert proc.wait(timeout=120) == 130
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        os.close(master)
        reader.join(timeout=5)
    last = records(run, "checkpoint")[-1]
    assert last["kind"] == "interrupt" and last["step"] == max(step_values(run, "loss"))
    assert verify_checkpoint(find_checkpoint(run))["kind"] == "interrupt"
    log = (run / "train.log").read_text("utf-8")
    assert log.count("pipeline: optimized on cpu in bf16") == 1  # written once, not twice
    assert re.search(r"SIGINT: checkpointing at step \d+", log) and "=== Efficiency Report ===" in log
    assert "Traceback" not in log
    assert not (run / "trainer.pid").exists()
