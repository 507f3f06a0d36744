"""``anetrain ane selfcheck`` with the simulator standing in for the Neural Engine: what it measures on a Mac
cannot be measured here; that it computes, compares and reports correctly can."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from anetrain.ane.machine import is_macos
from anetrain.ane.runtime import AneRuntimeExecutor
from anetrain.ane.runtime.device import SimDevice
from anetrain.ane.selfcheck import (
    DEFAULT_PROGRAMS,
    SELFCHECK_MODEL,
    TOLERANCE,
    check_programs,
    compare,
    format_report,
    selfcheck_report,
)
from anetrain.cli import main
from anetrain.errors import AnetrainError


class Perturbed(AneRuntimeExecutor):
    """A "device" whose outputs are off by a given relative amount (what a broken binding would look like)."""

    def __init__(self, rel: float) -> None:
        super().__init__(SimDevice())
        self.rel = rel

    def run(self, program: Any, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = super().run(program, inputs)
        return {
            k: (v.astype(np.float32) + self.rel * np.abs(v).max()).astype(np.float16) for k, v in out.items()
        }


def test_compare_measures_against_the_output_range() -> None:
    ref = {"y": np.array([[1.0, -4.0], [2.0, 0.0]], dtype=np.float16)}
    got = {"y": np.array([[1.0, -4.0], [2.5, np.inf]], dtype=np.float16)}
    c = compare(got, ref)["y"]
    assert c["max_rel"] == np.inf and not c["finite"]
    c = compare({"y": np.array([[1.0, -3.0], [2.0, 0.0]])}, ref)["y"]
    assert (c["max_abs"], c["max_rel"], c["finite"]) == (1.0, 0.25, True)


def test_selfcheck_passes_an_exact_device_and_fails_a_wrong_one() -> None:
    good = check_programs(AneRuntimeExecutor(SimDevice()), "m4", ["ffn_fused", "sdpa_fwd"])
    assert [(r["program"], r["pass"], r["max_abs"]) for r in good] == [
        ("ffn_fused", True, 0.0),
        ("sdpa_fwd", True, 0.0),
    ]
    small = check_programs(Perturbed(TOLERANCE / 4), "m1", ["ffn_fused"])[0]
    assert small["pass"] and 0 < small["max_rel"] <= TOLERANCE
    bad = check_programs(Perturbed(4 * TOLERANCE), "m1", ["ffn_fused"])[0]
    assert not bad["pass"] and bad["max_rel"] > TOLERANCE
    assert SELFCHECK_MODEL.hidden_dim % 32 != 0  # the check includes a padded dimension


def test_selfcheck_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "selfcheck.json"
    rc = main(
        [
            "ane",
            "selfcheck",
            "--runtime",
            "sim",
            "--chip",
            "m2",
            "--program",
            "ffn_fused,rmsnorm_bwd",
            "--json",
            str(report),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    lines = out.strip().splitlines()
    assert lines[-3] == "PASS" and lines[-2] == "for a bug report, paste this line:"
    line = json.loads(lines[-1])
    assert line["result"] == "PASS" and line["chip"] == "m2" and line["runtime"] == "sim"
    assert [p["program"] for p in line["programs"]] == ["ffn_fused", "rmsnorm_bwd"]
    assert {"os", "macos", "cpu_brand", "chip", "python", "anetrain"} <= set(line["machine"])
    assert "ffn_fused     PASS  max abs error 0.000e+00, max rel error 0.000e+00" in out
    assert json.loads(report.read_text())["result"] == "PASS"
    assert main(["ane", "selfcheck", "--runtime", "sim", "--program", "nope"]) == 2
    assert "unknown program(s) nope" in capsys.readouterr().err


@pytest.mark.skipif(is_macos(), reason="checks the refusal on a machine that is not a Mac")
def test_selfcheck_off_a_mac_explains_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ane", "selfcheck"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "anetrain: error: anetrain ane selfcheck (it runs a program on the Neural Engine) needs macOS"
    )
    assert "this is Linux" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["ane", "selfcheck", "--runtime", "coreml"]) == 2
    assert "needs macOS" in capsys.readouterr().err


class RefusesInterleave(AneRuntimeExecutor):
    """A "device" that refuses concat(interleave=true), the one op form of the default set the original never
    ran, and gets separate-input requests wrong (what a Mac might do)."""

    def __init__(self) -> None:
        super().__init__(SimDevice())

    def run(self, program: Any, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "interleave=cil" in program.mil_text:
            raise AnetrainError(f"compile of {program.name} failed: status 0x1d")
        out = super().run(program, inputs)
        if program.convention == "separate":
            return {k: np.zeros_like(v) for k, v in out.items()}
        return out


def test_a_refused_program_is_tried_in_the_other_forms_and_the_report_says_which_pass() -> None:
    rows = check_programs(RefusesInterleave(), "m4")
    assert [r["program"] for r in rows] == list(DEFAULT_PROGRAMS)
    by_name = {r["program"]: r for r in rows}
    sdpa = by_name["sdpa_fwd"]
    assert not sdpa["pass"] and "status 0x1d" in sdpa["error"] and sdpa["original_name"] == "sdpaFwd"
    assert [(f["form"], f["pass"]) for f in sdpa["fallbacks"]] == [
        ("anetrain/packed", True),
        ("anetrain/separate", False),
    ]
    assert all(by_name[n]["pass"] and "fallbacks" not in by_name[n] for n in DEFAULT_PROGRAMS[1:])
    rep = selfcheck_report(rows, chip="m4", runtime="private", machine={"os": "test"})
    assert rep["result"] == "FAIL"
    assert rep["passing_forms"]["sdpa_fwd"] == ["anetrain/packed"]
    assert rep["passing_forms"]["wo_fwd"] == ["original/packed"]
    text = format_report(rep)
    assert "  sdpa_fwd      FAIL  compile of sdpa_fwd failed: status 0x1d" in text
    assert "    as anetrain/packed    PASS" in text and "    forms that pass: anetrain/packed" in text
    line = json.loads(text.splitlines()[-1])
    assert line["passing_forms"] == rep["passing_forms"]
