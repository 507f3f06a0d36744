"""A full disk, with the errors the writers really raise (issue 15, case 2). A checkpoint's write is made
to fail inside safetensors' own writer by a file-size limit (RLIMIT_FSIZE: the kernel refuses the write
with EFBIG, as it refuses one with ENOSPC on a full disk), so safetensors raises its own error type, not an
OSError, exactly as on a full file system; metrics.jsonl and train.log are appended to /dev/full, which
fails every write with ENOSPC. A periodic checkpoint that fails is a warning and training goes on (the
temporary directory removed, the previous checkpoint kept); a failed final checkpoint is one error line and
exit 2; a full disk under metrics.jsonl or train.log is a warning."""

from __future__ import annotations

import resource
import signal
from pathlib import Path

import pytest

import anetrain.checkpoint as checkpoint_module
from anetrain.checkpoint import find_checkpoint, verify_checkpoint
from helpers.train import (
    dirs,
    error_line,
    resume_argv,
    run_cli,
    train_argv,
    valid_head_tokens,
    write_model,
)

DEV_FULL = Path("/dev/full")


def fill_disk_at(monkeypatch, checkpoint: str) -> None:
    """The safetensors writes of ``checkpoint`` (e.g. "step_00000004") fail in the kernel: the process may
    not write files longer than 4 KB meanwhile (and ignores SIGXFSZ, so the write returns EFBIG)."""
    real_save = checkpoint_module.save_file

    def save_file(tensors, filename, metadata=None):
        if f".tmp-{checkpoint}-" not in str(filename):
            return real_save(tensors, filename, metadata=metadata)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
        try:
            return real_save(tensors, filename, metadata=metadata)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, old_handler)

    monkeypatch.setattr(checkpoint_module, "save_file", save_file)


def test_a_periodic_checkpoint_on_a_full_disk_is_a_warning_and_training_goes_on(tmp_path, monkeypatch):
    fill_disk_at(monkeypatch, "step_00000004")
    run = tmp_path / "r"
    argv = train_argv(
        write_model(tmp_path),
        valid_head_tokens(),
        run,
        steps=6,
        ckpt_every=2,
        keep_checkpoints=10,
        eval_every=0,
    )
    res = run_cli(argv)
    assert res.rc == 0, res.err
    warnings = [line for line in res.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, res.err
    assert "step_00000004: checkpoint write failed (" in warnings[0]
    assert "the previous checkpoint step_00000002 is kept; training continues" in warnings[0]
    root = run / "checkpoints"
    assert dirs(root, "step_") == ["step_00000002", "step_00000006"]
    assert dirs(root, ".tmp-") == []
    assert verify_checkpoint(root / "step_00000002")["step"] == 2
    assert verify_checkpoint(find_checkpoint(run))["step"] == 6


def test_the_final_checkpoint_on_a_full_disk_is_one_error_line_and_keeps_the_previous(tmp_path, monkeypatch):
    fill_disk_at(monkeypatch, "step_00000004")
    run = tmp_path / "r"
    res = run_cli(
        train_argv(write_model(tmp_path), valid_head_tokens(), run, steps=4, ckpt_every=2, eval_every=0)
    )
    line = error_line(res, after_log=True)
    assert "step_00000004: checkpoint write failed (" in line
    assert "the previous checkpoint step_00000002 is kept" in line
    assert dirs(run / "checkpoints", ".tmp-") == []
    assert verify_checkpoint(find_checkpoint(run))["step"] == 2
    assert not (run / "trainer.pid").exists() and not (run / "trainer.lock").exists()


@pytest.mark.skipif(not DEV_FULL.is_char_device(), reason="no /dev/full (Linux) to stand for a full disk")
def test_metrics_and_log_on_a_full_disk_are_warnings_and_training_goes_on(tmp_path):
    """The disk fills between two processes of a run: the resumed one cannot append to metrics.jsonl or
    train.log, says so once each, and still trains to the end with its final checkpoint."""
    run = tmp_path / "r"
    model = write_model(tmp_path)
    assert run_cli(train_argv(model, valid_head_tokens(), run, steps=4, stop_at=2, eval_every=0)).rc == 0
    for name in ("metrics.jsonl", "train.log"):
        (run / name).unlink()
        (run / name).symlink_to(DEV_FULL)
    res = run_cli(resume_argv(run))
    assert res.rc == 0, res.err
    for name in ("metrics.jsonl", "train.log"):
        failed = [line for line in res.err.splitlines() if f"{name}: write failed (no space left" in line]
        assert len(failed) == 1, res.err
    manifest = verify_checkpoint(find_checkpoint(run))
    assert (manifest["step"], manifest["kind"]) == (4, "final")
    assert "=== Efficiency Report ===" in res.out
