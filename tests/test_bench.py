"""``anetrain bench``: one process runs the reference model (the usual autograd trainer), the baseline and the
optimized pipeline on the same tokens and weights, prints one table and writes the issue's JSON layout."""

from __future__ import annotations

import json

import pytest

from anetrain.cli import main

TINY = {
    "dim": 64,
    "hidden_dim": 172,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "vocab_size": 96,
    "seq_len": 32,
}
ROW_KEYS = {
    "name",
    "ms_per_step",
    "tokens_per_s",
    "tflops",
    "utilization",
    "io_ms",
    "optimizer_ms",
    "peak_rss_mb",
    "speedup_vs_reference",
    "losses",
}


@pytest.fixture()
def tiny_model(tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY))
    return str(path)


def test_bench_table_json_and_loss_check(tiny_model, tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "--model", tiny_model, "--batch", "2", "--seq", "16", "--accum", "2", "--steps", "3"]
    argv += ["--warmup", "2", "--dtype", "fp32", "--no-compile", "--repeat", "2", "--json", str(out)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    for name in ("reference", "baseline", "optimized"):
        assert name in table
    assert "loss trajectory, optimized vs reference" in table and "OK" in table
    res = json.loads(out.read_text())
    assert {"machine", "config", "rows"} <= res.keys()
    assert res["machine"]["cores"] >= 1 and res["machine"]["torch"]
    assert (res["config"]["batch"], res["config"]["seq"], res["config"]["accum"]) == (2, 16, 2)
    assert (res["config"]["repeat"], res["config"]["dtype"]) == (2, "fp32")
    rows = {r["name"]: r for r in res["rows"]}
    assert list(rows) == ["reference", "baseline", "optimized"]
    for r in rows.values():
        assert r.keys() >= ROW_KEYS
        assert r["ms_per_step"] > 0 and r["peak_rss_mb"] > 0 and r["optimizer_ms"] > 0
        assert r["tokens_per_s"] == pytest.approx(2 * 16 / (r["ms_per_step"] / 1e3))
        assert r["speedup_vs_reference"] == pytest.approx(rows["reference"]["ms_per_step"] / r["ms_per_step"])
        assert len(r["losses"]) == 5  # warm-up + timed micro-steps, from the first round
    # float32 everywhere: the optimized pipeline's losses follow the reference model's to float rounding
    for a, b in zip(rows["optimized"]["losses"], rows["reference"]["losses"], strict=True):
        assert a == pytest.approx(b, rel=1e-5)
    assert rows["reference"]["speedup_vs_reference"] == pytest.approx(1.0)


def test_bench_rows_subset_and_bad_input(tiny_model, capsys):
    argv = ["bench", "--model", tiny_model, "--batch", "1", "--seq", "8", "--accum", "1", "--steps", "2"]
    assert main([*argv, "--warmup", "1", "--rows", "optimized", "--fusion", "hand", "--dtype", "bf16"]) == 0
    table = capsys.readouterr().out
    assert "optimized" in table and "reference" not in table and "n/a" in table  # no reference: no speedup
    assert main([*argv, "--rows", "nonsense"]) == 2
    assert "unknown bench row 'nonsense'" in capsys.readouterr().err
    assert main([*argv, "--repeat", "0"]) == 2
    assert "--repeat must be positive" in capsys.readouterr().err


def test_bench_compiled_reference_row_and_the_loss_mismatch_branch(tiny_model, tmp_path, capsys, monkeypatch):
    """The reference row as `anetrain bench` runs it by default (its loss torch.compile'd: dynamo captures
    graphs, the warm-up includes the compilation), and the loss check's other branch: with a tolerance no
    16-bit run meets, the table says MISMATCH, the JSON says so and the command exits 1."""
    from torch._dynamo.utils import counters

    from anetrain import bench

    monkeypatch.setattr(bench, "LOSS_TOLERANCE", {**bench.LOSS_TOLERANCE, "bf16": 1e-9})
    graphs_before = counters["stats"]["unique_graphs"]
    out = tmp_path / "bench.json"
    argv = ["bench", "--model", tiny_model, "--batch", "2", "--seq", "8", "--accum", "1", "--steps", "2"]
    argv += ["--warmup", "1", "--dtype", "bf16", "--rows", "reference,optimized", "--json", str(out)]
    assert main(argv) == 1
    assert counters["stats"]["unique_graphs"] > graphs_before  # the reference model ran compiled
    table = capsys.readouterr().out
    assert "(tolerance 1e-09): MISMATCH" in table
    res = json.loads(out.read_text())
    check, rows = res["loss_check"], {r["name"]: r for r in res["rows"]}
    assert check["ok"] is False and 1e-9 < check["max_rel_diff"] < 3e-2  # close, as bf16 runs are
    assert rows["reference"]["warmup_s"] > 0 and len(rows["reference"]["losses"]) == 3
    for a, b in zip(rows["optimized"]["losses"], rows["reference"]["losses"], strict=True):
        assert a == pytest.approx(b, rel=3e-2)
