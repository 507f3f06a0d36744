"""Pieces shared by the format readers and writers: the result type, safe file mapping, checks."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from ..config import ModelConfig, make_config
from ..errors import AnetrainError, ConfigError, InputError
from ..optim import AdamState
from ..params import ModelParams

# Every format save_model can write, in the order the CLI lists them.
FORMATS = ("llama2c-v0", "llama2c-v1", "llama2c-v2", "hf", "blzt-v2", "blzt-v4", "peft")

# What llama2.c's run.c and the original trainer hard-code; formats without fields for them store only these.
LLAMA2C_ROPE_THETA = 10000.0
LLAMA2C_NORM_EPS = 1e-5


@dataclass
class LoadedModel:
    """A model read from a file: its config, float32 parameters, and whatever else the format carries."""

    cfg: ModelConfig
    params: ModelParams
    format: str  # e.g. "llama2c-v0", "blzt-v4", "hf"
    optimizer: AdamState | None = None  # Adam moments when the file has them (BLZT)
    extras: dict[str, Any] = field(default_factory=dict)  # header fields worth reporting (step, loss, ...)
    # the Hugging Face model this one came from ({"dir": ..., "config": {...}}): an hf export keeps its token
    # ids and copies its tokenizer files
    source: dict[str, Any] | None = None
    # LoRA: the adapters (params is then the merged model) and their base model's description
    adapters: Any = None


def map_file(path: str | os.PathLike[str]) -> np.ndarray:
    """The bytes of ``path`` as a read-only uint8 array (memory-mapped, so large files are not copied)."""
    p = Path(path)
    if p.is_dir():
        raise InputError(p, "is a directory, expected a model file")
    try:
        size = p.stat().st_size
        if size == 0:
            return np.zeros(0, dtype=np.uint8)
        return np.memmap(p, dtype=np.uint8, mode="r")
    except OSError as e:
        raise InputError(p, f"cannot read ({e.strerror or e})") from None


def config_or_input_error(path: str | os.PathLike[str], what: str, **values: Any) -> ModelConfig:
    """:func:`make_config`, with a bad header reported as an :class:`InputError` naming ``path``."""
    try:
        return make_config(**values)
    except ConfigError as e:
        raise InputError(path, f"not a valid {what} ({e})") from None


def f32_at(raw: np.ndarray, offset: int, count: int) -> np.ndarray:
    """``count`` little-endian float32 values starting at byte ``offset`` of ``raw`` (a view)."""
    return raw[offset : offset + 4 * count].view("<f4")


def require_finite(path: str | os.PathLike[str], flat: torch.Tensor, what: str = "weights") -> None:
    if not bool(torch.isfinite(flat).all()):
        bad = int((~torch.isfinite(flat)).sum())
        raise InputError(path, f"contains {bad} NaN or infinite {what}")


def require_expressible(
    cfg: ModelConfig,
    fmt: str,
    *,
    head_dim: bool = True,
    rope_theta: bool = True,
    norm_eps: bool = True,
    kv_heads: bool = False,
    tied: bool = False,
    qk_norm: bool = True,
) -> None:
    """Raise :class:`ConfigError` for the first property of ``cfg`` that ``fmt`` has no field for.

    Each keyword names a constraint the format imposes: ``head_dim`` (it must be dim/n_heads),
    ``rope_theta`` and ``norm_eps`` (llama2.c's fixed 10000 and 1e-5), ``kv_heads`` (no GQA) and ``tied``
    (no separate classifier), ``qk_norm`` (no QK-norm gains: every format but hf). Writers call this before
    opening the output, so nothing is written.
    """
    if qk_norm and cfg.qk_norm:
        raise ConfigError(f"{fmt} cannot store QK-norm (a Qwen3 model's q_norm/k_norm); use --format hf")
    if head_dim and cfg.head_dim * cfg.n_heads != cfg.dim:
        raise ConfigError(
            f"{fmt} cannot store head_dim {cfg.head_dim} != dim/n_heads {cfg.dim // cfg.n_heads} "
            "(the format derives head_dim from dim and n_heads)"
        )
    if rope_theta and cfg.rope_theta != LLAMA2C_ROPE_THETA:
        raise ConfigError(
            f"{fmt} cannot store rope_theta {cfg.rope_theta:g} (the format fixes it at 10000); "
            "use --format hf"
        )
    if norm_eps and cfg.norm_eps != LLAMA2C_NORM_EPS:
        raise ConfigError(
            f"{fmt} cannot store norm_eps {cfg.norm_eps:g} (the format fixes it at 1e-5); use --format hf"
        )
    if kv_heads and cfg.n_kv_heads != cfg.n_heads:
        raise ConfigError(
            f"{fmt} cannot store n_kv_heads {cfg.n_kv_heads} != n_heads {cfg.n_heads} "
            "(no grouped-query attention)"
        )
    if tied and not cfg.tied_classifier:
        raise ConfigError(f"{fmt} cannot store an untied classifier (the format always shares the embedding)")


def write_f32(f: BinaryIO, t: torch.Tensor | np.ndarray) -> None:
    """Write a tensor as contiguous little-endian float32."""
    a = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else t
    f.write(np.ascontiguousarray(a, dtype="<f4").tobytes())


def write_all_f32(f: BinaryIO, tensors: Iterable[torch.Tensor]) -> None:
    for t in tensors:
        write_f32(f, t)


def human_count(n: float) -> str:
    """260032 -> '260.0K'; 109529856 -> '109.5M'."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(int(n))


def human_bytes(n: float) -> str:
    """1056540 -> '1.0 MiB'."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def wrap_input_error(path: str | os.PathLike[str], e: Exception) -> AnetrainError:
    """Turn a third-party reader's exception into an :class:`InputError` naming ``path``."""
    return InputError(path, f"cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else e})")
