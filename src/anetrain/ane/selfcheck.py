"""``anetrain ane selfcheck``: compile a kernel on this Mac's Neural Engine and compare it with the simulator.

It builds the kernel programs of a small model (:data:`SELFCHECK_MODEL`: GQA, head_dim 32, hidden 344
padded to 352, seq 64) for the chosen chip, runs each requested program (default: the fused FFN forward) on
random inputs on the device and in the simulator (:mod:`.sim`), and reports per output the largest absolute
difference and that difference relative to the largest simulated magnitude. A program passes when every
output is finite and within :data:`TOLERANCE` (fp16 values; the ANE's accumulation order and width differ
from the simulator's fp32, so a few fp16 ulps of the output range are expected, garbage is not). The report
ends with one JSON line to paste into a bug report.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from ..config import make_config
from ..errors import AnetrainError
from .programs import build_kernel_set
from .sim import SimExecutor
from .surfaces import Staging

SELFCHECK_MODEL = make_config(
    name="selfcheck", dim=128, hidden_dim=344, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=256, seq_len=64
)
DEFAULT_PROGRAMS = ("ffn_fused",)
TOLERANCE = 1e-2  # max |device - simulator| / max |simulator|, per output


def random_operands(program: Any, rng: np.random.Generator) -> Staging:
    """The program's inputs staged from random operands: activations N(0, 1), weights N(0, 1/in), gains
    1 + N(0, 0.1^2), placed and padded as the pipeline places them."""
    st = Staging(program)
    for name, p in program.in_placements.items():
        v = rng.standard_normal((p.rows.n, p.cols.n))
        if name.startswith("w"):
            v /= np.sqrt(p.cols.n)
        elif name == "g":
            v = 1.0 + 0.1 * v
        st.write(name, v)
    return st


def compare(device: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Per output: max abs difference, that difference over the max |reference|, and finiteness."""
    out = {}
    for name, ref in reference.items():
        r = np.asarray(ref, dtype=np.float64)
        d = np.asarray(device[name], dtype=np.float64).reshape(r.shape)
        diff = np.abs(d - r)
        scale = float(np.abs(r).max()) or 1.0
        out[name] = {
            "max_abs": float(diff.max()),
            "max_rel": float(diff.max()) / scale,
            "finite": bool(np.isfinite(d).all()),
        }
    return out


def check_programs(
    executor: Any,
    chip: str,
    programs: tuple[str, ...] | list[str] = DEFAULT_PROGRAMS,
    *,
    inputs: str = "separate",
    seed: int = 0,
    tolerance: float = TOLERANCE,
) -> list[dict[str, Any]]:
    """Run each named program on ``executor`` and in the simulator; one result row per program."""
    ks = build_kernel_set(SELFCHECK_MODEL, chip, inputs, extras=True)
    unknown = [n for n in programs if n not in ks.programs]
    if unknown:
        raise AnetrainError(f"unknown program(s) {', '.join(unknown)} (known: {', '.join(ks.programs)})")
    sim = SimExecutor()
    rng = np.random.default_rng(seed)
    rows = []
    for name in programs:
        program = ks[name]
        st = random_operands(program, rng)
        reference = sim.run(program, st.arrays)
        try:
            got = executor.run(program, st.arrays)
        except AnetrainError as e:
            rows.append({"program": name, "pass": False, "error": str(e)})
            continue
        outputs = compare(got, reference)
        ok = all(o["finite"] and o["max_rel"] <= tolerance for o in outputs.values())
        rows.append(
            {
                "program": name,
                "pass": ok,
                "max_abs": max(o["max_abs"] for o in outputs.values()),
                "max_rel": max(o["max_rel"] for o in outputs.values()),
                "outputs": outputs,
            }
        )
    return rows


def selfcheck_report(
    rows: list[dict[str, Any]],
    *,
    chip: str,
    runtime: str,
    machine: dict[str, Any],
    executor_stats: Any = None,
    tolerance: float = TOLERANCE,
) -> dict[str, Any]:
    rep: dict[str, Any] = {
        "check": "anetrain ane selfcheck",
        "result": "PASS" if rows and all(r["pass"] for r in rows) else "FAIL",
        "chip": chip,
        "runtime": runtime,
        "model": SELFCHECK_MODEL.shape_line(),
        "tolerance": tolerance,
        "machine": machine,
        "programs": [{k: v for k, v in r.items() if k != "outputs"} for r in rows],
    }
    if executor_stats is not None:
        rep["compile_ms"] = 1e3 * executor_stats.compile_s
        rep["eval_ms"] = 1e3 * executor_stats.eval_s / max(1, executor_stats.evals)
    return rep


def format_report(rep: dict[str, Any]) -> str:
    m = rep["machine"]
    cpu = f"{m['cpu_brand']} ({m.get('chip') or 'unknown family'}), " if m.get("cpu_brand") else ""
    lines = [
        f"machine: {cpu}{m.get('os')}; Python {m.get('python')}; anetrain {m.get('anetrain')}",
        f"programs for {rep['chip']} ({rep['model']}), runtime {rep['runtime']}, "
        f"tolerance {rep['tolerance']:g} of each output's range",
    ]
    for r in rep["programs"]:
        if r.get("error"):
            lines.append(f"  {r['program']:<13} FAIL  {r['error']}")
        else:
            lines.append(
                f"  {r['program']:<13} {'PASS' if r['pass'] else 'FAIL'}  max abs error {r['max_abs']:.3e}, "
                f"max rel error {r['max_rel']:.3e}"
            )
    if "compile_ms" in rep:
        lines.append(
            f"compile {rep['compile_ms']:.0f} ms, evaluation {rep['eval_ms']:.2f} ms per program run"
        )
    lines.append(rep["result"])
    lines.append("for a bug report, paste this line:")
    lines.append(json.dumps(rep, separators=(",", ":"), sort_keys=True))
    return "\n".join(lines)
