"""The training program: data -> pipeline -> optimizer -> checkpoints, metrics and the Efficiency Report.

Modules: ``options`` (the CLI's options and what --resume may change), ``resolve`` (model and data),
``setup`` (what a run starts from: model, data, pipeline, optimizer on every rank), ``trainer`` (the loop),
the components the loop asks after every step: ``evaluator``, ``checkpointer``, ``samples`` (generated
text), ``stop`` (signals, the dashboard's stop file, rank agreement); ``state`` (the step, losses and
counters a checkpoint saves), ``rundir`` (config.json, metrics.jsonl, train.log, report.json) and ``run``
(the entry point).

``run_training(opts)`` is what ``anetrain train`` calls. One step is one optimizer update over ``accum``
micro-batches of ``batch x seq`` tokens. The loop, per step::

    zero the gradients
    accum times: draw a window batch (io) -> pipeline.forward_backward(window, scale/accum)
    [fp16: unscale, skip the update on overflow]  global-norm clip  optimizer step  pipeline.after_update()
    log a "step" record; evaluate, checkpoint, sample when due; stop cleanly on Ctrl-C / SIGTERM / --stop-at

Data-parallel (under torchrun, see :mod:`anetrain.distributed` and docs/distributed.md): every rank runs this
loop on its own windows, scaling its gradients by 1/(accum x world size); the last micro-step's backward
all-reduces them bucket by bucket, and the trainer waits for that before the norm, so every rank sees the same
averaged gradients and applies the same update. Rank 0 alone reads the run's options and the checkpoint it
resumes from (and hands them to the others), and alone writes config.json, metrics.jsonl, train.log,
checkpoints and report.json; the ranks agree on stopping, evaluation results and checkpoints.
"""

from __future__ import annotations

from .options import RESUME_OVERRIDABLE, TrainOptions
from .resolve import DataSplit, config_of_spec, resolve_data, resolve_model
from .run import default_run_dir, load_resume_options, run_training, start_world
from .trainer import Trainer

__all__ = [
    "RESUME_OVERRIDABLE",
    "DataSplit",
    "TrainOptions",
    "Trainer",
    "config_of_spec",
    "default_run_dir",
    "load_resume_options",
    "resolve_data",
    "resolve_model",
    "run_training",
    "start_world",
]
