"""Checkpoints and resume, in-process: layout, bitwise-identical resume, refused resumes, a full disk and
damaged or half-written checkpoints."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import pytest
from safetensors import safe_open

import anetrain.checkpoint as checkpoint_module
from anetrain.checkpoint import find_checkpoint, load_checkpoint, verify_checkpoint
from anetrain.config import make_config
from anetrain.params import init_params
from helpers.train import (
    BASELINE,
    OPTIMIZED_FP32,
    TINY,
    dirs,
    error_line,
    records,
    resume_argv,
    run_cli,
    step_values,
    train_argv,
    valid_head_tokens,
    write_model,
)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tensor_names(path: Path) -> set[str]:
    with safe_open(path, "np") as f:
        return set(f.keys())


# ---- layout ------------------------------------------------------------------------------------------------


def test_checkpoint_directory_layout(tmp_path):
    run = tmp_path / "r"
    argv = train_argv(write_model(tmp_path), valid_head_tokens(), run, steps=4, ckpt_every=2, eval_every=0)
    assert run_cli(argv).rc == 0
    root = run / "checkpoints"
    assert dirs(root, "step_") == ["step_00000002", "step_00000004"]
    assert (root / "latest").read_text("utf-8").strip() == "step_00000004"
    ckpt = root / "step_00000004"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "manifest.json",
        "model.safetensors",
        "optimizer.safetensors",
    ]
    manifest = json.loads((ckpt / "manifest.json").read_text("utf-8"))
    assert (manifest["format"], manifest["version"], manifest["step"]) == ("anetrain-checkpoint", 1, 4)
    assert manifest["model"] == make_config(**{**TINY, "name": "tiny"}).to_dict()
    expected = {name for name, _ in init_params(make_config(**TINY)).named()}
    names = tensor_names(ckpt / "model.safetensors")
    assert names == expected
    assert "layers.0.attention.wq.weight" in names and "tok_embeddings.weight" in names
    assert not any(n.startswith("output") for n in names)  # the tied classifier is stored once
    assert tensor_names(ckpt / "optimizer.safetensors") == {f"m.{n}" for n in names} | {
        f"v.{n}" for n in names
    }
    loaded = load_checkpoint(ckpt)
    assert loaded.step == 4 and loaded.optimizer is not None and loaded.optimizer.t == 4


# ---- bitwise resume ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("pipeline", ["optimized-fp32", "optimized-bf16", "baseline"])
def test_resume_gives_bitwise_identical_losses_and_weights(tmp_path, pipeline):
    """6 steps in one run == 3 steps, --stop-at, resume, 3 more (CPU, --deterministic, --threads 1), for the
    default pipeline in fp32 and bf16 and for the baseline."""
    model, data = write_model(tmp_path), valid_head_tokens()
    whole, part = tmp_path / "whole", tmp_path / "part"
    chosen = {"optimized-fp32": OPTIMIZED_FP32, "optimized-bf16": {}, "baseline": BASELINE}[pipeline]
    common = {"steps": 6, "warmup": 2, "lr": 2e-3, "eval_every": 2, **chosen}
    assert run_cli(train_argv(model, data, whole, **common)).rc == 0
    assert run_cli(train_argv(model, data, part, stop_at=3, **common)).rc == 0
    # --stop-at 6 is given again because a plain --resume keeps the saved stop_at (see test_train_loop).
    res = run_cli(resume_argv(part, stop_at=6))
    assert res.rc == 0, res.err
    assert f"resuming from {part / 'checkpoints' / 'step_00000003'}" in res.err
    assert list(step_values(part, "loss")) == [1, 2, 3, 4, 5, 6]
    for field in ("loss", "grad_norm", "lr"):
        assert step_values(part, field) == step_values(whole, field), field
    assert [r["val_loss"] for r in records(part, "eval")] == [r["val_loss"] for r in records(whole, "eval")]
    for fname in ("model.safetensors", "optimizer.safetensors"):
        a = whole / "checkpoints" / "step_00000006" / fname
        b = part / "checkpoints" / "step_00000006" / fname
        assert sha256(a) == sha256(b), fname
    resumed = records(part, "run")[-1]
    assert resumed["resumed"] is True and resumed["start_step"] == 3
    assert records(part, "report")[-1]["total_steps"] == 6


# ---- refused resumes ---------------------------------------------------------------------------------------


@pytest.fixture
def stopped_run(tmp_path):
    run = tmp_path / "r"
    assert run_cli(train_argv(write_model(tmp_path), valid_head_tokens(), run, steps=6, stop_at=2)).rc == 0
    return run


def test_resume_with_a_different_model_is_refused_naming_the_field(tmp_path, stopped_run):
    other = write_model(tmp_path, "wider", dim=64)
    line = error_line(run_cli(resume_argv(stopped_run, model=other, stop_at=4)), after_log=True)
    assert "dim" in line and "32" in line and "64" in line
    same = write_model(tmp_path, "same")
    res = run_cli(resume_argv(stopped_run, model=same, stop_at=4))
    assert res.rc == 0, res.err
    assert list(step_values(stopped_run, "loss")) == [1, 2, 3, 4]


@pytest.mark.parametrize(("field", "value"), [("n_layers", 3), ("n_kv_heads", 4), ("vocab_size", 1024)])
def test_resume_refuses_each_differing_config_field(tmp_path, stopped_run, field, value):
    other = write_model(tmp_path, "other", **{field: value})
    line = error_line(run_cli(resume_argv(stopped_run, model=other)), after_log=True)
    assert field in line


def test_resume_with_a_changed_lr_is_refused(stopped_run):
    line = error_line(run_cli(resume_argv(stopped_run, lr=1e-3)))
    assert "--lr" in line


def test_resume_of_a_directory_without_a_run_is_refused(tmp_path):
    line = error_line(run_cli(resume_argv(tmp_path / "nothing")))
    assert str(tmp_path / "nothing") in line


def test_resume_without_a_complete_checkpoint_is_refused(stopped_run):
    for d in (stopped_run / "checkpoints").iterdir():
        if d.is_dir():
            (d / "manifest.json").unlink()
    res = run_cli(resume_argv(stopped_run))
    assert "no complete checkpoint" in error_line(res, after_log=True)
    warnings = [line for line in res.err.splitlines() if line.startswith("warning: skipping the damaged")]
    assert len(warnings) == 1 and "no manifest.json" in warnings[0]  # the one checkpoint, each said once


def test_new_run_into_an_existing_run_directory_is_refused(tmp_path, stopped_run):
    line = error_line(run_cli(train_argv(write_model(tmp_path), valid_head_tokens(), stopped_run)))
    assert "--resume" in line


def test_resume_from_another_directory_finds_relatively_given_data(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "d.bin").write_bytes(valid_head_tokens().read_bytes())
    monkeypatch.chdir(work)
    run = tmp_path / "r"
    assert run_cli(train_argv(write_model(tmp_path), "d.bin", run, steps=4, stop_at=2)).rc == 0
    monkeypatch.chdir(tmp_path)
    res = run_cli(resume_argv(run, stop_at=4))
    assert res.rc == 0, res.err


# ---- a full disk -------------------------------------------------------------------------------------------


def _enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["save_file", "os.replace"])
def test_full_disk_fails_one_checkpoint_keeps_the_previous_and_training_continues(
    tmp_path, monkeypatch, where
):
    if where == "save_file":
        original_save = checkpoint_module.save_file

        def failing_save(tensors, filename, metadata=None):
            if ".tmp-step_00000004" in str(filename):
                Path(filename).write_bytes(b"partial")
                raise _enospc()
            return original_save(tensors, filename, metadata=metadata)

        monkeypatch.setattr(checkpoint_module, "save_file", failing_save)
    else:
        original_replace = os.replace

        def failing_replace(src, dst, *a, **kw):
            if Path(src).name.startswith(".tmp-step_00000004"):
                raise _enospc()
            return original_replace(src, dst, *a, **kw)

        monkeypatch.setattr(os, "replace", failing_replace)
    run = tmp_path / "r"
    argv = train_argv(
        write_model(tmp_path),
        valid_head_tokens(),
        run,
        steps=8,
        ckpt_every=2,
        keep_checkpoints=10,
        eval_every=0,
    )
    res = run_cli(argv)
    assert res.rc == 0, res.err
    warning = [line for line in res.err.splitlines() if "no space left" in line]
    assert len(warning) == 1, res.err
    assert "step_00000004" in warning[0] and "step_00000002" in warning[0]  # failed one and the one kept
    root = run / "checkpoints"
    assert dirs(root, "step_") == ["step_00000002", "step_00000006", "step_00000008"]
    assert dirs(root, ".tmp-") == [] and dirs(root, ".old-") == []
    assert [(r["step"], r["kind"]) for r in records(run, "checkpoint")] == [
        (2, "periodic"),
        (6, "periodic"),
        (8, "final"),
    ]
    assert verify_checkpoint(root / "step_00000002")["step"] == 2
    assert list(step_values(run, "loss")) == list(range(1, 9))


def test_full_disk_on_the_final_checkpoint_is_an_error_and_keeps_the_previous(tmp_path, monkeypatch):
    original_save = checkpoint_module.save_file

    def failing_save(tensors, filename, metadata=None):
        if ".tmp-step_00000004" in str(filename):
            raise _enospc()
        return original_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint_module, "save_file", failing_save)
    run = tmp_path / "r"
    res = run_cli(
        train_argv(write_model(tmp_path), valid_head_tokens(), run, steps=4, ckpt_every=2, eval_every=0)
    )
    assert res.rc == 2
    assert "Traceback" not in res.err
    last = res.err.strip().splitlines()[-1]
    assert last.startswith("anetrain: error: ") and "no space left" in last
    found = find_checkpoint(run)
    assert found is not None and found.name == "step_00000002"


# ---- damaged and half-written checkpoints ------------------------------------------------------------------


def test_truncated_checkpoint_is_skipped_for_the_previous_one_and_resume_reproduces(tmp_path):
    run = tmp_path / "r"
    argv = train_argv(
        write_model(tmp_path), valid_head_tokens(), run, steps=6, ckpt_every=2, keep_checkpoints=3
    )
    assert run_cli(argv).rc == 0
    losses = step_values(run, "loss")
    root = run / "checkpoints"
    model_file = root / "step_00000006" / "model.safetensors"
    data = model_file.read_bytes()
    model_file.write_bytes(data[: len(data) // 2])
    found = find_checkpoint(run)
    assert found == root / "step_00000004"
    res = run_cli(resume_argv(run))
    assert res.rc == 0, res.err
    assert f"resuming from {root / 'step_00000004'}" in res.err
    assert step_values(run, "loss") == losses  # steps 5 and 6 again, bitwise the same
    assert verify_checkpoint(root / "step_00000006")["step"] == 6
    assert find_checkpoint(run) == root / "step_00000006"


def test_checkpoint_without_manifest_or_with_a_bad_checksum_is_skipped(tmp_path):
    run = tmp_path / "r"
    argv = train_argv(
        write_model(tmp_path), valid_head_tokens(), run, steps=6, ckpt_every=2, keep_checkpoints=3
    )
    assert run_cli(argv).rc == 0
    root = run / "checkpoints"
    (root / "step_00000006" / "manifest.json").unlink()  # as if killed before the manifest was written
    assert find_checkpoint(run) == root / "step_00000004"
    opt = root / "step_00000004" / "optimizer.safetensors"
    raw = bytearray(opt.read_bytes())
    raw[-1] ^= 0xFF  # same size, different content
    opt.write_bytes(bytes(raw))
    assert find_checkpoint(run) == root / "step_00000002"


def test_stray_temporary_checkpoint_directories_are_cleaned_on_the_next_run(tmp_path):
    run = tmp_path / "r"
    argv = train_argv(write_model(tmp_path), valid_head_tokens(), run, steps=6, stop_at=2, eval_every=0)
    assert run_cli(argv).rc == 0
    root = run / "checkpoints"
    # What a kill -9 in the middle of a checkpoint write leaves (another, dead process id).
    for stray in (".tmp-step_00000003-999999999", ".old-step_00000002-999999998"):
        (root / stray).mkdir()
        (root / stray / "model.safetensors").write_bytes(b"\0" * 100)
    (root / "step_00000003").mkdir()  # a step directory without a manifest is not a checkpoint
    assert find_checkpoint(run) == root / "step_00000002"
    assert run_cli(resume_argv(run, stop_at=4)).rc == 0
    assert dirs(root, ".tmp-") == [] and dirs(root, ".old-") == []
    assert find_checkpoint(run) == root / "step_00000004"


def test_a_partial_last_line_is_ended_before_a_resumed_run_appends(tmp_path):
    """A trainer killed in the middle of a record leaves half a line in metrics.jsonl and train.log (they are
    appended, not replaced); the resumed run starts on a line of its own, so only that half line is lost, and
    the readers skip it."""
    from anetrain.ui.metrics import read_metrics

    run = tmp_path / "r"
    assert run_cli(train_argv(write_model(tmp_path), valid_head_tokens(), run, steps=4, stop_at=2)).rc == 0
    half_record, half_line = '{"type":"step","step":3,"lo', "step 3/4 | lo"
    with open(run / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(half_record)
    with open(run / "train.log", "a", encoding="utf-8") as f:
        f.write(half_line)
    res = run_cli(resume_argv(run))
    assert res.rc == 0, res.err
    lines = (run / "metrics.jsonl").read_text("utf-8").splitlines()
    assert half_record in lines  # on a line of its own
    assert [r["start_step"] for r in records(run, "run")] == [0, 2]
    assert list(step_values(run, "loss")) == [1, 2, 3, 4]
    assert len(read_metrics(run / "metrics.jsonl")) == len(lines) - 1  # every line but the half one
    log = (run / "train.log").read_text("utf-8").splitlines()
    assert log[log.index(half_line) + 1].startswith("resuming from ")
