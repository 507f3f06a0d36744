"""The training loop and its telemetry, black-box through `anetrain train`: metrics.jsonl records, the
Efficiency Report, evaluation, the LR schedules, gradient accumulation and --stop-at."""

from __future__ import annotations

import json
import math

import pytest

from anetrain.checkpoint import find_checkpoint, verify_checkpoint
from anetrain.config import PRESETS, make_config
from anetrain.telemetry.flops import training_flops_per_sequence
from helpers.data import shared_file
from helpers.train import (
    BASELINE,
    BATCH,
    SEQ,
    TINY,
    record_windows,
    records,
    resume_argv,
    run_cli,
    step_values,
    train_argv,
    valid_head_tokens,
    write_model,
)

PHASE_KEYS = {"forward", "backward_dx", "dw", "optimizer", "io", "wait"}
REPORT_FIELDS = {
    "total_steps",
    "wall_s",
    "compile_s",
    "train_s",
    "ms_per_step",
    "ms_per_step_no_opt",
    "tflops",
    "utilization",
    "io_ms_per_step",
}


def expected_adamw_lr(step0: int, lr: float, warmup: int, steps: int, min_lr: float) -> float:
    """Linear warmup lr*(s+1)/warmup, then cosine from lr to min_lr at the last step (0-based s)."""
    if step0 < warmup:
        return lr * (step0 + 1) / warmup
    r = (step0 - warmup) / (steps - 1 - warmup)
    return min_lr + 0.5 * (1 + math.cos(math.pi * r)) * (lr - min_lr)


@pytest.fixture(scope="module")
def telemetry_run(tmp_path_factory):
    """One 6-step run: eval every 3, periodic checkpoints every 2, peak 1.0 TFLOPS."""
    tmp = tmp_path_factory.mktemp("telemetry")
    run = tmp / "run"
    res = run_cli(train_argv(write_model(tmp), valid_head_tokens(), run, steps=6, eval_every=3, ckpt_every=2))
    assert res.rc == 0, res.err
    return run


# ---- telemetry ---------------------------------------------------------------------------------------------


def test_metrics_has_run_step_eval_checkpoint_and_a_final_report(telemetry_run):
    recs = records(telemetry_run)
    types = [r["type"] for r in recs]
    assert types[0] == "run"
    assert types[-1] == "report"
    assert {"run", "step", "eval", "checkpoint", "report"} <= set(types)
    assert all(isinstance(r["time"], float) and r["elapsed_s"] >= 0 for r in recs)


def test_run_record_describes_the_run(telemetry_run):
    run = records(telemetry_run, "run")[0]
    cfg = make_config(**{**TINY, "name": "tiny"})
    assert run["model"] == cfg.to_dict()
    assert run["params"] == cfg.param_count()
    labels = ("pipeline", "precision", "backend", "fusion")
    assert tuple(run[k] for k in labels) == ("optimized", "bf16", "cpu", "hand")
    assert (run["batch"], run["seq"], run["accum"], run["steps"], run["start_step"]) == (BATCH, SEQ, 1, 6, 0)
    assert run["tokens_per_step"] == BATCH * SEQ
    assert run["flops_per_step"] == training_flops_per_sequence(cfg, SEQ) * BATCH
    assert run["peak_tflops"] == 1.0
    assert run["resumed"] is False


def test_step_records_have_every_field(telemetry_run):
    steps = records(telemetry_run, "step")
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    for r in steps:
        assert set(r["phases"]) == PHASE_KEYS
        assert all(v >= 0 for v in r["phases"].values())
        assert 5.0 < r["loss"] < 7.0  # about ln(512) = 6.24 for a fresh model
        assert r["grad_norm"] > 0 and r["ms"] > 0 and r["lr"] > 0
        assert r["tokens"] == r["step"] * BATCH * SEQ
        assert r["tokens_per_s"] == pytest.approx(BATCH * SEQ / (r["ms"] / 1e3), rel=1e-9)
        assert r["utilization"] == pytest.approx(r["tflops"] / 1.0, rel=1e-12)
        assert r["skipped"] is False and r["loss_scale"] is None


def test_eval_before_the_first_step_and_every_eval_every(telemetry_run):
    recs = records(telemetry_run)
    evals = [r for r in recs if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [0, 3, 6]
    first_step = next(i for i, r in enumerate(recs) if r["type"] == "step")
    assert recs.index(evals[0]) < first_step
    for r in evals:
        assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]), rel=1e-12)


def test_checkpoint_records(telemetry_run):
    ckpts = records(telemetry_run, "checkpoint")
    periodic = [r["step"] for r in ckpts if r["kind"] == "periodic"]
    assert periodic == [2, 4]
    final = [r for r in ckpts if r["kind"] == "final"]
    assert [r["step"] for r in final] == [6]
    assert verify_checkpoint(telemetry_run / "checkpoints" / "step_00000006")["step"] == 6


def test_efficiency_report(telemetry_run):
    report = records(telemetry_run, "report")[-1]
    assert set(report) >= REPORT_FIELDS
    steps = records(telemetry_run, "step")
    run = records(telemetry_run, "run")[0]
    assert report["total_steps"] == 6
    assert report["train_s"] == pytest.approx(sum(r["ms"] for r in steps) / 1e3, rel=1e-9)
    assert report["ms_per_step"] == pytest.approx(report["train_s"] * 1e3 / 6, rel=1e-9)
    opt_ms = sum(r["phases"]["optimizer"] for r in steps) / 6
    assert report["ms_per_step_no_opt"] == pytest.approx(report["ms_per_step"] - opt_ms, rel=1e-9)
    assert report["io_ms_per_step"] == pytest.approx(sum(r["phases"]["io"] for r in steps) / 6, rel=1e-9)
    assert report["tflops"] == pytest.approx(6 * run["flops_per_step"] / report["train_s"] / 1e12, rel=1e-9)
    assert report["peak_tflops"] == 1.0
    assert report["utilization"] == pytest.approx(report["tflops"] / 1.0, rel=1e-12)
    assert report["wall_s"] >= report["train_s"] >= 0 and report["compile_s"] >= 0
    assert report["final_loss"] == steps[-1]["loss"]
    assert report["best_val_loss"] == min(r["val_loss"] for r in records(telemetry_run, "eval"))
    on_disk = json.loads((telemetry_run / "report.json").read_text("utf-8"))
    assert on_disk == {k: v for k, v in report.items() if k not in ("type", "time", "elapsed_s")}


def test_config_json_records_model_and_options(telemetry_run):
    doc = json.loads((telemetry_run / "config.json").read_text("utf-8"))
    assert doc["model"]["dim"] == 32
    assert doc["train"]["steps"] == 6 and doc["train"]["pipeline"] == "optimized"
    assert doc["data"] == str(valid_head_tokens().resolve())


def test_flop_accounting_matches_the_original_for_stories110m():
    flops = training_flops_per_sequence(PRESETS["stories110M"], 256)
    assert round(flops / 1e6) == 174_248


# ---- learning rates ----------------------------------------------------------------------------------------


def test_adamw_warms_up_then_decays_by_cosine_to_lr_over_10(tmp_path):
    argv = train_argv(write_model(tmp_path), valid_head_tokens(), tmp_path / "r", steps=10, warmup=3, lr=1e-3)
    assert run_cli(argv).rc == 0
    lrs = step_values(tmp_path / "r", "lr")
    assert list(lrs) == list(range(1, 11))
    for step, lr in lrs.items():
        assert lr == pytest.approx(expected_adamw_lr(step - 1, 1e-3, 3, 10, 1e-4), rel=1e-12), step
    assert lrs[1] == pytest.approx(1e-3 / 3) and lrs[3] == pytest.approx(1e-3)
    assert lrs[10] == pytest.approx(1e-4, rel=1e-12)
    assert records(tmp_path / "r", "run")[0]["min_lr"] == pytest.approx(1e-4)


def test_adamw_decays_to_the_given_min_lr(tmp_path):
    argv = train_argv(
        write_model(tmp_path), valid_head_tokens(), tmp_path / "r", steps=6, warmup=2, lr=1e-3, min_lr=3e-4
    )
    assert run_cli(argv).rc == 0
    lrs = step_values(tmp_path / "r", "lr")
    for step, lr in lrs.items():
        assert lr == pytest.approx(expected_adamw_lr(step - 1, 1e-3, 2, 6, 3e-4), rel=1e-12)
    assert lrs[6] == pytest.approx(3e-4, rel=1e-12)


def test_adam_keeps_a_constant_lr(tmp_path):
    argv = train_argv(
        write_model(tmp_path),
        valid_head_tokens(),
        tmp_path / "r",
        steps=5,
        warmup=3,
        lr=2e-3,
        optimizer="adam",
    )
    assert run_cli(argv).rc == 0
    assert list(step_values(tmp_path / "r", "lr").values()) == [2e-3] * 5


# ---- gradient accumulation ---------------------------------------------------------------------------------


def test_accum_two_micro_batches_equal_one_batch_of_two(tmp_path, monkeypatch):
    """With the same windows (drand48 order), accum 2 x batch 1 gives the losses of accum 1 x batch 2."""
    model, data = write_model(tmp_path), valid_head_tokens()
    windows = record_windows(monkeypatch)
    argv = train_argv(
        model, data, tmp_path / "acc", steps=3, batch=1, accum=2, sampler="drand48", eval_every=0
    )
    assert run_cli(argv).rc == 0
    micro = [w for w in windows if w.caller == "next_batch"]
    assert [len(w.positions) for w in micro] == [1] * 6
    argv = train_argv(
        model, data, tmp_path / "one", steps=3, batch=2, accum=1, sampler="drand48", eval_every=0
    )
    assert run_cli(argv).rc == 0
    acc, one = records(tmp_path / "acc", "step"), records(tmp_path / "one", "step")
    assert records(tmp_path / "acc", "run")[0]["accum"] == 2
    assert records(tmp_path / "acc", "run")[0]["tokens_per_step"] == 2 * SEQ
    assert [r["tokens"] for r in acc] == [2 * SEQ, 4 * SEQ, 6 * SEQ]
    for a, b in zip(acc, one, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["lr"] == b["lr"]


# ---- --stop-at ---------------------------------------------------------------------------------------------


def test_stop_at_ends_with_an_interrupt_checkpoint_and_keeps_the_schedule_of_steps(tmp_path):
    run = tmp_path / "r"
    argv = train_argv(write_model(tmp_path), valid_head_tokens(), run, steps=10, warmup=2, lr=1e-3, stop_at=4)
    res = run_cli(argv)
    assert res.rc == 0, res.err
    assert f"--resume {run}" in res.err
    lrs = step_values(run, "lr")
    assert list(lrs) == [1, 2, 3, 4]
    for step, lr in lrs.items():  # the cosine spans --steps 10, not the 4 steps run
        assert lr == pytest.approx(expected_adamw_lr(step - 1, 1e-3, 2, 10, 1e-4), rel=1e-12)
    last = records(run, "checkpoint")[-1]
    assert (last["step"], last["kind"]) == (4, "interrupt")
    found = find_checkpoint(run)
    assert found is not None and found.name == "step_00000004"
    manifest = verify_checkpoint(found)
    assert (manifest["step"], manifest["kind"], manifest["total_steps"]) == (4, "interrupt", 10)
    assert (run / "report.json").exists()
    assert not (run / "trainer.pid").exists()


def test_resume_with_a_later_stop_at_continues_on_the_same_schedule(tmp_path):
    model, data = write_model(tmp_path), valid_head_tokens()
    whole, part = tmp_path / "whole", tmp_path / "part"
    common = {"steps": 8, "warmup": 2, "lr": 1e-3, "eval_every": 4}
    assert run_cli(train_argv(model, data, whole, **common)).rc == 0
    assert run_cli(train_argv(model, data, part, stop_at=4, **common)).rc == 0
    assert run_cli(resume_argv(part, stop_at=8)).rc == 0
    assert step_values(part, "lr") == step_values(whole, "lr")
    assert list(step_values(part, "lr")) == list(range(1, 9))


def test_plain_resume_after_stop_at_runs_to_the_end(tmp_path):
    run = tmp_path / "r"
    assert run_cli(train_argv(write_model(tmp_path), valid_head_tokens(), run, steps=6, stop_at=3)).rc == 0
    res = run_cli(resume_argv(run))
    assert res.rc == 0, res.err
    assert list(step_values(run, "loss")) == [1, 2, 3, 4, 5, 6]
    assert records(run, "checkpoint")[-1]["kind"] == "final"


def test_eval_every_zero_disables_evaluation(tmp_path):
    run = tmp_path / "r"
    assert run_cli(train_argv(write_model(tmp_path), valid_head_tokens(), run, steps=2, eval_every=0)).rc == 0
    assert records(run, "eval") == []


@pytest.mark.parametrize("pipeline", ["baseline", "optimized"])
def test_compact_vocab_trains_and_the_report_says_the_loss_is_compacted(tmp_path, pipeline):
    """--compact-vocab: the softmax covers only tokens present in the data; the run record counts them and
    the report marks the loss as compacted. (The optimized pipeline's warm-up once fed token 0, which the
    compacted classifier does not know.)"""
    argv = train_argv(
        write_model(tmp_path),
        valid_head_tokens(),
        tmp_path / "r",
        steps=3,
        compact_vocab=True,
        **(BASELINE if pipeline == "baseline" else {}),
    )
    res = run_cli(argv)
    assert res.rc == 0, res.err
    (run,) = records(tmp_path / "r", "run")
    assert 0 < run["compact_vocab"] < 512
    (report,) = records(tmp_path / "r", "report")
    assert report["loss_compacted"] is True
    losses = step_values(tmp_path / "r", "loss")
    assert len(losses) == 3 and all(0 < v < math.log(run["compact_vocab"]) + 1 for v in losses.values())


def test_samples_every_sample_every_steps_and_one_at_the_end(tmp_path):
    """--sample-every 2 over 4 steps: samples at steps 2 and 4 (the end's sample is that same one, not a
    second), each generated text decoded by the run's tokenizer."""
    run = tmp_path / "r"
    argv = train_argv(write_model(tmp_path), valid_head_tokens(), run, steps=4, eval_every=0, sample_every=2)
    res = run_cli([*argv, "--tokenizer", str(shared_file("tok512.bin")), "--sample-tokens", "20"])
    assert res.rc == 0, res.err
    samples = records(run, "sample")
    assert [r["step"] for r in samples] == [2, 4]
    assert all(isinstance(r["text"], str) for r in samples)
    assert res.err.count("sample at step 4:") == 1
