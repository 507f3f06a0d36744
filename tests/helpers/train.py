"""Helpers shared by the trainer's black-box tests: tiny model configs, token files, running the CLI.

Every training run here uses the default pipeline (optimized) in bf16 unless a test asks for another (bf16
rather than "auto", which is fp16 with loss scaling on a CPU without native bf16, so the records are the same
on every machine), a tiny model (dim 32, 2 layers), batch 2 x 32, one torch thread and a given peak (so no
GEMM probe runs). In-process runs restore torch's global thread count and determinism flags afterwards, so
they do not leak into other tests.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import anetrain.data.sampler as sampler_module
from anetrain.cli import main
from helpers.data import shared_file

TINY = {
    "dim": 32,
    "hidden_dim": 64,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "vocab_size": 512,
    "seq_len": 64,
}
# Big enough that writing a checkpoint (about 10 MB with the optimizer) takes longer than a step.
LARGER = {**TINY, "dim": 128, "hidden_dim": 384, "n_layers": 4}
BATCH, SEQ = 2, 32

# Options every test run gets unless it overrides them (None drops the option).
BASE_OPTIONS: dict[str, Any] = {
    "dtype": "bf16",
    "batch": BATCH,
    "seq": SEQ,
    "steps": 6,
    "warmup": 2,
    "eval_every": 3,
    "eval_batches": 2,
    "ckpt_every": 100,
    "log_every": 100,
    "peak_tflops": 1.0,
    "threads": 1,
    "deterministic": True,
}


#: the plain fp32 pipeline, for the tests that compare against it or need it
BASELINE: dict[str, Any] = {"pipeline": "baseline", "dtype": "fp32"}
#: the default pipeline in fp32 (bitwise-reproducible comparisons)
OPTIMIZED_FP32: dict[str, Any] = {"pipeline": "optimized", "dtype": "fp32"}


def valid_head_tokens() -> Path:
    """The 384,958-token TinyStories validation head, tokenized with tok512 (vocab 512)."""
    return shared_file("derived/tinystories_valid_head.tok512.bin")


def write_model(directory: Path, name: str = "tiny", **fields: Any) -> Path:
    """A model config JSON file in ``directory``: TINY with ``fields`` changed."""
    path = Path(directory) / f"{name}.json"
    path.write_text(json.dumps({**TINY, **fields}), encoding="utf-8")
    return path


def write_tokens(path: Path, ids: Any, sidecar: dict[str, Any] | None = None) -> Path:
    """A flat little-endian uint16 token file (and optionally its ``.json`` sidecar)."""
    path = Path(path)
    path.write_bytes(np.asarray(ids, dtype="<u2").tobytes())
    if sidecar is not None:
        Path(str(path) + ".json").write_text(json.dumps(sidecar), encoding="utf-8")
    return path


def options_argv(options: dict[str, Any]) -> list[str]:
    argv: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is None:
            continue
        if value is True:
            argv.append(flag)
        elif value is False:
            argv.append("--no-" + key.replace("_", "-"))
        else:
            argv += [flag, str(value)]
    return argv


def train_argv(model: Path | str, data: Path | str, out: Path | str, **options: Any) -> list[str]:
    """``train`` arguments for a small run; ``options`` override BASE_OPTIONS (value None removes one)."""
    return [
        "train",
        "--model",
        str(model),
        "--data",
        str(data),
        "--out",
        str(out),
        *options_argv({**BASE_OPTIONS, **options}),
    ]


def resume_argv(run_dir: Path | str, **options: Any) -> list[str]:
    return ["train", "--resume", str(run_dir), *options_argv(options)]


@dataclass
class CliResult:
    rc: int
    out: str
    err: str


def run_cli(argv: list[str]) -> CliResult:
    """``anetrain ARGV`` in this process, its stdout and stderr captured; restores torch's global state
    (changed by --threads and --deterministic) afterwards."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(argv)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    return CliResult(rc, out.getvalue(), err.getvalue())


def error_line(result: CliResult, *, after_log: bool = False) -> str:
    """Asserts the CLI's error convention (exit 2, one 'anetrain: error:' line, no traceback); the line.

    ``after_log``: progress lines logged before the error (e.g. "resuming from ...") are allowed.
    """
    assert result.rc == 2, result.err
    assert "Traceback" not in result.err
    lines = result.err.strip().splitlines()
    if not after_log:
        assert len(lines) == 1, result.err
    assert lines[-1].startswith("anetrain: error: "), result.err
    assert sum(line.startswith("anetrain: error: ") for line in lines) == 1, result.err
    return lines[-1]


def records(run_dir: Path | str, kind: str | None = None) -> list[dict[str, Any]]:
    """The records of RUN_DIR/metrics.jsonl (of one type when ``kind`` is given), read as the contract says
    readers must: a line that is not a whole record (a killed writer's last one) is skipped."""
    out = []
    for line in (Path(run_dir) / "metrics.jsonl").read_text("utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if kind is None or rec["type"] == kind:
            out.append(rec)
    return out


def step_values(run_dir: Path | str, field: str) -> dict[int, Any]:
    """{step: record[field]} over the step records (a resumed step overwrites the earlier record)."""
    return {r["step"]: r[field] for r in records(run_dir, "step")}


def dirs(root: Path, prefix: str) -> list[str]:
    return sorted(d.name for d in Path(root).iterdir() if d.name.startswith(prefix)) if root.exists() else []


# ---- recording the sampler's windows -----------------------------------------------------------------------


@dataclass
class Window:
    caller: str  # "next_batch" for training windows, anything else for validation windows
    positions: np.ndarray
    length: int
    tokens_type: type


def record_windows(monkeypatch: Any) -> list[Window]:
    """Record every gather_windows call of the sampler module (training and validation windows)."""
    seen: list[Window] = []
    original = sampler_module.gather_windows

    def recording(tokens: np.ndarray, positions: np.ndarray, length: int) -> torch.Tensor:
        caller = sys._getframe(1).f_code.co_name
        seen.append(Window(caller, np.array(positions, dtype=np.int64), length, type(tokens)))
        return original(tokens, positions, length)

    monkeypatch.setattr(sampler_module, "gather_windows", recording)
    return seen


def training_positions(windows: list[Window]) -> np.ndarray:
    picked = [w.positions for w in windows if w.caller == "next_batch"]
    return np.concatenate(picked) if picked else np.zeros(0, dtype=np.int64)


# ---- an independent drand48 --------------------------------------------------------------------------------


def scalar_drand48(seed: int, count: int) -> list[float]:
    """POSIX drand48 one value at a time: srand48(seed), then X = (a X + c) mod 2^48, value X / 2^48."""
    x = ((seed & 0xFFFFFFFF) << 16) | 0x330E
    values = []
    for _ in range(count):
        x = (0x5DEECE66D * x + 0xB) % (1 << 48)
        values.append(x / float(1 << 48))
    return values


def drand48_positions(seed: int, count: int, n_train: int, seq: int) -> list[int]:
    """The original trainer's window starts: floor(drand48() * (n - S - 1))."""
    span = n_train - seq - 1
    return [int(np.floor(u * span)) for u in scalar_drand48(seed, count)]


# ---- subprocess runs ---------------------------------------------------------------------------------------


def spawn(argv: list[str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    """``python -m anetrain ARGV`` as a child process, its output appended to ``log``."""
    env = {k: v for k, v in os.environ.items() if k != "ANETRAIN_DEBUG"}
    env["XDG_CACHE_HOME"] = str(cwd / ".cache")
    with open(log, "ab") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "anetrain", *argv], cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env=env
        )


def wait_until(
    condition: Callable[[], bool], proc: subprocess.Popen[bytes] | None, log: Path, timeout: float = 60.0
) -> None:
    """Poll ``condition`` every 5 ms; fail if the child exits first or the timeout passes."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(
                f"trainer exited with {proc.returncode} early:\n{log.read_text(errors='replace')}"
            )
        if time.monotonic() > deadline:
            if proc is not None:
                proc.kill()
                proc.wait()
            raise AssertionError(f"timed out waiting:\n{log.read_text(errors='replace')}")
        time.sleep(0.005)


def n_step_records(run_dir: Path) -> int:
    try:
        return (run_dir / "metrics.jsonl").read_bytes().count(b'"type":"step"')
    except FileNotFoundError:
        return 0


def kill9(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGKILL)
    return proc.wait(timeout=30)
