"""``anetrain bench``: reference (usual PyTorch) vs baseline vs optimized, one table."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import ConfigError

ORDER = 50

DESCRIPTION = """\
Benchmark, in one process, on the same random tokens and the same initial weights: (a) the reference model
trained the usual way (autograd, torch.compile, autocast, fused AdamW, clipping: llama2.c's train.py with
its optimizer made as fast as torch allows), (b) anetrain's baseline pipeline (fp32, serial), (c) the
optimized pipeline. A step is one micro-batch; the optimizer runs once per --accum steps and its time is
spread over them. ms/step is the median of the timed steps after --warmup steps."""


def register(sub: argparse._SubParsersAction) -> None:
    from ..cli import HelpFormatter

    p = sub.add_parser(
        "bench",
        help="benchmark the usual PyTorch trainer against anetrain's pipelines",
        description=DESCRIPTION,
        formatter_class=HelpFormatter,
    )
    p.add_argument("--model", default="stories110M", help="preset name or model config file")
    p.add_argument("--batch", type=int, default=1, help="sequences per micro-batch")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    p.add_argument("--accum", type=int, default=10, help="micro-batches per optimizer step")
    p.add_argument("--steps", type=int, default=20, help="timed micro-steps per row")
    p.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="rounds over the rows, round-robin, their timed steps pooled (steadier ratios on a noisy "
        "machine); default 1, with --generate 3 (medians)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed micro-steps first (default: one optimizer step's worth, at least 3)",
    )
    p.add_argument(
        "--dtype",
        choices=("bf16", "fp16", "fp32"),
        default="bf16",
        help="precision of the reference and optimized rows (baseline is always fp32)",
    )
    p.add_argument(
        "--rows",
        default="reference,baseline,optimized",
        help="comma-separated rows to run: reference, baseline, optimized",
    )
    p.add_argument(
        "--backend",
        default="auto",
        choices=("auto", "cpu", "cuda", "ane", "ane-sim"),
        help="device to run on; ane runs anetrain's Neural Engine pipeline alone (macOS) and prints the "
        "original's Efficiency Report; ane-sim does the same through the simulator (slow)",
    )
    p.add_argument(
        "--ane-chip",
        default="auto",
        choices=("auto", "m1", "m2", "m3", "m4", "m5"),
        help="chip family for the ANE programs (auto: this Mac's; m4 for ane-sim elsewhere)",
    )
    p.add_argument(
        "--ane-programs",
        default="original",
        choices=("original", "anetrain"),
        help="the original trainer's programs, or anetrain's own forms (never run on hardware)",
    )
    p.add_argument(
        "--ane-inputs",
        default="packed",
        choices=("packed", "separate"),
        help="how ANE programs take their operands (separate: --ane-programs anetrain only)",
    )
    p.add_argument("--no-compile", action="store_true", help="do not torch.compile the reference model")
    p.add_argument(
        "--fusion",
        default="auto",
        choices=("auto", "compile", "hand"),
        help="the optimized row's elementwise fusion: compile (torch.compile'd kernels), hand, auto (hand on "
        "CPU, compile on CUDA)",
    )
    p.add_argument("--seed", type=int, default=1337, help="seed for the weights and the token windows")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    g = p.add_argument_group(
        "generation (--generate)",
        "Text generation instead of training: prefill and decode tok/s of anetrain generate's decoder per "
        "--gen-dtypes and --gen-streams, and compiled llama2.c run.c / runq.c on the same model file. "
        "--model is a preset (random-init weights, BOS row zeroed so greedy decoding never stops) or a model "
        "file; --repeat rounds over every row, medians reported.",
    )
    g.add_argument("--generate", action="store_true", help="benchmark generation instead of training")
    g.add_argument("--gen-dtypes", default="fp32,bf16,int8", help="comma-separated weight precisions")
    g.add_argument("--gen-streams", default="1,8", help="comma-separated numbers of streams decoded at once")
    g.add_argument("--gen-steps", type=int, default=256, help="positions per run, BOS included (run.c's -n)")
    g.add_argument("--gen-prompt", type=int, default=128, help="tokens in the timed prefill")
    g.add_argument(
        "--threads", type=int, default=None, help="CPU threads (default: torch's); also the peers'"
    )
    g.add_argument("--gen-backend", default="auto", choices=("auto", "native", "torch"), help="decoder")
    g.add_argument("--peer-runc", metavar="BIN", help="a compiled llama2.c run.c to run on the same model")
    g.add_argument("--peer-runq", metavar="BIN", help="a compiled llama2.c runq.c to run on the same model")
    g.add_argument("--tokenizer", metavar="FILE", help="tokenizer.bin for the peers")
    p.set_defaults(func=run)


def _generation_bench(args: argparse.Namespace) -> int:
    from ..fsutil import atomic_write_text
    from ..generate.bench import GenBenchConfig, format_generation_table, run_generation_bench

    def ints(text: str, what: str) -> tuple[int, ...]:
        try:
            return tuple(int(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise ConfigError(f"{what} must be comma-separated integers, got {text!r}") from None

    bc = GenBenchConfig(
        model=args.model,
        dtypes=tuple(d.strip() for d in args.gen_dtypes.split(",") if d.strip()),
        streams=ints(args.gen_streams, "--gen-streams"),
        steps=args.gen_steps,
        prompt=args.gen_prompt,
        repeat=3 if args.repeat is None else args.repeat,
        threads=args.threads,
        backend=args.gen_backend,
        seed=args.seed,
        peer_runc=args.peer_runc,
        peer_runq=args.peer_runq,
        tokenizer=args.tokenizer,
    )
    result = run_generation_bench(bc, lambda line: print(line, file=sys.stderr, flush=True))
    m = result["machine"]
    print(
        f"{result['config']['model']}: {result['config']['steps']} positions, greedy, prefill of "
        f"{result['config']['prompt']} tokens; {m['cpu']} ({m['threads']} threads), "
        f"native kernels: {m['native']}"
    )
    print(format_generation_table(result))
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=1))
    return 0


def run(args: argparse.Namespace) -> int:
    from ..bench import BenchConfig, format_table, run_bench, write_json
    from ..config import resolve_config

    if args.generate:
        return _generation_bench(args)
    if args.repeat is None:
        args.repeat = 1

    for name in ("batch", "seq", "accum", "steps", "repeat"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name} must be positive")
    cfg = resolve_config(args.model)
    warmup = args.warmup if args.warmup is not None else max(3, args.accum)
    if args.backend in ("ane", "ane-sim"):
        return _ane_bench(args, cfg, warmup)
    bc = BenchConfig(
        cfg=cfg,
        batch=args.batch,
        seq=args.seq,
        accum=args.accum,
        steps=args.steps,
        repeat=args.repeat,
        warmup=warmup,
        dtype=args.dtype,
        rows=tuple(r.strip() for r in args.rows.split(",") if r.strip()),
        seed=args.seed,
        device=args.backend,
        compile=not args.no_compile,
        fusion=args.fusion,
    )

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    result = run_bench(bc, log)
    print(
        f"{cfg.name}: batch {bc.batch} x {bc.seq}, accum {bc.accum}, {bc.dtype}; "
        f"{result['machine']['cpu']} ({result['machine']['torch_threads']} threads)"
    )
    print(format_table(result))
    if args.json:
        write_json(result, args.json)
    lc = result.get("loss_check")
    return 0 if lc is None or lc["ok"] else 1


def _ane_bench(args: argparse.Namespace, cfg: object, warmup: int) -> int:
    """The Neural Engine pipeline alone, reported as the original trainer reports it."""
    from ..ane.bench import format_ane_report, run_ane_bench
    from ..fsutil import atomic_write_text

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    rep = run_ane_bench(
        cfg,
        args.batch,
        args.seq,
        args.accum,
        args.steps,
        args.ane_chip,
        args.ane_inputs,
        log,  # type: ignore[arg-type]
        executor="sim" if args.backend == "ane-sim" else "private",
        warmup=warmup,
        seed=args.seed,
        programs=args.ane_programs,
    )
    print(format_ane_report(rep))
    if args.json:
        atomic_write_text(args.json, json.dumps(rep, indent=1))
    return 0
