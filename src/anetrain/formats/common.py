"""Pieces shared by the format readers and writers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config import ModelConfig
from ..optim import AdamState
from ..params import ModelParams


@dataclass
class LoadedModel:
    """A model read from a file: its config, float32 parameters, and whatever else the format carries."""

    cfg: ModelConfig
    params: ModelParams
    format: str  # e.g. "llama2c-v0", "blzt-v4", "hf"
    optimizer: AdamState | None = None  # Adam moments when the file has them (BLZT)
    extras: dict[str, Any] = field(default_factory=dict)  # header fields worth reporting (step, loss, ...)
