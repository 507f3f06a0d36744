"""Experiment trackers: the record-to-scalar mapping always; TensorBoard and W&B when installed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from anetrain.errors import AnetrainError
from anetrain.ui.metrics import read_metrics
from anetrain.ui.trackers import make_trackers, record_scalars
from helpers.run_dir import make_run


def test_record_scalars_maps_every_kind() -> None:
    step = {
        "type": "step",
        "step": 7,
        "loss": 3.5,
        "lr": 1e-3,
        "ms": 50.0,
        "phases": {"forward": 20.0, "dw": 5.0},
        "loss_scale": None,
        "new": 1,
    }
    n, s = record_scalars(step)
    assert n == 7
    assert s == {
        "train/loss": 3.5,
        "train/lr": 1e-3,
        "train/ms": 50.0,
        "timing/forward_ms": 20.0,
        "timing/dw_ms": 5.0,
    }
    assert record_scalars({"type": "eval", "step": 9, "val_loss": 2.0, "val_ppl": 7.39}) == (
        9,
        {"val/loss": 2.0, "val/ppl": 7.39},
    )
    assert record_scalars({"type": "report", "total_steps": 10, "tflops": 1.5, "best_val_loss": None}) == (
        10,
        {"report/tflops": 1.5},
    )
    assert record_scalars({"type": "sample", "step": 1, "text": "hi"}) == (1, {})
    assert record_scalars({"type": "unknown"}) == (None, {})


def test_no_trackers_by_default(tmp_path: Path) -> None:
    assert make_trackers(tmp_path) == []


def test_missing_packages_give_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(AnetrainError, match=r"pip install 'anetrain\[wandb\]'"):
        make_trackers(tmp_path, wandb=True)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(AnetrainError, match=r"pip install 'anetrain\[tensorboard\]'"):
        make_trackers(tmp_path, tensorboard=True)


def test_tensorboard_writes_event_files_with_the_scalars(tmp_path: Path) -> None:
    pytest.importorskip(
        "tensorboard", reason="tensorboard not installed (pip install 'anetrain[tensorboard]')"
    )
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    make_run(tmp_path / "src", steps_done=60, total=100, finished=True)
    records = read_metrics(tmp_path / "src" / "metrics.jsonl")
    (tracker,) = make_trackers(tmp_path / "run", tensorboard=True)
    for rec in records:
        tracker.log(rec)
    tracker.close()
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    losses = acc.Scalars("train/loss")
    assert [e.step for e in losses] == list(range(1, 61))
    first_step = next(r for r in records if r["type"] == "step")
    assert losses[0].value == pytest.approx(first_step["loss"], rel=1e-6)
    assert [e.step for e in acc.Scalars("val/loss")] == [50]
    assert "timing/forward_ms" in acc.Tags()["scalars"]


def test_wandb_offline_logs_without_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb", reason="wandb not installed (pip install 'anetrain[wandb]')")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_MODE", "offline")  # the environment alone selects offline mode
    make_run(tmp_path / "src", steps_done=30, total=30, finished=True)
    records = read_metrics(tmp_path / "src" / "metrics.jsonl")
    (tracker,) = make_trackers(tmp_path / "run", wandb=True, wandb_name="fixture")
    for rec in records:
        tracker.log(rec)
    summary = dict(tracker.run.summary)
    config = dict(tracker.run.config)
    tracker.close()
    # W&B commits a step's row when a later step arrives (or at finish): the summary is at step 29 or 30.
    last_losses = [r["loss"] for r in records if r["type"] == "step"][-2:]
    assert any(summary["train/loss"] == pytest.approx(v) for v in last_losses)
    assert summary["report/tflops"] == pytest.approx(3.2)
    assert config["model_name"] == "stories15M" and config["steps"] == 30
    (run,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    (log,) = run.glob("*.wandb")
    assert log.stat().st_size > 1000
