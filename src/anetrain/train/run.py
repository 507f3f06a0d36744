"""The entry point: a run directory, resume options, the process group, then the trainer on every rank."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import holds_checkpoint, is_run_dir
from ..config import PRESETS
from ..distributed import DistributedError, World, init_world, wants_cuda
from ..errors import AnetrainError, ConfigError, InputError
from ..fsutil import describe_os_error, read_capped
from .lock import RunLock
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
    path = run_dir / "config.json"
    if not path.is_file():
        raise InputError(run_dir, "not a run directory (no config.json)")
    try:
        doc = json.loads(read_capped(path, 16 << 20, "run config"))
        saved = doc["train"]
        saved_world = int(doc.get("world_size") or 1)
        if not isinstance(saved, dict):
            raise TypeError("its 'train' entry is not an object")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise InputError(path, f"unreadable ({type(e).__name__}: {e})") from None
    known = {f.name for f in fields(TrainOptions)}
    opts = TrainOptions(**{k: v for k, v in saved.items() if k in known})
    problem = opts.type_problem()
    if problem:
        raise InputError(path, f"unreadable ({problem})")
    opts.stop_at = None  # a --stop-at is for one process only; a plain resume runs to --steps
    # paths as recorded (absolute), so a resume from another directory finds the files
    for key in ("data", "val_data", "tokenizer"):
        if isinstance(doc.get(key), str) and doc[key]:
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


@dataclass
class PreparedRun:
    """What rank 0 prepared: the options, the run directory (locked), its log."""

    opts: TrainOptions
    run_dir: Path
    log: Any  # RunLog, None until it is open
    lock: RunLock
    created: Path | None  # what this command made (the run directory or a parent): removed if the run fails

    def close(self, remove: bool = False) -> None:
        """Close the log and let go of the directory (removing it when asked and this command made it)."""
        if self.log is not None:
            self.log.close()
        self.lock.release()
        if remove and self.created is not None:
            shutil.rmtree(self.created, ignore_errors=True)


#: what a run directory may hold before its trainer writes config.json (the dashboard's launcher opens
#: train.log first)
LAUNCH_FILES = {"train.log", "trainer.lock", "trainer.pid", "control"}


def check_new_run_dir(run_dir: Path) -> None:
    """Refuse an --out that would destroy something: a file, or a non-empty directory that is not a run
    directory (a model, a tokenizer's folder, a home directory)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir} exists and is not a directory; choose another --out")
    if run_dir.is_dir() and not is_run_dir(run_dir):
        try:
            foreign = [p.name for p in run_dir.iterdir() if p.name not in LAUNCH_FILES]
        except OSError as e:
            raise InputError(run_dir, f"cannot be read ({describe_os_error(e)})") from None
        if foreign:
            raise ConfigError(
                f"--out {run_dir} is a non-empty directory that is not a run directory; its files could be "
                "overwritten: choose a new or empty directory"
            )


def make_run_dir(run_dir: Path) -> Path | None:
    """Create the run directory; the outermost directory this call made (the run directory, or a parent
    such as ``runs/``), or None."""
    created = None
    for d in (run_dir, *run_dir.parents):
        if d.exists():
            break
        created = d
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AnetrainError(f"{run_dir}: cannot create the run directory ({describe_os_error(e)})") from None
    return created


def _prepare_run(opts: TrainOptions, given: dict[str, Any], world: World, log: Any) -> PreparedRun:
    """Rank 0 (or the single process): the run's directory (locked: one trainer per directory), options
    and log, and the embedded data if no --data was given. A directory this made is removed again if
    something here fails."""
    created = None
    if opts.resume:
        run_dir = Path(opts.resume)
        if not run_dir.is_dir():
            raise InputError(run_dir, "not a run directory (no config.json)")
    else:
        run_dir = Path(opts.out) if opts.out else default_run_dir(opts.model)
        check_new_run_dir(run_dir)
        opts.validate()  # before anything is created
        created = make_run_dir(run_dir)
    lock = RunLock(run_dir)
    try:
        lock.acquire()
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    prepared = PreparedRun(opts, run_dir, None, lock, created)
    try:
        if opts.resume:
            opts = load_resume_options(run_dir, given, world.world_size)
        elif holds_checkpoint(run_dir):
            raise ConfigError(
                f"{run_dir} already holds a run; resume it with --resume {run_dir} or choose --out"
            )
        opts.validate()
        prepared.opts = opts
        both = prepared.log = RunLog(run_dir / "train.log", sink=log)
        if lock.taken_over is not None:
            both(
                f"note: {lock.path} was left by process {lock.taken_over}, which is no longer running; "
                "taking the run directory over"
            )
        if opts.data is None and not opts.resume:
            from ..data.embedded import EMBEDDED_DEFAULTS, prepare_embedded

            for key, value in EMBEDDED_DEFAULTS.items():  # settings for the embedded corpus, unless given
                if key not in given:
                    setattr(opts, key, value)
            opts.validate()
            opts.data, opts.tokenizer = (str(p) for p in prepare_embedded(log=both))
    except BaseException:
        prepared.close(remove=True)
        raise
    return prepared


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
    prepared: PreparedRun | None = None

    def prepare() -> dict[str, Any]:
        nonlocal prepared
        prepared = _prepare_run(opts, given, world, log)
        return {"opts": asdict(prepared.opts), "run_dir": str(prepared.run_dir)}

    doc = world.from_main(prepare, "preparing the run")
    opts, run_dir = TrainOptions(**doc["opts"]), Path(doc["run_dir"])
    both = prepared.log if prepared is not None else RankLog(world.rank)
    started = False
    try:
        opts.validate()
        if opts.threads:
            torch.set_num_threads(opts.threads)
        if opts.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        trainer = Trainer(
            opts, run_dir, both, model_check=given.get("model") if opts.resume else None, world=world
        )
        started = True
        return trainer.run()
    finally:
        if prepared is not None:
            prepared.close(remove=not started)  # a new run that failed before training leaves nothing
        else:
            both.close()
