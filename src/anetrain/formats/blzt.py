"""The original trainer's training checkpoints ("BLZT"), versions 2 and 4: weights plus Adam state.

Header (96 bytes, natural C alignment, little-endian)::

    0 int32 magic 0x424C5A54     4 int32 version (2 static pipeline, 4 dynamic pipeline)
    8 int32 step                12 int32 total_steps      16 int32 n_layers     20 int32 vocab_size
   24 int32 dim                 28 int32 hidden_dim       32 int32 n_heads      36 int32 seq_len
   40 float32 lr                44 float32 loss
   48 float64 cum_compile_ms    56 float64 cum_train_ms   64 float64 cum_wall_ms
   72 int32 cum_steps           76 int32 cum_batches      80 int32 adam_t
   84 int32 x3: v2 zero padding; v4 kv_heads, head_dim, q_dim

Body, float32, no padding: for each layer the weights Wq, Wk, Wv, Wo, W1, W2, W3, rms_att, rms_ffn, then
their Adam (m, v) pairs in the same order; then rms_final, m, v; then E[V, D], m, v. The classifier is always
the embedding (tied).

Semantics that the file does not say but the original's code does:

* Version 2 comes from the static pipeline: multi-head attention with head_dim = dim/n_heads, no residual
  scale, and **no RoPE** (anetrain always applies RoPE, so the same weights give different outputs here).
* Version 4 comes from the dynamic pipeline, which always runs its weights with the residual scale
  alpha = 1/sqrt(2L). Reading v4 therefore gives ``residual_scale = deepnet_alpha(L)``.
* Writing a model whose residual scale r differs from the file's alpha_f (1 for v2, 1/sqrt(2L) for v4)
  rescales Wo and W2 by c = r / alpha_f, so that the original's math (alpha_f * branch(c * W)) equals ours
  (r * branch(W)). The Adam moments are moments of the gradient, and the gradient with respect to c * W is
  g / c, so m is divided by c and v by c^2. (The normalized update m / sqrt(v) is unchanged either way.)
* Both pipelines fix rope_theta = 10000 and norm_eps = 1e-5.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ModelConfig, deepnet_alpha
from ..errors import ConfigError, InputError
from ..fsutil import atomic_write
from ..optim import AdamState
from ..params import ModelParams
from .common import (
    LoadedModel,
    config_or_input_error,
    f32_at,
    map_file,
    require_expressible,
    require_finite,
    write_f32,
)

MAGIC = 0x424C5A54  # "BLZT" as an int32; "TZLB" on disk
VERSIONS = (2, 4)
HEADER = struct.Struct("<10i2f3d3i3i")
assert HEADER.size == 96

# Header fields carried in LoadedModel.extras (and taken from ``extras`` when writing).
HEADER_EXTRAS = (
    "step",
    "total_steps",
    "lr",
    "loss",
    "cum_compile_ms",
    "cum_train_ms",
    "cum_wall_ms",
    "cum_steps",
    "cum_batches",
    "adam_t",
)
_INT_EXTRAS = {"step", "total_steps", "cum_steps", "cum_batches", "adam_t"}

STATIC_ROPE_NOTE = (
    "the original's static pipeline (BLZT v2) trained without RoPE; anetrain always applies RoPE, "
    "so these weights do not reproduce the original's outputs"
)
_OPTIMIZER = {2: "Adam (0.9, 0.999, eps 1e-8), no weight decay", 4: "AdamW (0.9, 0.95, eps 1e-8), wd 0.1"}

LAYER_ORDER = (
    "attention.wq.weight",
    "attention.wk.weight",
    "attention.wv.weight",
    "attention.wo.weight",
    "feed_forward.w1.weight",
    "feed_forward.w2.weight",
    "feed_forward.w3.weight",
    "attention_norm.weight",
    "ffn_norm.weight",
)
_SCALED = ("attention.wo.weight", "feed_forward.w2.weight")


def sections(cfg: ModelConfig) -> list[list[str]]:
    """Groups of parameter names in file order; each group is written as weights, then (m, v) per tensor."""
    groups = [[f"layers.{i}.{n}" for n in LAYER_ORDER] for i in range(cfg.n_layers)]
    return [*groups, ["norm.weight"], ["tok_embeddings.weight"]]


def blzt_file_size(cfg: ModelConfig) -> int:
    """Bytes of a BLZT file: the header, and every weight three times (weight, m, v)."""
    if not cfg.tied_classifier:
        raise ConfigError("BLZT checkpoints always tie the classifier to the embedding")
    return HEADER.size + 4 * 3 * cfg.param_count()


def file_alpha(cfg: ModelConfig, version: int) -> float:
    """The residual scale the original's pipeline applies to a BLZT file of ``version``."""
    return deepnet_alpha(cfg.n_layers) if version == 4 else 1.0


# ------------------------------------------------------------------------------------------------
# Reading


def read_blzt(path: str | os.PathLike[str]) -> LoadedModel:
    """Read a BLZT v2 or v4 checkpoint: weights, Adam moments (``optimizer``) and header (``extras``)."""
    raw = map_file(path)
    if raw.size < HEADER.size:
        raise InputError(path, f"truncated: {raw.size} bytes is shorter than the 96-byte BLZT header")
    h = HEADER.unpack(raw[: HEADER.size].tobytes())
    magic, version, step, total_steps, n_layers, vocab, dim, hidden, n_heads, seq_len = h[:10]
    lr, loss, cum_compile, cum_train, cum_wall, cum_steps, cum_batches, adam_t = h[10:18]
    kv_heads, head_dim, q_dim = h[18:21]
    if magic != MAGIC:
        raise InputError(
            path, f"not a BLZT checkpoint (magic 0x{magic & 0xFFFFFFFF:08x}, expected 0x{MAGIC:08x})"
        )
    if version not in VERSIONS:
        raise InputError(path, f"unknown BLZT version {version} (known: 2, 4)")
    dims: dict[str, Any] = dict(
        dim=dim, hidden_dim=hidden, n_layers=n_layers, n_heads=n_heads, vocab_size=vocab, seq_len=seq_len
    )
    if version == 4:
        if q_dim != n_heads * head_dim:
            raise InputError(
                path,
                f"BLZT v4 header is inconsistent: q_dim {q_dim} != n_heads {n_heads} * head_dim {head_dim}",
            )
        if head_dim <= 0:
            raise InputError(path, f"not a valid BLZT v4 header (head_dim {head_dim} must be positive)")
        dims.update(n_kv_heads=kv_heads, head_dim=head_dim)
    cfg = config_or_input_error(path, f"BLZT v{version} header", **dims, name=Path(path).name)
    if version == 4:
        cfg = cfg.with_(residual_scale=deepnet_alpha(cfg.n_layers))
    expected = blzt_file_size(cfg)
    if raw.size != expected:
        raise InputError(
            path,
            f"size {raw.size} bytes does not match its BLZT v{version} header ({cfg.shape_line()}): "
            f"expected {expected}",
        )
    for name, value in (("step", step), ("total_steps", total_steps), ("adam_t", adam_t)):
        if value < 0:
            raise InputError(path, f"BLZT header field {name} is negative ({value})")
    params, m, v = ModelParams.zeros(cfg), ModelParams.zeros(cfg), ModelParams.zeros(cfg)
    offset = HEADER.size
    for group in sections(cfg):
        for dest in [params[n] for n in group] + [t for n in group for t in (m[n], v[n])]:
            dest.view(-1).copy_(
                torch.from_numpy(np.array(f32_at(raw, offset, dest.numel()), dtype=np.float32))
            )
            offset += 4 * dest.numel()
    require_finite(path, params.flat)
    require_finite(path, m.flat, "Adam first moments")
    require_finite(path, v.flat, "Adam second moments")
    if bool((v.flat < 0).any()):
        raise InputError(path, "contains negative Adam second moments")
    extras: dict[str, Any] = {
        "blzt_version": version,
        "step": step,
        "total_steps": total_steps,
        "lr": lr,
        "loss": loss,
        "cum_compile_ms": cum_compile,
        "cum_train_ms": cum_train,
        "cum_wall_ms": cum_wall,
        "cum_steps": cum_steps,
        "cum_batches": cum_batches,
        "adam_t": adam_t,
        "original_optimizer": _OPTIMIZER[version],
    }
    if version == 2:
        extras["rope_note"] = STATIC_ROPE_NOTE
    else:
        extras["residual_scale_note"] = (
            "the original's dynamic pipeline scales both residual branches by "
            f"1/sqrt(2L) = {cfg.residual_scale:.6g}"
        )
    return LoadedModel(
        cfg=cfg, params=params, format=f"blzt-v{version}", optimizer=AdamState(m, v, adam_t), extras=extras
    )


# ------------------------------------------------------------------------------------------------
# Writing


def check_blzt_expressible(cfg: ModelConfig, version: int) -> None:
    """Raise ConfigError unless ``cfg`` can be stored as BLZT ``version``."""
    if version not in VERSIONS:
        raise ConfigError(f"unknown BLZT version {version} (known: 2, 4)")
    label = f"BLZT v{version}"
    require_expressible(cfg, label, head_dim=version == 2, kv_heads=version == 2, tied=True)


def write_blzt(
    path: str | os.PathLike[str],
    params: ModelParams,
    version: int = 4,
    optimizer: AdamState | None = None,
    extras: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write a BLZT checkpoint atomically; returns notes for the user.

    Header fields (step, total_steps, lr, loss, cumulative timers) come from ``extras`` (default 0);
    ``adam_t`` from ``optimizer.t`` (or ``extras``). Without ``optimizer`` the moments are written as zeros.
    The residual scale is converted to the file's as the module docstring explains.
    """
    cfg = params.cfg
    check_blzt_expressible(cfg, version)
    if optimizer is not None and (optimizer.m.cfg != cfg or optimizer.v.cfg != cfg):
        raise ConfigError("the optimizer state's layout does not match the model's")
    extras = dict(extras or {})
    if optimizer is not None:
        extras["adam_t"] = optimizer.t
    vals = {k: extras.get(k, 0) for k in HEADER_EXTRAS}
    for k in _INT_EXTRAS:
        vals[k] = int(vals[k])
    c = cfg.residual_scale / file_alpha(cfg, version)
    notes: dict[str, Any] = {}
    if c != 1.0:
        notes["rescaled_wo_w2_by"] = c
    kv = (cfg.n_kv_heads, cfg.head_dim, cfg.q_dim) if version == 4 else (0, 0, 0)
    header = HEADER.pack(
        MAGIC,
        version,
        vals["step"],
        vals["total_steps"],
        cfg.n_layers,
        cfg.vocab_size,
        cfg.dim,
        cfg.hidden_dim,
        cfg.n_heads,
        cfg.seq_len,
        float(vals["lr"]),
        float(vals["loss"]),
        float(vals["cum_compile_ms"]),
        float(vals["cum_train_ms"]),
        float(vals["cum_wall_ms"]),
        vals["cum_steps"],
        vals["cum_batches"],
        vals["adam_t"],
        *kv,
    )

    def scaled(t: torch.Tensor, name: str, factor: float) -> torch.Tensor:
        return t * factor if factor != 1.0 and name.endswith(_SCALED) else t

    with atomic_write(path) as f:
        f.write(header)
        for group in sections(cfg):
            for name in group:
                write_f32(f, scaled(params[name], name, c))
            for name in group:
                if optimizer is None:
                    write_f32(f, torch.zeros(2 * params[name].numel()))
                else:
                    write_f32(f, scaled(optimizer.m[name], name, 1.0 / c))
                    write_f32(f, scaled(optimizer.v[name], name, 1.0 / (c * c)))
    if version == 2:
        notes["rope_note"] = STATIC_ROPE_NOTE
    return notes
