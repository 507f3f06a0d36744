"""``anetrain bench --generate``: the rows it measures, the peers it runs, the table and JSON it writes.

Speed is not asserted (benchmarks are commands that print numbers); what is checked is that every row ran,
that peers are invoked as run.c / runq.c expect and their numbers enter the ratios, and that failures are
one-line errors.
"""

from __future__ import annotations

import json
import stat

import pytest

from anetrain.cli import main
from anetrain.errors import InputError
from anetrain.generate.bench import GenBenchConfig, format_generation_table, run_generation_bench
from conftest import shared_file


def fake_peer(tmp_path, name: str, rate: str, log: str) -> str:
    """A stand-in for a compiled run.c: records its arguments and OMP_NUM_THREADS, reports a speed."""
    path = tmp_path / name
    path.write_text(
        "#!/bin/sh\n"
        f'echo "$@ OMP=$OMP_NUM_THREADS" >> {log}\n'
        f'test -f "$1" || exit 3\n'
        f'echo "achieved tok/s: {rate}" >&2\n'
    )
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_rows_peers_and_ratios(tmp_path) -> None:
    log = tmp_path / "calls.txt"
    bc = GenBenchConfig(
        model=str(shared_file("stories260K.bin")),
        dtypes=("fp32", "int8"),
        streams=(1, 3),
        steps=12,
        prompt=6,
        repeat=2,
        threads=1,
        peer_runc=fake_peer(tmp_path, "run", "100.0", str(log)),
        peer_runq=fake_peer(tmp_path, "runq", "50.0", str(log)),
        tokenizer=str(shared_file("tok512.bin")),
        bandwidth_mib=16,
    )
    result = run_generation_bench(bc, log=lambda _line: None)
    rows = {(r["name"], r["dtype"], r["streams"]): r for r in result["rows"]}
    assert set(rows) == {
        ("anetrain", "fp32", 1), ("anetrain", "fp32", 3), ("anetrain", "int8", 1), ("anetrain", "int8", 3),
        ("run.c", "fp32", 1), ("runq.c", "int8", 1),
    }  # fmt: skip
    for key, r in rows.items():
        assert len(r["decode_rounds"]) == 2 and r["decode_tokens_per_s"] > 0, key
    assert (
        rows[("anetrain", "fp32", 1)]["prefill_tokens"] == 6
        and rows[("anetrain", "fp32", 1)]["prefill_ms"] > 0
    )
    assert rows[("anetrain", "fp32", 3)]["prefill_ms"] is None
    assert rows[("run.c", "fp32", 1)]["decode_tokens_per_s"] == 100.0
    mine = rows[("anetrain", "int8", 1)]
    assert mine["vs_runc"] == pytest.approx(mine["decode_tokens_per_s"] / 100.0)
    assert mine["vs_runq"] == pytest.approx(mine["decode_tokens_per_s"] / 50.0)
    fp32 = rows[("anetrain", "fp32", 1)]
    assert fp32["weight_bytes_per_step"] == rows[("run.c", "fp32", 1)]["weight_bytes_per_step"] > 0
    calls = log.read_text().splitlines()
    assert len(calls) == 4  # two rounds of two peers
    assert calls[0].startswith(str(shared_file("stories260K.bin")))  # a v0 file is given to run.c as is
    assert "-t 0 -n 12 -s 1 OMP=1" in calls[0] and "model.v2.bin" in calls[1]
    assert {t["target"] for t in result["targets"]} >= {"fp32 >= run.c", "int8 >= runq.c"}
    table = format_generation_table(result)
    assert "run.c" in table and "runq.c" in table and "target fp32 >= run.c" in table


def test_a_failing_peer_is_a_one_line_error(tmp_path) -> None:
    bad = tmp_path / "bad"
    bad.write_text("#!/bin/sh\necho 'cannot open model' >&2\nexit 1\n")
    bad.chmod(0o755)
    bc = GenBenchConfig(
        model=str(shared_file("stories260K.bin")), dtypes=("fp32",), streams=(1,), steps=4, prompt=2,
        repeat=1, threads=1, peer_runc=str(bad), tokenizer=str(shared_file("tok512.bin")),
    )  # fmt: skip
    with pytest.raises(InputError, match="did not report its speed \\(exit 1\\): cannot open model"):
        run_generation_bench(bc, log=lambda _line: None)


def test_command_prints_the_table_and_writes_json(tmp_path, capsys) -> None:
    out_json = tmp_path / "gen.json"
    args = ["bench", "--generate", "--model", str(shared_file("stories260K.bin")), "--gen-dtypes", "bf16",
            "--gen-streams", "2", "--gen-steps", "6", "--gen-prompt", "3", "--repeat", "1", "--threads", "1",
            "--json", str(out_json)]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "decode tok/s" in out and "bf16" in out and "memory read bandwidth" in out
    result = json.loads(out_json.read_text())
    assert [(r["dtype"], r["streams"]) for r in result["rows"]] == [("bf16", 2)]
    assert main(["bench", "--generate", "--model", "nope.bin"]) == 2
    assert main([*args[:4], "--peer-runc", "/bin/true"]) == 2  # a peer needs --tokenizer
