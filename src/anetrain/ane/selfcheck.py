"""``anetrain ane selfcheck``: run the kernels on this Mac's Neural Engine, compare them with the simulator.

It builds the kernel programs of a small model (:data:`SELFCHECK_MODEL`: GQA, head_dim 32, hidden 344
padded to 352, seq 64) for the chosen chip, runs each requested program (default: all ten of the default
set, the original trainer's programs) on random inputs on the device and in the simulator (:mod:`.sim`),
and reports per output the largest absolute difference and that difference relative to the largest
simulated magnitude. A program passes when every output is finite and within :data:`TOLERANCE` (fp16
values; the ANE's accumulation order and width differ from the simulator's fp32, so a few fp16 ulps of the
output range are expected, garbage is not).

When a program of the default set is refused or wrong, the same kernel is tried in the other forms
(:data:`FORMS`: anetrain's programs with packed, then separate inputs) and the report says which pass, so
one report from a Mac tells which form of each kernel this machine accepts. The report ends with one JSON
line to paste into a bug report (``programs[i].fallbacks`` and ``passing_forms`` hold the same).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from ..config import make_config
from ..errors import AnetrainError
from .programs import BACKWARD, EXTRAS, FORWARD, KernelSet, build_kernel_set
from .sim import SimExecutor
from .surfaces import Staging

SELFCHECK_MODEL = make_config(
    name="selfcheck", dim=128, hidden_dim=344, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=256, seq_len=64
)
DEFAULT_PROGRAMS = FORWARD + BACKWARD
ALL_PROGRAMS = FORWARD + BACKWARD + EXTRAS
FORMS = (("original", "packed"), ("anetrain", "packed"), ("anetrain", "separate"))  # (program set, inputs)
TOLERANCE = 1e-2  # max |device - simulator| / max |simulator|, per output


def form_name(programs: str, inputs: str) -> str:
    return f"{programs}/{inputs}"


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


def check_one(
    executor: Any, ks: KernelSet, name: str, rng: np.random.Generator, tolerance: float = TOLERANCE
) -> dict[str, Any]:
    """Run program ``name`` of ``ks`` on ``executor`` and in the simulator; one result row."""
    program = ks[name]
    st = random_operands(program, rng)
    reference = SimExecutor().run(program, st.arrays)
    row: dict[str, Any] = {"program": name, "form": form_name(ks.program_set, ks.convention)}
    if program.program_set == "original":
        row["original_name"] = program.stem
    try:
        got = executor.run(program, st.arrays)
    except AnetrainError as e:
        return {**row, "pass": False, "error": str(e)}
    outputs = compare(got, reference)
    ok = all(o["finite"] and o["max_rel"] <= tolerance for o in outputs.values())
    return {
        **row,
        "pass": ok,
        "max_abs": max(o["max_abs"] for o in outputs.values()),
        "max_rel": max(o["max_rel"] for o in outputs.values()),
        "outputs": outputs,
    }


def check_programs(
    executor: Any,
    chip: str,
    programs: tuple[str, ...] | list[str] = DEFAULT_PROGRAMS,
    *,
    program_set: str = "original",
    inputs: str = "packed",
    fallbacks: bool = True,
    seed: int = 0,
    tolerance: float = TOLERANCE,
) -> list[dict[str, Any]]:
    """Run each named program in the given form on ``executor`` and in the simulator, one row per program;
    with ``fallbacks``, a program that fails is tried in every other form of :data:`FORMS` too (its row's
    ``fallbacks``). Programs the set lacks (anetrain's extras) come from anetrain's set in that form."""
    sets: dict[tuple[str, str], KernelSet] = {}

    def kernel_set(form: tuple[str, str]) -> KernelSet:
        if form not in sets:
            sets[form] = build_kernel_set(SELFCHECK_MODEL, chip, form[1], extras=True, programs=form[0])
        return sets[form]

    first = kernel_set((program_set, inputs))
    unknown = [n for n in programs if n not in first.programs]
    if unknown:
        raise AnetrainError(f"unknown program(s) {', '.join(unknown)} (known: {', '.join(first.programs)})")
    rng = np.random.default_rng(seed)
    rows = []
    for name in programs:
        row = check_one(executor, first, name, rng, tolerance)
        if fallbacks and not row["pass"]:
            tried = {row["form"]}
            row["fallbacks"] = []
            for form in FORMS:
                ks = kernel_set(form)
                if form_name(*form) in tried or ks[name].program_set != form[0]:
                    continue  # the same program, or an extra that only one set has
                tried.add(form_name(*form))
                alt = check_one(executor, ks, name, rng, tolerance)
                row["fallbacks"].append({k: v for k, v in alt.items() if k not in ("outputs", "program")})
        rows.append(row)
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
        # per program, every form that passed (the default's first): what a Mac accepts
        "passing_forms": {
            r["program"]: [f["form"] for f in [r, *r.get("fallbacks", [])] if f["pass"]] for r in rows
        },
    }
    if executor_stats is not None:
        rep["compile_ms"] = 1e3 * executor_stats.compile_s
        rep["eval_ms"] = 1e3 * executor_stats.eval_s / max(1, executor_stats.evals)
    return rep


def _verdict(r: dict[str, Any]) -> str:
    if r.get("error"):
        return f"FAIL  {r['error']}"
    verdict = "PASS" if r["pass"] else "FAIL"
    return f"{verdict}  max abs error {r['max_abs']:.3e}, max rel error {r['max_rel']:.3e}"


def format_report(rep: dict[str, Any]) -> str:
    m = rep["machine"]
    cpu = f"{m['cpu_brand']} ({m.get('chip') or 'unknown family'}), " if m.get("cpu_brand") else ""
    lines = [
        f"machine: {cpu}{m.get('os')}; Python {m.get('python')}; anetrain {m.get('anetrain')}",
        f"programs for {rep['chip']} ({rep['model']}), runtime {rep['runtime']}, "
        f"tolerance {rep['tolerance']:g} of each output's range; form {rep['programs'][0]['form']}"
        if rep["programs"]
        else f"programs for {rep['chip']} ({rep['model']}), runtime {rep['runtime']}",
    ]
    for r in rep["programs"]:
        lines.append(f"  {r['program']:<13} {_verdict(r)}")
        for f in r.get("fallbacks", []):
            lines.append(f"    as {f['form']:<18} {_verdict(f)}")
        if "fallbacks" in r:
            ok = [f["form"] for f in r["fallbacks"] if f["pass"]]
            lines.append(f"    forms that pass: {', '.join(ok) if ok else 'none'}")
    if "compile_ms" in rep:
        lines.append(
            f"compile {rep['compile_ms']:.0f} ms, evaluation {rep['eval_ms']:.2f} ms per program run"
        )
    lines.append(rep["result"])
    lines.append("for a bug report, paste this line:")
    lines.append(json.dumps(rep, separators=(",", ":"), sort_keys=True))
    return "\n".join(lines)
