"""``anetrain.ane.bench.run_ane_bench`` (what ``anetrain bench --backend ane`` runs) with the simulator as
the device: the Efficiency Report fields follow the original's accounting (docs/ane.md, appendix A.5); the
numbers a Mac would produce cannot be produced here."""

from __future__ import annotations

import statistics

import numpy as np
import pytest

from anetrain.ane.bench import ane_flops_per_step, format_ane_report, run_ane_bench, total_flops_per_step
from anetrain.config import make_config
from anetrain.telemetry.flops import attention_flops, forward_matmul_flops

CFG = make_config(
    name="tiny", dim=64, hidden_dim=80, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, seq_len=32
)


@pytest.mark.parametrize("form", [("original", "packed"), ("anetrain", "separate")], ids="/".join)
def test_ane_bench_reports_the_original_fields_with_the_simulator(form: tuple[str, str]) -> None:
    cfg = CFG
    lines: list[str] = []
    rep = run_ane_bench(cfg, 2, 16, 2, 2, "auto", form[1], lines.append, executor="sim", programs=form[0])
    assert lines and "runtime sim" in lines[0] and f"{form[0]} programs, {form[1]} inputs" in lines[0]
    assert (rep["programs"], rep["inputs"]) == form
    assert (rep["chip"], rep["runtime"], rep["backend"], rep["isolated"]) == ("m4", "sim", "ane", False)
    assert rep["total_steps"] == 4 and rep["compiles"] == 10 and rep["worker_restarts"] == 0
    assert rep["ane_flops_per_step"] == 2 * (2 * forward_matmul_flops(cfg, 16) + attention_flops(cfg, 16))
    assert ane_flops_per_step(cfg, 16, 2) < total_flops_per_step(cfg, 16, 2)
    assert rep["ane_tflops"] == pytest.approx(rep["ane_flops_per_step"] / (rep["ms_per_step"] / 1e3) / 1e12)
    assert rep["peak_tflops"] == 15.8 and rep["peak_source"].startswith("published, not measured")
    assert rep["utilization"] == pytest.approx(rep["ane_tflops"] / 15.8)
    assert rep["ane_evals_per_step"] == 2 * 2 * 10  # 10 programs per layer and sequence
    assert (
        rep["io_ms_per_step"] > 0
        and rep["compile_s"] > 0
        and rep["ms_per_step_with_optimizer"] >= rep["ms_per_step"]
    )
    assert len(rep["losses"]) == 4 and all(np.isfinite(rep["losses"]))
    assert statistics.fmean(rep["losses"]) == pytest.approx(np.log(96), rel=0.1)
    text = format_ane_report(rep)
    assert "ANE TFLOPS:" in text and "published, not measured" in text and "10 compiles" in text


def test_bench_cli_with_the_ane_simulator_and_default_options(tmp_path, capsys) -> None:
    """`anetrain bench --backend ane-sim` needs no other ANE option (the chip: m4 off a Mac)."""
    import json

    from anetrain.cli import main

    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps({k: v for k, v in CFG.to_dict().items() if k != "name"}))
    out = tmp_path / "ane.json"
    argv = ["bench", "--backend", "ane-sim", "--model", str(cfg), "--batch", "1", "--seq", "16"]
    assert main([*argv, "--accum", "1", "--steps", "2", "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert (rep["chip"], rep["programs"], rep["inputs"], rep["runtime"]) == (
        "m4",
        "original",
        "packed",
        "sim",
    )
    assert rep["total_steps"] == 5 and rep["io_ms_per_step"] > 0 and rep["ms_per_step"] > 0  # 3 warm-up
    text = capsys.readouterr().out
    assert "ANE TFLOPS:" in text and "IO:" in text and "ANE evaluations" in text
