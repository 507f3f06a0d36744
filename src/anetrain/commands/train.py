"""``anetrain train``: options are generated from :class:`anetrain.train.TrainOptions`."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

ORDER = 10

DESCRIPTION = """\
Train a model. With no --data, an excerpt of TinyStories shipped with anetrain (real children's stories,
CDLA-Sharing-1.0) is unpacked, a tokenizer trained on it, and a stories260K-sized model trained on it for a
few minutes: a complete run that works offline. Progress goes to stderr; the run's result (the Efficiency
Report, a generated sample, the run directory and the commands to use it next) to stdout.

A step is one optimizer update over --accum micro-batches of --batch x --seq tokens. The run directory
(--out) receives config.json, metrics.jsonl, train.log, checkpoints/ and report.json; resume an interrupted
run with `anetrain train --resume RUN_DIR` (Ctrl-C and SIGTERM checkpoint before exiting).

Data-parallel: `torchrun --nproc_per_node=N [--nnodes=M ...] -m anetrain train ...` (or `anetrain train --ddp
--nproc-per-node N ...` on one machine) trains on N x M processes: each draws its own windows, gradients are
averaged over all of them, rank 0 writes the run directory. See docs/distributed.md."""


#: how `anetrain train --help` groups the options (an option missing here is listed under "other options")
GROUPS: dict[str, tuple[str, ...]] = {
    "model and data": (
        "model",
        "data",
        "val_data",
        "val_fraction",
        "tokenizer",
        "init",
        "residual_scale",
        "seed",
        "sampler",
        "compact_vocab",
    ),
    "optimisation": (
        "steps",
        "batch",
        "seq",
        "accum",
        "optimizer",
        "lr",
        "min_lr",
        "warmup",
        "wd",
        "clip",
        "beta1",
        "beta2",
        "eps",
        "loss_scale",
    ),
    "run directory and checkpoints": ("out", "resume", "stop_at", "ckpt_every", "keep_checkpoints"),
    "evaluation, samples and logging": (
        "eval_every",
        "eval_batches",
        "sample_every",
        "sample_tokens",
        "log_every",
    ),
    "hardware and precision": (
        "pipeline",
        "backend",
        "dtype",
        "fusion",
        "dw_device",
        "threads",
        "deterministic",
        "peak_tflops",
    ),
    "Apple Neural Engine (--backend ane, ane-sim)": ("ane_chip", "ane_runtime", "ane_programs", "ane_inputs"),
    "data-parallel (torchrun)": ("ddp", "nproc_per_node", "dist_backend", "dist_timeout", "dist_check_every"),
    "watching and tracking": (
        "dashboard",
        "wandb",
        "wandb_project",
        "wandb_name",
        "wandb_mode",
        "tensorboard",
    ),
}


def _arg_type(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    base = args[0] if args else tp
    return {"int": int, "float": float, "str": str, "bool": bool}.get(
        getattr(base, "__name__", str(base)), str
    )


def register(sub: argparse._SubParsersAction) -> None:
    from ..cli import HelpFormatter
    from ..data.embedded import EMBEDDED_DEFAULTS
    from ..train import TrainOptions

    p = sub.add_parser(
        "train", help="train or continue a model", description=DESCRIPTION, formatter_class=HelpFormatter
    )
    by_name = {f.name: f for f in fields(TrainOptions)}
    placed = [(title, [by_name[n] for n in names if n in by_name]) for title, names in GROUPS.items()]
    grouped = {n for names in GROUPS.values() for n in names}
    placed.append(("other options", [f for f in by_name.values() if f.name not in grouped]))
    hints = typing.get_type_hints(TrainOptions)
    for title, group_fields in placed:
        if group_fields:
            _add_options(p.add_argument_group(title), group_fields, hints, EMBEDDED_DEFAULTS)
    p.set_defaults(func=run)


def _add_options(
    g: Any, group_fields: list[Any], hints: dict[str, Any], embedded_defaults: dict[str, Any]
) -> None:
    """One argument per TrainOptions field, with its default (and the embedded run's, where it differs)."""
    for f in group_fields:
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        help_text = f.metadata["help"]
        embedded = embedded_defaults.get(f.name, default)
        if default not in (None, False) and "default" not in help_text:
            help_text += f" (default: {default}"
            help_text += f"; {embedded} without --data)" if embedded != default else ")"
        elif embedded != default:
            help_text += f" (without --data: {embedded})"
        if hints[f.name] is bool:
            g.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text
            )
        elif f.name == "residual_scale":
            g.add_argument(flag, default=argparse.SUPPRESS, metavar="ALPHA", help=help_text)
        else:
            g.add_argument(
                flag,
                type=_arg_type(hints[f.name]),
                default=argparse.SUPPRESS,
                choices=f.metadata.get("choices"),
                metavar=None if f.metadata.get("choices") else f.name.upper(),
                help=help_text,
            )


def run(args: argparse.Namespace) -> int:
    from ..distributed import launched_by_torchrun
    from ..errors import ConfigError
    from ..train import TrainOptions, default_run_dir, run_training

    given = {k: v for k, v in vars(args).items() if k not in ("func", "command", "debug")}
    if given.get("residual_scale") not in (None, "deepnet"):
        try:
            float(given["residual_scale"])
        except ValueError:
            raise ConfigError(
                f"--residual-scale must be a number or 'deepnet', got {given['residual_scale']!r}"
            ) from None
    if launched_by_torchrun():
        if given.get("dashboard"):
            raise ConfigError(
                "--dashboard cannot run inside torchrun's processes; watch the run with "
                "`anetrain dashboard RUN_DIR` in another terminal"
            )
    elif given.get("dashboard"):
        return _with_dashboard(given, default_run_dir)
    elif given.get("ddp"):
        return _under_torchrun(given, default_run_dir)
    opts = TrainOptions(**given)
    return run_training(opts, given)


def _argv_of(given: dict[str, Any], skip: tuple[str, ...]) -> list[str]:
    """Command-line flags that give the same options (``skip``: options to leave out)."""
    argv: list[str] = []
    for k, v in given.items():
        if k in skip:
            continue
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            argv.append(flag if v else "--no-" + k.replace("_", "-"))
        elif v is not None:
            argv += [flag, str(v)]
    return argv


def torchrun_argv(nproc: int, train_args: list[str]) -> list[str]:
    """``torchrun --standalone --nproc-per-node N -m anetrain train ARGS`` with this Python."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "anetrain",
        "train",
        *train_args,
    ]


def _under_torchrun(given: dict[str, Any], default_run_dir: Any) -> int:
    """``--ddp`` outside torchrun: start the same command under torchrun on this machine and wait for it.

    The run directory is fixed here (and printed by rank 0). Ctrl-C reaches torchrun and the ranks from the
    terminal (they checkpoint); a SIGTERM to this process is passed on to torchrun.
    """
    import signal

    import torch

    from ..errors import ConfigError

    nproc = given.get("nproc_per_node") or torch.cuda.device_count()
    if not nproc:
        raise ConfigError("--ddp without CUDA devices needs --nproc-per-node N (the number of processes)")
    args = _argv_of(given, skip=("ddp", "nproc_per_node"))
    if not given.get("resume") and not given.get("out"):
        args += ["--out", str(default_run_dir(given.get("model", "stories260K")))]
    child = subprocess.Popen(torchrun_argv(int(nproc), args))
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal sends it to torchrun as well
    old_term = signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signal.SIGTERM))
    try:
        return child.wait()
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)


def _with_dashboard(given: dict[str, Any], default_run_dir: Any) -> int:
    """Run the same training command as a child process and show the dashboard on its run directory."""
    from ..errors import AnetrainError
    from ..fsutil import end_partial_line

    try:
        from ..ui.dashboard import run_dashboard
    except ImportError as e:
        raise AnetrainError(f"the dashboard is unavailable: {e}") from None
    from ..train.lock import check_not_in_use
    from ..train.run import check_new_run_dir, make_run_dir

    run_dir = Path(
        given.get("resume") or given.get("out") or default_run_dir(given.get("model", "stories260K"))
    )
    if not given.get("resume"):
        check_new_run_dir(run_dir)
    check_not_in_use(run_dir)  # refused here, before the dashboard would show another trainer's run
    make_run_dir(run_dir)
    argv = [sys.executable, "-m", "anetrain", "train", *_argv_of(given, skip=("dashboard", "out"))]
    if not given.get("resume"):
        argv += ["--out", str(run_dir)]
    # The child's stdout and stderr are train.log itself, so tracebacks show in the dashboard's log panel;
    # ANETRAIN_STDERR_IS_LOG makes the child write each log line once.
    env = {**os.environ, "ANETRAIN_STDERR_IS_LOG": "1"}
    end_partial_line(run_dir / "train.log")  # a killed earlier trainer's last line
    with open(run_dir / "train.log", "ab") as out:
        child = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    return run_dashboard(run_dir, child)
