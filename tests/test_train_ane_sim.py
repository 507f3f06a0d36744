"""`anetrain train --backend ane-sim` end to end through the CLI, with no other ANE option: the original's
programs in the simulator (chip m4 off a Mac, said in the log), next to the float32 baseline on the same
command; stop and resume; the Efficiency Report's ANE and IO milliseconds; a model over a hardware limit
refused before any work with one line and exit status 2."""

from __future__ import annotations

import json
from pathlib import Path

from helpers.train import BASELINE, error_line, records, run_cli, train_argv, valid_head_tokens, write_model

# stories260K's structure (GQA 8/4, head_dim 8 and hidden 172: both padded for the ANE), 2 layers
MODEL = {"dim": 64, "hidden_dim": 172, "n_heads": 8, "n_kv_heads": 4, "n_layers": 2, "seq_len": 64}
STEPS = 60
OPTIONS = {
    "pipeline": None,  # the defaults: --backend ane-sim picks the ANE's pipeline and its fp16
    "dtype": None,
    "steps": STEPS,
    "batch": 4,
    "seq": 32,
    "lr": 3e-3,
    "warmup": 10,
    "eval_every": 30,
    "eval_batches": 4,
    "val_fraction": 0.1,
}


def final_val_loss(run_dir: Path) -> float:
    evals = records(run_dir, "eval")
    assert evals[-1]["step"] == STEPS
    return float(evals[-1]["val_loss"])


def test_ane_sim_trains_like_the_float32_pipeline_and_resumes(tmp_path: Path) -> None:
    model, data = write_model(tmp_path, **MODEL), valid_head_tokens()
    ane, base, split = tmp_path / "ane", tmp_path / "base", tmp_path / "split"
    r = run_cli(train_argv(model, data, ane, backend="ane-sim", **OPTIONS))
    assert r.rc == 0, r.err
    log = r.err + r.out
    assert "ANE programs: original (packed inputs), chip m4 (auto: not an Apple silicon Mac" in log
    r = run_cli(train_argv(model, data, base, **{**OPTIONS, **BASELINE}))
    assert r.rc == 0, r.err
    a, b = final_val_loss(ane), final_val_loss(base)
    assert b < 5.0  # it learned (from ln 512 = 6.24)
    print(f"validation loss after {STEPS} steps: ane-sim {a:.4f}, baseline {b:.4f}")
    assert abs(a - b) <= 0.03 * b, f"ane-sim {a:.4f} vs baseline {b:.4f}"
    # the Efficiency Report shows the ANE programs' and the IO milliseconds
    rep = json.loads((ane / "report.json").read_text())
    assert rep["phases_ms_per_step"]["ane"] > 0 and rep["io_ms_per_step"] > 0
    assert "ANE:" in log and "IO:" in log
    # --stop-at, then --resume: the same run
    r = run_cli(train_argv(model, data, split, backend="ane-sim", stop_at=30, **OPTIONS))
    assert r.rc == 0, r.err
    assert records(split, "eval")[-1]["step"] == 30
    r = run_cli(["train", "--resume", str(split)])
    assert r.rc == 0, r.err
    assert abs(final_val_loss(split) - a) <= 1e-4 * a
    steps = [rec["step"] for rec in records(split, "step")]
    assert steps[-1] == STEPS and sorted(set(steps)) == list(range(1, STEPS + 1))


def test_a_program_over_the_chip_limit_is_refused_before_any_work(tmp_path: Path) -> None:
    """M1/M2 allow tensors 16,384 wide; ffnFused's packed input is 2 S + 3 hidden = 16,576 wide here."""
    model = write_model(tmp_path, hidden_dim=5504, n_layers=1)
    out = tmp_path / "run"
    argv = train_argv(
        model, valid_head_tokens(), out, backend="ane-sim", ane_chip="m1", pipeline=None, dtype=None
    )
    line = error_line(run_cli(argv))
    assert line == (
        "anetrain: error: ANE program ffn_fused: tensor x [1, 32, 1, 16576] has width 16576, above the limit "
        "of 16384 on m1"
    )
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()
