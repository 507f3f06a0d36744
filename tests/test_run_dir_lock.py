"""One trainer per run directory (issue 15, case 1): a second `train --out` on the directory of a running
trainer, a `--resume` of it, or a `--dashboard` launcher is refused with one line naming the process that
holds it; the lock of a trainer killed with -9 is taken over by the next one, which says so."""

from __future__ import annotations

from anetrain.checkpoint import find_checkpoint, verify_checkpoint
from helpers.train import (
    error_line,
    kill9,
    n_step_records,
    resume_argv,
    run_cli,
    spawn,
    train_argv,
    valid_head_tokens,
    wait_until,
    write_model,
)


def test_a_running_trainers_directory_is_refused_and_a_killed_ones_lock_is_taken_over(tmp_path):
    run, log = tmp_path / "r", tmp_path / "trainer.log"
    model = write_model(tmp_path)
    argv = train_argv(model, valid_head_tokens(), run, steps=100_000, eval_every=0, ckpt_every=2)
    proc = spawn(argv, tmp_path, log)
    try:
        wait_until(lambda: (run / "checkpoints" / "latest").exists(), proc, log)
        assert (run / "trainer.lock").read_text().split() == [str(proc.pid)]
        for second in (
            train_argv(model, valid_head_tokens(), run, steps=4),
            resume_argv(run),
            [*train_argv(model, valid_head_tokens(), run), "--dashboard"],
        ):
            line = error_line(run_cli(second))
            assert f"{run} is in use by another trainer (process {proc.pid})" in line, line
        steps_before = n_step_records(run)
        wait_until(lambda: n_step_records(run) > steps_before + 2, proc, log)  # it trains on, undisturbed
    finally:
        if proc.poll() is None:
            kill9(proc)
    assert (run / "trainer.lock").exists()  # what kill -9 leaves
    step = verify_checkpoint(find_checkpoint(run))["step"]
    res = run_cli(resume_argv(run, stop_at=step + 1))
    assert res.rc == 0, res.err
    assert f"trainer.lock was left by process {proc.pid}, which is no longer running" in res.err
    assert verify_checkpoint(find_checkpoint(run))["step"] == step + 1
    assert not (run / "trainer.lock").exists()  # a trainer that ends removes its lock
