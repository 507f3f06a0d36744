"""Generating text from a stopped run's newest checkpoint, for the dashboard's ``g`` key.

The same path as ``anetrain generate RUN_DIR``: :mod:`anetrain.generate.source` finds the newest complete,
verified checkpoint (safetensors: no code is executed) and the tokenizer ``config.json`` names, and
``anetrain.generate.generate`` decodes it (the native kernels where they run). Every problem (no checkpoint,
no tokenizer, generation not available in this install) is an :class:`AnetrainError` with a one-line message
that the dashboard shows in place of the text.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import AnetrainError
from .rundir import RunDir


@dataclass
class Sample:
    text: str
    step: int | None
    checkpoint: Path
    tokens_per_s: float = 0.0  # decode speed


def tokenizer_path(run: RunDir) -> Path:
    """The tokenizer file named by ``config.json`` (absolute, or relative to the cwd or the run dir)."""
    from ..generate.source import run_tokenizer

    return run_tokenizer(run.path)


def generate_from_checkpoint(
    run: RunDir,
    steps: int = 128,
    temperature: float = 0.8,
    top_k: int = 50,
    seed: int | None = None,
    dtype: str = "fp32",
) -> Sample:
    """Text from the newest complete checkpoint of ``run`` (slow for big models: call from a thread)."""
    try:
        from ..generate import generate
        from ..generate.source import checkpoint_step, load_weights, run_checkpoint, run_tokenizer
        from ..tokenizer import load_tokenizer
    except ImportError as e:
        raise AnetrainError(f"text generation is not available in this install ({e})") from None
    ckpt = run_checkpoint(run.path)
    weights = load_weights(ckpt, dtype)
    tokenizer = load_tokenizer(run_tokenizer(run.path), vocab_size=weights.cfg.vocab_size)
    result = generate(
        weights,
        tokenizer,
        prompt="",
        steps=min(steps, weights.cfg.seq_len),
        temperature=temperature,
        top_k=top_k,
        seed=int(time.time()) if seed is None else seed,
    )
    return Sample(
        text=result.text, step=checkpoint_step(ckpt), checkpoint=ckpt, tokens_per_s=result.tokens_per_s
    )
