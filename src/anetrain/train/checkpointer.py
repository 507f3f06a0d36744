"""When the trainer writes checkpoints, what a manifest holds, and how a resumed run picks up from one.

Kinds: ``periodic`` (every --ckpt-every steps; the newest --keep-checkpoints are kept), ``best`` (a new best
validation loss; kept as best_step_N until a better one), ``final`` (the last step) and ``interrupt`` (Ctrl-C,
SIGTERM, the dashboard's stop, --stop-at). A failed periodic or best write is a warning and training goes on;
a failed final or interrupt write is an error. The files themselves are written by
:mod:`anetrain.checkpoint` (crash-safe; the newest complete checkpoint is what a resume loads).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from .. import __version__
from ..checkpoint import checkpoint_name, prune_checkpoints, save_checkpoint
from ..data.sampler import WindowSampler
from ..distributed import World
from ..errors import AnetrainError, ConfigError, InputError
from ..optim import AdamW, DynamicLossScaler
from ..pipeline.base import Pipeline
from .options import TrainOptions
from .rundir import RunFiles
from .setup import Start
from .state import RunState, WallClock

KINDS = ("periodic", "best", "final", "interrupt")


class Checkpointer:
    """Writes the run's checkpoints. Every rank calls :meth:`save` at the same step (each rank's sampler
    state goes into the manifest); rank 0 writes."""

    def __init__(
        self,
        run_dir: Path,
        opts: TrainOptions,
        world: World,
        pipe: Pipeline,
        optimizer: AdamW,
        scaler: DynamicLossScaler | None,
        sampler: WindowSampler,
        files: RunFiles,
        clock: WallClock,
        log: Any,
        extra_manifest: dict[str, Any] | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.opts = opts
        self.world = world
        self.pipe = pipe
        self.optimizer = optimizer
        self.scaler = scaler
        self.sampler = sampler
        self.files = files
        self.clock = clock
        self.log = log
        # what every manifest also records: a LoRA run's base model, the Hugging Face model it came from
        self.extra_manifest = {k: v for k, v in (extra_manifest or {}).items() if v is not None}

    def periodic_due(self, step: int, end: int) -> bool:
        """A periodic checkpoint after ``step`` (not at ``end``: the final or interrupt one comes there)."""
        every = self.opts.ckpt_every
        return every > 0 and step % every == 0 and step < end

    def save(self, kind: str, state: RunState) -> None:
        assert kind in KINDS, kind
        sampler_state = self._sampler_job_state()
        if not self.world.is_main:
            return
        state.counters.wall_s = self.clock.total_s()
        name = checkpoint_name(state.step)
        try:
            path = save_checkpoint(
                self.run_dir,
                "best_" + name if kind == "best" else name,
                self.pipe.params,
                self.optimizer.state,
                self.manifest(kind, state, sampler_state),
                pointers=("best",) if kind == "best" else ("latest",),
            )
        except AnetrainError as e:
            if kind in ("final", "interrupt"):
                raise
            self.log(f"warning: {e}; training continues")
            return
        prune_checkpoints(self.run_dir, self.opts.keep_checkpoints)
        self.files.write("checkpoint", step=state.step, path=str(path), kind=kind)

    def manifest(self, kind: str, state: RunState, sampler_state: dict[str, Any]) -> dict[str, Any]:
        return {
            **state.to_manifest(),
            "total_steps": self.opts.steps,
            "kind": kind,
            "sampler": sampler_state,
            "world_size": self.world.world_size,
            "loss_scaler": self.scaler.state() if self.scaler else None,
            "train_options": asdict(self.opts),
            "anetrain_version": __version__,
            **self.extra_manifest,
        }

    def _sampler_job_state(self) -> dict[str, Any]:
        """The samplers' state for a checkpoint (every rank's, where each rank has its own stream)."""
        world, own = self.world, self.sampler.state()
        if world.active and self.sampler.per_rank:
            states = world.gather_json(own, "collecting the samplers' states")
        else:
            states = [own] * world.world_size
        return self.sampler.job_state(states)


def resume_state(
    start: Start,
    opts: TrainOptions,
    world: World,
    sampler: WindowSampler,
    scaler: DynamicLossScaler | None,
    log: Any,
) -> RunState:
    """The run's state from the checkpoint it resumes (``start``: its manifest and the manifest's file),
    with the sampler and loss scaler restored; notes on what changes when the job has another number of
    ranks. A manifest whose state cannot be read (edited, damaged) is an InputError naming its file."""
    try:
        return _resume_state(start.manifest, opts, world, sampler, scaler, log)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        where = start.manifest_file or "the checkpoint's manifest"
        raise InputError(where, f"unreadable run state ({type(e).__name__}: {e})") from None


def _resume_state(
    manifest: dict[str, Any],
    opts: TrainOptions,
    world: World,
    sampler: WindowSampler,
    scaler: DynamicLossScaler | None,
    log: Any,
) -> RunState:
    state = RunState.from_manifest(manifest)
    saved = manifest.get("sampler")
    if saved is not None:
        if saved["name"] != sampler.name:
            raise ConfigError(f"cannot resume: the run used the {saved['name']} sampler")
        saved_world = int(saved.get("world_size", 1))
        if saved_world != world.world_size and sampler.per_rank:
            log(
                f"note: the checkpoint was written by {saved_world} rank(s) and this job has "
                f"{world.world_size}: each rank's random stream is re-derived from (seed, step, rank)"
            )
        sampler.restore(saved, step=state.step)
    saved_accum = int(manifest.get("train_options", {}).get("accum", opts.accum))
    saved_batch = int(manifest.get("world_size", 1)) * saved_accum
    if saved_batch != world.world_size * opts.accum:
        log(
            f"note: the global batch changes from {saved_batch * opts.batch} to "
            f"{world.world_size * opts.accum * opts.batch} sequences per step (ranks x batch x accum); "
            "pass --accum to keep it"
        )
    if scaler is not None and manifest.get("loss_scaler"):
        scaler.restore(manifest["loss_scaler"])
    return state
