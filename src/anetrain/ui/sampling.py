"""Generating text from a stopped run's newest checkpoint, for the dashboard's ``g`` key.

Finds and loads the newest complete, verified checkpoint with :mod:`anetrain.checkpoint` (safetensors: no
code is executed), opens the tokenizer named by ``config.json`` and calls ``anetrain.generate.generate``.
Every problem (no checkpoint, no tokenizer, generation not available in this install) is an
:class:`AnetrainError` with a one-line message that the dashboard shows in place of the text.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint import load_latest
from ..errors import AnetrainError, InputError
from .rundir import RunDir


@dataclass
class Sample:
    text: str
    step: int | None
    checkpoint: Path


def tokenizer_path(run: RunDir) -> Path:
    """The tokenizer file named by ``config.json`` (absolute, or relative to the cwd or the run dir)."""
    config = run.config()
    if config is None:
        raise InputError(run.config_path, "missing (it names the tokenizer)")
    name = config.get("tokenizer")
    if not isinstance(name, str) or not name:
        raise InputError(run.config_path, "names no tokenizer, so the run's text cannot be decoded")
    for candidate in (Path(name), run.path / name):
        if candidate.is_file():
            return candidate
    raise InputError(name, "tokenizer named by config.json not found")


def generate_from_checkpoint(
    run: RunDir, steps: int = 128, temperature: float = 0.8, top_k: int = 50, seed: int | None = None
) -> Sample:
    """Text from the newest complete checkpoint of ``run`` (slow for big models: call from a thread)."""
    try:
        from ..generate import generate
        from ..tokenizer import load_tokenizer
    except ImportError as e:
        raise AnetrainError(f"text generation is not available in this install ({e})") from None
    ckpt = load_latest(run.path, with_optimizer=False, warn=None)
    if ckpt is None:
        raise InputError(run.checkpoints, "no complete checkpoint to generate from yet")
    tokenizer = load_tokenizer(tokenizer_path(run), vocab_size=ckpt.cfg.vocab_size)
    result = generate(
        ckpt.params,
        tokenizer,
        prompt="",
        steps=min(steps, ckpt.cfg.seq_len),
        temperature=temperature,
        top_k=top_k,
        seed=int(time.time()) if seed is None else seed,
    )
    return Sample(text=result.text, step=ckpt.step, checkpoint=ckpt.path)
