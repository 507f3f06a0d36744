"""``anetrain ane ...``: Apple Neural Engine tools.

``emit`` writes a model's kernel programs (MIL text); ``selfcheck`` runs a kernel on this Mac's Neural
Engine and compares it with the simulator; ``peak`` measures the Neural Engine's throughput with the
original's conv-chain probes (or, with ``--emit``, writes those programs on any machine).

Each subcommand is a ``register_<name>(subparsers)`` function listed in :data:`SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

ORDER = 70


def _emit(args: argparse.Namespace) -> int:
    from ..ane.emit import emit_kernel_set
    from ..ane.limits import MAX_WIDTH
    from ..ane.machine import resolve_sim_chip
    from ..ane.programs import build_kernel_set
    from ..config import resolve_config
    from ..errors import ConfigError

    cfg = resolve_config(args.model)
    seq = args.seq if args.seq is not None else cfg.seq_len
    if seq > max(MAX_WIDTH.values()):  # checked before any program or blob is built
        raise ConfigError(
            f"sequence length {seq} is above {max(MAX_WIDTH.values())}, the widest tensor a Neural Engine "
            "program can have"
        )
    chip, how = resolve_sim_chip(args.chip)
    ks = build_kernel_set(cfg, chip, args.inputs, seq=args.seq, extras=args.extras, programs=args.programs)
    files = emit_kernel_set(ks, args.out)
    pad = ", ".join(f"{k} {a}->{b}" for k, (a, b) in ks.dims.padding().items()) or "none"
    d = ks.dialect
    print(
        f"wrote {len(ks)} programs for {cfg.name} ({cfg.shape_line()}) to {args.out}: "
        f"{ks.program_set} programs, {d.chip} ({how}), program({d.program_version})/{d.opset}, "
        f"{ks.convention} inputs, seq {ks.dims.seq}; padding: {pad}; {len(files)} files"
    )
    for p in ks:
        print(
            f"  {p.stem:<13} in {len(p.inputs)} x {p.input_alloc_bytes:>9,} B   "
            f"out {len(p.outputs)} x {p.output_alloc_bytes:>9,} B   {p.doc}"
        )
    return 0


def register_emit(sub: Any) -> None:
    from ..ane.dialect import CHIPS
    from ..ane.program import CONVENTIONS
    from ..ane.programs import PROGRAM_SETS
    from ..cli import HelpFormatter

    p = sub.add_parser(
        "emit",
        help="write a model's ANE kernel programs (MIL text, weight blobs, manifest.json)",
        description="Generate the ten dynamic-weight kernel programs of a model (forward and dx; the "
        "original trainer's programs by default, byte for byte its text for its configuration: "
        "--model stories110M-original) for one chip and write them to a directory: one .mil file per "
        "program, the weight blobs under weights/, sizes.txt with each program's surface sizes, and "
        "manifest.json with every program's inputs, outputs, binding order, surface allocation sizes, "
        "operand placements and padding. A macOS runtime compiles exactly these files.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--model", required=True, help="a preset name or a .toml/.json model config file")
    p.add_argument(
        "--chip",
        default="auto",
        choices=("auto", *CHIPS),
        help="Apple silicon family (selects the MIL dialect); auto: this Mac's, m4 on any other machine",
    )
    p.add_argument(
        "--programs",
        default=PROGRAM_SETS[0],
        choices=PROGRAM_SETS,
        help="original: the original trainer's programs (one packed input each); anetrain: this project's "
        "own forms (never run on hardware)",
    )
    p.add_argument(
        "--inputs",
        default=CONVENTIONS[0],
        choices=CONVENTIONS,
        help="packed: one input surface holding activations and weights, as the original; separate: one "
        "surface per operand (--programs anetrain only; never run on hardware)",
    )
    p.add_argument(
        "--seq",
        type=int,
        default=None,
        help="sequence length the programs are built for; none: the model's seq_len",
    )
    p.add_argument(
        "--extras",
        action="store_true",
        help="add anetrain's final RMSNorm, classifier, softmax and RMSNorm-backward programs (the original "
        "has none; never run on hardware)",
    )
    p.add_argument(
        "--no-extras",
        action="store_false",
        dest="extras",
        help="no extras (the default; kept for old scripts)",
    )
    p.add_argument("--out", required=True, help="directory to write (created if needed)")
    p.set_defaults(func=_emit)


# ------------------------------------------------------------------------------------------------
# selfcheck


def _selfcheck(args: argparse.Namespace) -> int:
    from ..ane.machine import machine_info, require_apple_silicon, require_macos
    from ..ane.runtime import make_executor, resolve_runtime_chip
    from ..ane.selfcheck import (
        ALL_PROGRAMS,
        DEFAULT_PROGRAMS,
        check_programs,
        format_report,
        selfcheck_report,
    )
    from ..fsutil import atomic_write_text

    what = "anetrain ane selfcheck (it runs a program on the Neural Engine)"
    if args.runtime == "private":
        require_apple_silicon(what, "'anetrain ane emit' writes the programs on any machine")
    elif args.runtime == "coreml":
        require_macos(what)
    info = resolve_runtime_chip(args.chip, args.runtime)
    programs = [p.strip() for p in args.program.split(",") if p.strip()] if args.program else []
    if programs == ["all"]:
        programs = list(ALL_PROGRAMS)
    # the private runtime in a worker process: a crash inside the framework becomes a line in the report
    executor = make_executor(args.runtime, isolate=args.runtime == "private")
    try:
        rows = check_programs(
            executor,
            info.chip,
            programs or list(DEFAULT_PROGRAMS),
            program_set=args.programs,
            inputs=args.inputs,
            fallbacks=not args.no_fallbacks,
            seed=args.seed,
        )
        stats = executor.stats
    finally:
        executor.close()
    rep = selfcheck_report(
        rows, chip=info.chip, runtime=args.runtime, machine=machine_info(), executor_stats=stats
    )
    if args.runtime == "sim":
        rep["note"] = (
            "runtime sim: the simulator stood in for the device; this checks the command, not the hardware"
        )
    print(format_report(rep))
    if args.json:
        atomic_write_text(args.json, json.dumps(rep, indent=1) + "\n")
    return 0 if rep["result"] == "PASS" else 1


def register_selfcheck(sub: Any) -> None:
    from ..ane.dialect import CHIPS
    from ..ane.program import CONVENTIONS
    from ..ane.programs import PROGRAM_SETS
    from ..ane.runtime import RUNTIMES
    from ..cli import HelpFormatter

    p = sub.add_parser(
        "selfcheck",
        help="run the kernels on this Mac's Neural Engine and compare them with the simulator",
        description="Compile the kernel programs of a small GQA model (by default all ten of the default "
        "set: the original trainer's programs) on this Mac's Neural Engine, run each on random inputs, and "
        "compare every output with the simulator. A program that is refused or wrong is tried again in the "
        "other forms (anetrain's programs with packed, then separate inputs) and the report says which "
        "pass. Prints the largest absolute and relative error, PASS or FAIL, the machine (macOS version, "
        "chip), and one JSON line to paste into a bug report. Exit status 0 when every program of the "
        "default form passes, 1 otherwise, 2 when this machine cannot run it (it needs macOS on Apple "
        "silicon).",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--chip",
        default="auto",
        choices=("auto", *CHIPS),
        help="chip family whose MIL dialect to use; auto: detect",
    )
    p.add_argument(
        "--runtime",
        default="private",
        choices=RUNTIMES,
        help="private: AppleNeuralEngine.framework; coreml: Core ML with CPU_AND_NE; sim: the simulator as "
        "the device (checks this command anywhere, not the hardware)",
    )
    p.add_argument(
        "--program",
        default=None,
        help="comma-separated kernel programs to check (anetrain's names: sdpa_fwd, ffn_fused, ...), or "
        "'all' (adds anetrain's four extras); none: the ten forward and dx programs",
    )
    p.add_argument(
        "--programs",
        default=PROGRAM_SETS[0],
        choices=PROGRAM_SETS,
        help="the form checked first: the original trainer's programs or anetrain's own",
    )
    p.add_argument(
        "--inputs",
        default=CONVENTIONS[0],
        choices=CONVENTIONS,
        help="input convention of the form checked first (separate: --programs anetrain only)",
    )
    p.add_argument(
        "--no-fallbacks", action="store_true", help="do not try the other forms of a program that fails"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the report as JSON")
    p.set_defaults(func=_selfcheck)


# ------------------------------------------------------------------------------------------------
# peak


def _depths(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"depths must be positive, got {text!r}")
    return values


def _peak(args: argparse.Namespace) -> int:
    from ..ane.machine import is_apple_silicon, published_peak, require_apple_silicon, resolve_chip
    from ..ane.peak import build_probe, custom_configs, default_configs, emit_probe, run_probe
    from ..ane.runtime.budget import compile_budget
    from ..errors import ConfigError
    from ..fsutil import atomic_write_text

    if args.depth:
        configs = custom_configs(args.channels, args.spatial, args.depth, int8=args.int8)
    else:
        configs = default_configs(args.int8)
    if args.emit:
        if args.chip == "auto" and not is_apple_silicon():
            raise ConfigError("--emit on a machine that is not a Mac needs the chip family: --chip m1..m5")
        chip = resolve_chip(args.chip).chip
        n = 0
        for c in configs:
            n += len(emit_probe(build_probe(c, chip, args.seed), args.emit))
        print(f"wrote {len(configs)} probe programs for {chip} ({n} files) to {args.emit}")
        return 0
    require_apple_silicon(
        "anetrain ane peak (it times programs on the Neural Engine)",
        "'anetrain ane peak --emit DIR --chip m4' writes the probe programs on any machine",
    )
    info = resolve_chip(args.chip)
    budget = compile_budget(None)
    if len(configs) > budget:
        raise ConfigError(f"{len(configs)} probe programs exceed the per-process compile budget of {budget}")
    from ..ane.runtime import make_device

    device = make_device("private")
    peak, source = published_peak(info.chip, info.ultra)
    print(
        f"Neural Engine peak probe on {info.brand or info.chip} "
        f"({args.warmup} warm-up + {args.iters} timed runs)"
    )
    print(f"{'Config':<32} {'W(MB)':>7} {'GFLOP':>7} {'ms/eval':>9} {'TFLOPS':>7} {'%pub':>6}")
    rows = []
    try:
        for c in configs:
            row = run_probe(device, c, info.chip, warmup=args.warmup, iters=args.iters, seed=args.seed)
            rows.append(row)
            if row["error"]:
                print(
                    f"{row['config']:<32} {row['weight_mb']:>7.1f} {row['gflop']:>7.2f}  FAIL: {row['error']}"
                )
            else:
                print(
                    f"{row['config']:<32} {row['weight_mb']:>7.1f} {row['gflop']:>7.2f} {row['ms']:>6.3f} ms "
                    f"{row['tflops']:>7.2f} {100 * row['tflops'] / peak:>5.1f}%"
                )
    finally:
        device.close()
    ok = [r for r in rows if not r["error"]]
    best = max((r["tflops"] for r in ok), default=0.0)
    print(f"best: {best:.2f} TFLOPS; %pub is of {peak:.1f} TFLOPS, published, not measured ({source})")
    if args.json:
        result = {"chip": info.chip, "brand": info.brand, "published_peak_tflops": peak, "rows": rows}
        atomic_write_text(args.json, json.dumps(result, indent=1) + "\n")
    return 0 if ok else 1


def register_peak(sub: Any) -> None:
    from ..ane.dialect import CHIPS
    from ..ane.peak import ITERS, WARMUP
    from ..cli import HelpFormatter

    p = sub.add_parser(
        "peak",
        help="measure the Neural Engine's peak throughput with chains of 1x1 convolutions",
        description="The original's peak probe (inmem_peak): chains of --depth 1x1 convolutions over "
        "[1, C, 1, S] fp16 with constant weights, 10 warm-up and 50 timed evaluations each, "
        "TFLOPS = 2 C^2 S depth / time. Default configs (C, S, depth): (512, 64, 32..128), "
        "(256, 64, 64..256), (384, 64, 64..128). With --int8 the ane_int8_bench table instead: [1, C, S, S] "
        "inputs, each config in fp16 and as W8A8 "
        "(constexpr_affine_dequantize weights, quantize/dequantize between layers; m3..m5). With --emit the "
        "programs are written to a directory instead of run (works on any machine).",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--chip", default="auto", choices=("auto", *CHIPS), help="chip family (MIL dialect); auto: detect"
    )
    p.add_argument(
        "--depth",
        type=_depths,
        default=None,
        help="comma-separated chain depths (with --channels, --spatial); none: the original's table",
    )
    p.add_argument("--channels", type=int, default=512, help="channels C of a --depth probe")
    p.add_argument("--spatial", type=int, default=64, help="spatial size S of a --depth probe")
    p.add_argument("--int8", action="store_true", help="the W8A8 table: fp16 and int8 chains on [1, C, S, S]")
    p.add_argument("--warmup", type=int, default=WARMUP, help="untimed evaluations per program")
    p.add_argument("--iters", type=int, default=ITERS, help="timed evaluations per program")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the results as JSON")
    p.add_argument(
        "--emit",
        metavar="DIR",
        default=None,
        help="write the probe programs (MIL, blobs) instead of running them",
    )
    p.set_defaults(func=_peak)


SUBCOMMANDS: list[Callable[[Any], None]] = [register_emit, register_selfcheck, register_peak]


def register(subparsers: Any) -> None:
    from ..cli import HelpFormatter

    p = subparsers.add_parser(
        "ane",
        help="Apple Neural Engine tools (emit kernel programs, selfcheck, peak)",
        description="Tools for the Apple Neural Engine backend. Everything but running programs on a Mac "
        "works on any machine.",
        formatter_class=HelpFormatter,
    )
    sub = p.add_subparsers(dest="ane_command", metavar="SUBCOMMAND")
    for add in SUBCOMMANDS:
        add(sub)

    def usage(_: argparse.Namespace) -> int:
        p.print_help()
        return 2

    p.set_defaults(func=usage)
