"""The entry point: a run directory, resume options, the process group, then the trainer on every rank."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import (
    holds_checkpoint,
)
from ..config import PRESETS
from ..distributed import DistributedError, World, init_world, wants_cuda
from ..errors import AnetrainError, ConfigError, InputError
from .options import RESUME_OVERRIDABLE, TrainOptions
from .rundir import RankLog, RunLog
from .trainer import Trainer

# ------------------------------------------------------------------------------------------------
# Entry point


def default_run_dir(model: str) -> Path:
    name = Path(model.rstrip("/")).name
    for suffix in (".bin", ".toml", ".json", ".safetensors"):  # a file's stem; "Qwen3-0.6B" stays whole
        name = name.removesuffix(suffix)
    stem = model if model in PRESETS else name
    return Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def load_resume_options(run_dir: Path, given: dict[str, Any], world_size: int = 1) -> TrainOptions:
    """The run's saved options, with the allowed overrides from the command line; refuses the others.

    ``--accum`` may change together with the number of ranks when ranks x accum (the global batch) stays the
    run's, e.g. a 2-rank run resumed by one process with twice the accumulation.
    """
    try:
        doc = json.loads((run_dir / "config.json").read_text("utf-8"))
        saved = doc["train"]
        saved_world = int(doc.get("world_size") or 1)
    except FileNotFoundError:
        raise InputError(run_dir, "not a run directory (no config.json)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(run_dir / "config.json", f"unreadable ({e})") from None
    known = {f.name for f in fields(TrainOptions)}
    opts = TrainOptions(**{k: v for k, v in saved.items() if k in known})
    opts.stop_at = None  # a --stop-at is for one process only; a plain resume runs to --steps
    # paths as recorded (absolute), so a resume from another directory finds the files
    for key in ("data", "val_data", "tokenizer"):
        if doc.get(key):
            setattr(opts, key, doc[key])
    same_global_batch = (
        "accum" in given
        and world_size != saved_world
        and given["accum"] * world_size == opts.accum * saved_world
    )
    for k, v in given.items():
        if k in RESUME_OVERRIDABLE or k == "model" or (k == "accum" and same_global_batch):
            continue
        if getattr(opts, k) != v:
            hint = ""
            if k == "accum" and world_size != saved_world:
                hint = (
                    f" (the run has {saved_world} rank(s) x accum {opts.accum}; with {world_size} rank(s) an "
                    f"--accum of {opts.accum * saved_world / world_size:g} keeps its global batch)"
                )
            raise ConfigError(
                f"--{k.replace('_', '-')} {v!r} differs from the run's {getattr(opts, k)!r}; a resumed "
                f"run keeps its options (start a new run to change it){hint}"
            )
    for k, v in given.items():
        if k in RESUME_OVERRIDABLE or (k == "accum" and same_global_batch):
            setattr(opts, k, v)
    opts.resume = str(run_dir)
    opts.out = str(run_dir)
    return opts


def _saved_backend(run_dir: str) -> str | None:
    """The --backend a run directory's config.json names, if this process can read it (a peek before the
    process group exists: it decides NCCL or gloo)."""
    try:
        return str(json.loads((Path(run_dir) / "config.json").read_text("utf-8"))["train"]["backend"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def start_world(opts: TrainOptions, given: dict[str, Any]) -> World:
    """The process group for this process (a single-process World unless launched by torchrun)."""
    backend = opts.backend
    if opts.resume and "backend" not in given:
        backend = _saved_backend(opts.resume) or backend
    if not opts.dist_timeout > 0:
        raise ConfigError(f"--dist-timeout must be positive, got {opts.dist_timeout}")
    return init_world(opts.dist_timeout, opts.dist_backend, wants_cuda(backend))


def _prepare_run(
    opts: TrainOptions, given: dict[str, Any], world: World, log: Any
) -> tuple[TrainOptions, Path, Any]:
    """Rank 0 (or the single process): the run's options and directory, its log, the embedded data if no
    --data was given."""
    if opts.resume:
        run_dir = Path(opts.resume)
        opts = load_resume_options(run_dir, given, world.world_size)
    else:
        run_dir = Path(opts.out) if opts.out else default_run_dir(opts.model)
        if holds_checkpoint(run_dir):
            raise ConfigError(
                f"{run_dir} already holds a run; resume it with --resume {run_dir} or choose --out"
            )
    opts.validate()
    run_dir.mkdir(parents=True, exist_ok=True)
    both = RunLog(run_dir / "train.log", sink=log)
    try:
        if opts.data is None and not opts.resume:
            from ..data.embedded import EMBEDDED_DEFAULTS, prepare_embedded

            for key, value in EMBEDDED_DEFAULTS.items():
                if key not in given:  # settings tuned for the embedded corpus, unless given
                    setattr(opts, key, value)
            embedded = prepare_embedded(n_stories=opts.embedded_stories, log=both)
            opts.data, opts.tokenizer = (str(p) for p in embedded)
    except BaseException:
        both.close()
        raise
    return opts, run_dir, both


def run_training(opts: TrainOptions, given: dict[str, Any] | None = None, log: Any = None) -> int:
    """Run (or resume) a training run; returns the process exit code.

    Under torchrun every rank calls this; rank 0 prepares the run and hands the options to the others.
    """
    given = given or {}
    world = start_world(opts, given)
    try:
        return _run_ranks(opts, given, log, world)
    except AnetrainError as e:
        if world.active and not world.is_main and not isinstance(e, DistributedError):
            raise AnetrainError(f"rank {world.rank}: {e}") from e
        raise
    finally:
        world.close()


def _run_ranks(opts: TrainOptions, given: dict[str, Any], log: Any, world: World) -> int:
    main_log: Any = None

    def prepare() -> dict[str, Any]:
        nonlocal main_log
        prepared, run_dir, main_log = _prepare_run(opts, given, world, log)
        return {"opts": asdict(prepared), "run_dir": str(run_dir)}

    doc = world.from_main(prepare, "preparing the run")
    opts, run_dir = TrainOptions(**doc["opts"]), Path(doc["run_dir"])
    both = main_log if world.is_main else RankLog(world.rank)
    try:
        opts.validate()
        if opts.threads:
            torch.set_num_threads(opts.threads)
        if opts.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        trainer = Trainer(
            opts, run_dir, both, model_check=given.get("model") if opts.resume else None, world=world
        )
        return trainer.run()
    finally:
        both.close()
