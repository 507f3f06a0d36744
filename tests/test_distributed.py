"""Data-parallel training for real: 2 processes on CPU talking over gloo, launched by torchrun.

* With the ``shared`` sampler, 2 ranks x accum 1 train on exactly the windows of 1 process x accum 2, and the
  losses, gradient norms and final weights match that run within float32 tolerance (the all-reduce sums the
  two micro-batches' gradients in another order than the single process's accumulation).
* Rank 0 alone writes the run directory; the report has the world size, all-reduce time and scaling
  efficiency.
* A checkpoint written by 2 ranks resumes in 1 process (and one written by 1 process resumes with 2).
* A rank that is killed, or that stalls past --dist-timeout, ends the job with an error instead of a hang.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from helpers.train import (
    TINY,
    n_step_records,
    records,
    run_cli,
    train_argv,
    valid_head_tokens,
    write_model,
)

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)

# A run of 4 steps, 2 evaluations, the shared sampler (so the two jobs see the same windows).
RUN = {"steps": 4, "warmup": 1, "lr": 2e-3, "eval_every": 2, "eval_batches": 3, "sampler": "shared"}
TIMEOUT = 180


def child_env(cwd: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ANETRAIN_DEBUG", "RANK", "WORLD_SIZE")}
    env["XDG_CACHE_HOME"] = str(cwd / ".cache")
    return env


def torchrun(argv: list[str], cwd: Path, nproc: int = 2, **popen) -> subprocess.Popen[str]:
    """``torchrun --standalone --nproc-per-node N -m anetrain ARGV`` (torchrun picks a free port)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return subprocess.Popen(
        [*cmd, "-m", "anetrain", *argv],
        cwd=cwd,
        env=child_env(cwd),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        **popen,
    )


def wait_for_steps(run: Path, count: int, proc: subprocess.Popen[str]) -> None:
    """Until RUN/metrics.jsonl has ``count`` step records; fails if ``proc`` ends first."""
    deadline = time.monotonic() + TIMEOUT
    while n_step_records(run) < count:
        assert proc.poll() is None, f"the job ended early with {proc.returncode}"
        assert time.monotonic() < deadline, "timed out waiting for step records"
        time.sleep(0.05)


def finished(proc: subprocess.Popen[str]) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=TIMEOUT)
    return proc.returncode, out


def final_weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step_{step:08d}" / "model.safetensors")


def assert_same_training(a: Path, b: Path, rel: float = 1e-5) -> None:
    """Equal losses, gradient norms, learning rates and validation losses; final weights within fp32 noise."""
    sa, sb = records(a, "step"), records(b, "step")
    assert [r["step"] for r in sa] == [r["step"] for r in sb]
    for x, y in zip(sa, sb, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=rel)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)
        assert x["lr"] == y["lr"]
        assert x["tokens"] == y["tokens"]
    ea, eb = records(a, "eval"), records(b, "eval")
    assert [r["val_loss"] for r in ea] == pytest.approx([r["val_loss"] for r in eb], rel=rel)
    wa, wb = final_weights(a, RUN["steps"]), final_weights(b, RUN["steps"])
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, model) -> Path:
    """The reference: 1 process, accum 2, the default pipeline (optimized, bf16)."""
    run = tmp_path_factory.mktemp("one") / "run"
    res = run_cli(train_argv(model, valid_head_tokens(), run, accum=2, **RUN))
    assert res.rc == 0, res.err
    return run


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, model) -> tuple[Path, str]:
    """2 ranks x accum 1, the default pipeline, a weight consistency check every step."""
    tmp = tmp_path_factory.mktemp("two")
    run = tmp / "run"
    rc, out = finished(torchrun(train_argv(model, valid_head_tokens(), run, dist_check_every=1, **RUN), tmp))
    assert rc == 0, out
    return run, out


# ---- equivalence with one process --------------------------------------------------------------------------


def test_two_ranks_match_one_process_with_doubled_accumulation(one_process, two_ranks):
    assert_same_training(one_process, two_ranks[0])


def test_optimized_pipeline_two_ranks_match_one_process(tmp_path, model):
    """The optimized pipeline (fp32, a dW worker thread per rank, so the all-reduces start on that thread as
    each layer's gradients complete)."""
    opts = {**RUN, "pipeline": "optimized", "dtype": "fp32", "threads": 2}
    one, two = tmp_path / "one", tmp_path / "two"
    res = run_cli(train_argv(model, valid_head_tokens(), one, accum=2, **opts))
    assert res.rc == 0, res.err
    rc, out = finished(torchrun(train_argv(model, valid_head_tokens(), two, **opts), tmp_path))
    assert rc == 0, out
    assert_same_training(one, two)
    # overlapped: one all-reduce per layer, then one for the rest (norm gains and the embedding)
    assert {r["allreduce_buckets"] for r in records(two, "step")} == {TINY["n_layers"] + 1}


# ---- what rank 0 writes ----------------------------------------------------------------------------------


def test_run_record_and_report_describe_the_job(two_ranks):
    run, _ = two_ranks
    (rec,) = records(run, "run")
    assert (rec["world_size"], rec["global_batch"], rec["dist_backend"]) == (2, 2 * 2 * 1, "gloo")
    assert rec["tokens_per_step"] == 2 * 2 * 32  # ranks x batch x seq x accum
    steps = records(run, "step")
    assert [r["tokens"] for r in steps] == [128, 256, 384, 512]
    assert all(r["allreduce_ms"] >= 0 and r["allreduce_total_ms"] >= r["allreduce_ms"] for r in steps)
    report = json.loads((run / "report.json").read_text("utf-8"))
    last = records(run, "report")[-1]
    assert report == {k: v for k, v in last.items() if k not in ("type", "time", "elapsed_s")}
    assert (report["world_size"], report["global_batch"], report["tokens"]) == (2, 4, 512)
    assert report["allreduce_ms_per_step"] > 0
    assert 0 < report["scaling_efficiency"] <= 1
    assert report["scaling_efficiency"] == pytest.approx(
        1 - report["allreduce_ms_per_step"] / report["ms_per_step"], rel=1e-6
    )


def test_rank_0_alone_writes_the_run_directory(two_ranks):
    run, out = two_ranks
    log = (run / "train.log").read_text("utf-8")
    assert log.count("=== Efficiency Report ===") == 1 and log.count("pipeline: optimized") == 1
    assert "2 ranks over gloo (global batch 4 sequences)" in log
    assert len(records(run, "run")) == 1 and len(records(run, "report")) == 1
    assert [r["kind"] for r in records(run, "checkpoint")] == ["best", "best", "final"]
    assert json.loads((run / "config.json").read_text("utf-8"))["world_size"] == 2
    assert not (run / "trainer.pid").exists()
    assert "[rank 1]" not in out and out.count("=== Efficiency Report ===") == 1


# ---- resume across world sizes -----------------------------------------------------------------------------


def test_checkpoint_of_two_ranks_resumes_in_one_process(tmp_path, model, one_process):
    """2 ranks x accum 1 stop at step 2; 1 process with --accum 2 (same global batch) finishes the run as the
    uninterrupted 1-process run does (the shared stream's state does not depend on the number of ranks)."""
    run = tmp_path / "run"
    rc, out = finished(torchrun(train_argv(model, valid_head_tokens(), run, stop_at=2, **RUN), tmp_path))
    assert rc == 0, out
    manifest = json.loads((run / "checkpoints" / "step_00000002" / "manifest.json").read_text("utf-8"))
    assert manifest["world_size"] == 2 and manifest["sampler"]["drawn"] == 2 * 2 * 2
    res = run_cli(["train", "--resume", str(run), "--accum", "2"])
    assert res.rc == 0, res.err
    assert [r["world_size"] for r in records(run, "run")] == [2, 1]
    assert_same_training(one_process, run)


def test_checkpoint_of_one_process_resumes_with_two_ranks_via_ddp(tmp_path, model):
    """1 process (random sampler) stops at step 2; `anetrain train --resume RUN --ddp --nproc-per-node 2`
    continues with two ranks, each on a stream re-derived from (seed, step, rank), to the end."""
    run = tmp_path / "run"
    opts = {**RUN, "sampler": "random"}
    assert run_cli(train_argv(model, valid_head_tokens(), run, stop_at=2, **opts)).rc == 0
    proc = subprocess.run(
        [sys.executable, "-m", "anetrain", "train", "--resume", str(run), "--ddp", "--nproc-per-node", "2"],
        cwd=tmp_path,
        env=child_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr
    assert "re-derived from (seed, step, rank)" in proc.stderr
    assert "global batch changes from 2 to 4 sequences" in proc.stderr
    assert [r["step"] for r in records(run, "step")] == [1, 2, 3, 4]
    assert [r["tokens"] for r in records(run, "step")] == [64, 128, 256, 384]
    final = json.loads((run / "checkpoints" / "step_00000004" / "manifest.json").read_text("utf-8"))
    sampler = final["sampler"]
    assert sampler["world_size"] == 2 and [s["rank"] for s in sampler["ranks"]] == [0, 1]
    assert [s["drawn"] for s in sampler["ranks"]] == [2 * 2, 2 * 2]  # 2 steps x batch 2, since the resume
    assert sampler["ranks"][0]["bit_generator"] != sampler["ranks"][1]["bit_generator"]


# ---- a rank that dies or stalls ----------------------------------------------------------------------------


LONG = {**RUN, "steps": 100000, "eval_every": 0, "log_every": 1000, "dist_timeout": 5}


def rank_process(parent: int, rank: int) -> psutil.Process:
    """The training process of ``rank`` among ``parent``'s descendants."""
    for p in psutil.Process(parent).children(recursive=True):
        try:
            if p.environ().get("RANK") == str(rank) and "anetrain" in p.cmdline():
                return p
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    raise AssertionError(f"no rank {rank} process under {parent}")


def test_killed_rank_ends_the_job_with_an_error(tmp_path, model):
    run = tmp_path / "run"
    proc = torchrun(train_argv(model, valid_head_tokens(), run, **LONG), tmp_path, start_new_session=True)
    try:
        wait_for_steps(run, 5, proc)
        rank_process(proc.pid, 1).kill()
        t0 = time.monotonic()
        rc, out = finished(proc)
        assert time.monotonic() - t0 < LONG["dist_timeout"] + 30
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert rc != 0, out
    # rank 0's own one-line error (not only torchrun's generic report of a failed worker)
    assert re.search(r"anetrain: error: rank 0/2: .* failed: another rank has died or stalled", out), out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_stalled_rank_makes_the_others_fail_within_the_timeout(tmp_path, model):
    """Without torchrun (which would notice a dead process, not a stuck one): rank 1 is frozen with SIGSTOP;
    rank 0 gives up after --dist-timeout with one error line and exit status 2."""
    run = tmp_path / "run"
    argv = train_argv(model, valid_head_tokens(), run, **LONG)
    env = child_env(tmp_path) | {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": "2",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "anetrain", *argv],
            cwd=tmp_path,
            env=env | {"RANK": str(r), "LOCAL_RANK": str(r)},
            text=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for r in range(2)
    ]
    try:
        wait_for_steps(run, 5, procs[0])
        procs[1].send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        _, err = procs[0].communicate(timeout=TIMEOUT)
        waited = time.monotonic() - t0
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert procs[0].returncode == 2, err
    assert LONG["dist_timeout"] - 1 <= waited < LONG["dist_timeout"] + 30
    last = err.strip().splitlines()[-1]
    assert last.startswith("anetrain: error: rank 0/2: ") and "--dist-timeout 5 s" in last, err
    assert "Traceback" not in err


def test_ctrl_c_stops_every_rank_after_the_same_step_with_a_checkpoint(tmp_path, model):
    """A terminal's Ctrl-C reaches torchrun and every rank (and torchrun passes it on again): the ranks agree
    on one step, rank 0 writes one interrupt checkpoint, and the run resumes from it."""
    run = tmp_path / "run"
    proc = torchrun(train_argv(model, valid_head_tokens(), run, **LONG), tmp_path, start_new_session=True)
    try:
        wait_for_steps(run, 5, proc)
        os.killpg(proc.pid, signal.SIGINT)
        rc, out = finished(proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert rc != 0  # torchrun reports the interrupted job as failed
    (ckpt,) = [r for r in records(run, "checkpoint") if r["kind"] == "interrupt"]
    last_step = records(run, "step")[-1]["step"]
    assert ckpt["step"] == last_step >= 5
    assert out.count("SIGINT: checkpointing at step") == 1, out
    manifest = json.loads((Path(ckpt["path"]) / "manifest.json").read_text("utf-8"))
    assert manifest["kind"] == "interrupt" and manifest["world_size"] == 2
    assert manifest["sampler"]["name"] == "shared" and manifest["sampler"]["world_size"] == 2
