"""Fixture run directories for the UI tests: realistic metrics.jsonl, train.log, config and checkpoints.

Everything follows docs/run-directory.md, written independently of the trainer so that the dashboard,
plots and trackers are tested against the contract (tests/test_ui_metrics.py checks the builder itself).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

MODEL = {
    "dim": 288,
    "hidden_dim": 768,
    "n_layers": 6,
    "n_heads": 6,
    "n_kv_heads": 6,
    "vocab_size": 32000,
    "seq_len": 256,
    "head_dim": 48,
    "rope_theta": 10000.0,
    "norm_eps": 1e-5,
    "tied_classifier": True,
    "residual_scale": 1.0,
    "name": "stories15M",
}
PHASE_MS = {"forward": 21.0, "backward_dx": 24.0, "dw": 9.0, "optimizer": 3.0, "io": 1.0, "wait": 0.2}
TOKENS_PER_STEP = 8 * 256


def fixture_loss(step: int) -> float:
    """A plausible training curve: 10.4 at step 0 decaying towards 1.8, with a little deterministic noise."""
    return 1.8 + 8.6 * math.exp(-step / 60.0) + 0.05 * math.sin(step * 1.7)


class RunWriter:
    """Appends records to RUN_DIR/metrics.jsonl (and lines to train.log) the way the trainer does."""

    def __init__(self, path: Path, seed: int = 0) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.metrics = self.path / "metrics.jsonl"
        self.log_path = self.path / "train.log"
        self.t0 = 1_700_000_000.0
        self.elapsed = 0.0  # the trainer's clock: seconds since this (fixture) process started
        self.rng = random.Random(seed)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.metrics, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def log(self, line: str) -> None:
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def config(self, tokenizer: str | None = None, model: dict | None = None) -> None:
        cfg = {
            "model": model or MODEL,
            "train": {"steps": 1000, "lr": 5e-4},
            "tokenizer": tokenizer,
            "data": "data/train.bin",
            "val_data": None,
            "anetrain_version": "0.1.0",
        }
        (self.path / "config.json").write_text(json.dumps(cfg))

    def run(self, steps: int = 1000, start_step: int = 0, resumed: bool = False, **extra: Any) -> None:
        rec = {
            "type": "run",
            "model": MODEL,
            "model_name": "stories15M",
            "params": 15_191_712,
            "pipeline": "optimized",
            "backend": "cpu",
            "precision": "bf16",
            "batch": 8,
            "seq": 256,
            "accum": 1,
            "world_size": 1,
            "steps": steps,
            "start_step": start_step,
            "lr": 5e-4,
            "min_lr": 5e-5,
            "warmup": 100,
            "optimizer": "adamw",
            "tokens_per_step": TOKENS_PER_STEP,
            "flops_per_step": 1.9e11,
            "peak_tflops": 20.0,
            "compact_vocab": None,
            "resumed": resumed,
            "time": self.t0,
            "future_field": {"ignored": True},
        }
        rec.update(extra)
        self.write(rec)
        self.log(f"run: stories15M {steps} steps on cpu")

    def compile(self, seconds: float = 2.5) -> None:
        self.write({"type": "compile", "seconds": seconds, "what": "kernels"})

    def step(self, step: int, ms: float | None = None, loss: float | None = None) -> None:
        phases = {k: v * (1 + 0.1 * self.rng.random()) for k, v in PHASE_MS.items()}
        ms = ms if ms is not None else sum(phases.values())
        loss = loss if loss is not None else fixture_loss(step)
        self.elapsed += ms / 1000.0
        rec = {
            "type": "step",
            "step": step,
            "loss": loss,
            "lr": 5e-4 * min(1.0, step / 100),
            "grad_norm": 1.0 + 0.1 * math.cos(step),
            "ms": ms,
            "tokens_per_s": TOKENS_PER_STEP / (ms / 1000.0),
            "tflops": 1.9e11 / (ms / 1000.0) / 1e12,
            "utilization": 1.9e11 / (ms / 1000.0) / 1e12 / 20.0,
            "phases": phases,
            "tokens": step * TOKENS_PER_STEP,
            "skipped": False,
            "loss_scale": None,
            "rss_mb": 900.0 + step * 0.5,
            "time": self.t0 + self.elapsed,
            "elapsed_s": self.elapsed,
            "unknown_new_field": [1, 2, 3],
        }
        self.write(rec)
        self.log(f"step {step} loss={loss:.4f} {ms:.1f} ms/step")

    def eval(self, step: int, val_loss: float) -> None:
        self.write(
            {
                "type": "eval",
                "step": step,
                "val_loss": val_loss,
                "val_ppl": math.exp(val_loss),
                "time": self.t0 + self.elapsed,
                "elapsed_s": self.elapsed,
            }
        )
        self.log(f"eval step {step}: val_loss={val_loss:.4f}")

    def sample(self, step: int, text: str) -> None:
        self.write({"type": "sample", "step": step, "text": text, "time": self.t0 + self.elapsed})

    def checkpoint(self, step: int, kind: str = "periodic") -> None:
        self.write(
            {
                "type": "checkpoint",
                "step": step,
                "path": f"checkpoints/step_{step:08d}",
                "kind": kind,
                "time": self.t0 + self.elapsed,
            }
        )
        self.log(f"checkpoint step {step} ({kind})")

    def report(self, total_steps: int, best_val_loss: float | None, final_loss: float) -> None:
        self.write(
            {
                "type": "report",
                "total_steps": total_steps,
                "wall_s": total_steps * 0.06 + 2.5,
                "compile_s": 2.5,
                "train_s": total_steps * 0.06,
                "ms_per_step": 60.0,
                "ms_per_step_no_opt": 57.0,
                "tokens_per_s": TOKENS_PER_STEP / 0.06,
                "tflops": 3.2,
                "peak_tflops": 20.0,
                "utilization": 0.016,
                "io_ms_per_step": 1.0,
                "optimizer_ms_per_step": 3.0,
                "phases_ms_per_step": PHASE_MS,
                "best_val_loss": best_val_loss,
                "final_loss": final_loss,
                "world_size": 1,
                "loss_compacted": False,
                "time": self.t0 + total_steps * 0.06,
            }
        )


SAMPLE_TEXT = "Once upon a time, there was a little girl named Lily. She loved to play in the park."


def make_run(
    path: Path,
    steps_done: int = 120,
    total: int = 1000,
    eval_every: int | None = 50,
    finished: bool = False,
    ms: float | None = None,
) -> RunWriter:
    """A run directory with ``steps_done`` of ``total`` steps written (and evals, a sample, checkpoints)."""
    w = RunWriter(path)
    w.config()
    w.run(steps=total)
    w.compile()
    for s in range(1, steps_done + 1):
        w.step(s, ms=ms)
        if eval_every and s % eval_every == 0:
            w.eval(s, fixture_loss(s) + 0.1)
        if s % 100 == 0:
            w.checkpoint(s)
            w.sample(s, SAMPLE_TEXT)
    if finished:
        w.checkpoint(steps_done, "final")
        evals = range(eval_every, steps_done + 1, eval_every) if eval_every else ()
        best = min((fixture_loss(s) + 0.1 for s in evals), default=None)
        w.report(steps_done, best, fixture_loss(steps_done))
    return w


def best_train(steps_done: int) -> tuple[float, int]:
    """The fixture's best training loss and its step."""
    return min((fixture_loss(s), s) for s in range(1, steps_done + 1))
