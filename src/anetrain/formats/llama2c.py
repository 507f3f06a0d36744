"""llama2.c model files (``run.c``/``runq.c``'s ``.bin``): versions 0, 1 and 2, read and write.

Version 0 (legacy, what ``run.c`` reads): a 28-byte header of 7 little-endian int32 (dim, hidden_dim,
n_layers, n_heads, n_kv_heads, vocab_size, seq_len; a negative vocab_size means an unshared classifier
follows), then float32 tensors grouped by kind across layers: emb, rms_att[L], wq[L], wk[L], wv[L], wo[L],
rms_ffn[L], w1[L], w2[L], w3[L], rms_final, freq_cos[S, dh/2], freq_sin[S, dh/2], [wcls]. It has no magic:
a file is taken as v0 only when its size matches the header.

Versions 1 and 2: a 256-byte header (uint32 magic 0x616b3432, int32 version, the same 7 int32 with vocab_size
not negated, uint8 shared-classifier flag at offset 36, for v2 an unaligned int32 group size at offset 37,
zeros to 256). v1 body, float32: rms_att[L], rms_ffn[L], rms_final, emb, wq[L] .. w3[L], [wcls]; no RoPE
tables. v2 body: the same norms in float32, then emb, wq[L] .. w3[L], [wcls] each as Q8_0 (all its int8
values, then its float32 scales; see ``q80.py``).

None of them can store head_dim != dim/n_heads, rope_theta != 10000 or norm_eps != 1e-5: the writers refuse
such models. A residual scale != 1 is folded into wo and w2 (an equivalent plain Llama model).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ModelConfig
from ..errors import InputError
from ..fsutil import atomic_write
from ..params import ModelParams, fold_residual_scale, param_specs
from .common import (
    LoadedModel,
    config_or_input_error,
    f32_at,
    map_file,
    require_expressible,
    require_finite,
    write_all_f32,
    write_f32,
)
from .q80 import dequantize_q80, q80_group_size, quantize_q80

V0_HEADER = struct.Struct("<7i")
MAGIC = 0x616B3432  # "ak42"; on disk 32 34 6b 61
HEADER_SIZE = 256
V12_PREFIX = struct.Struct("<Ii7iB")  # magic, version, 7 config ints, shared-classifier flag: 37 bytes
GROUP_SIZE = struct.Struct("<i")  # v2 only, right after the flag (offset 37, unaligned)

# llama2.c's tensor kinds and our parameter names ("{}" is the layer index).
KIND_NAMES = {
    "emb": "tok_embeddings.weight",
    "rms_att": "layers.{}.attention_norm.weight",
    "wq": "layers.{}.attention.wq.weight",
    "wk": "layers.{}.attention.wk.weight",
    "wv": "layers.{}.attention.wv.weight",
    "wo": "layers.{}.attention.wo.weight",
    "rms_ffn": "layers.{}.ffn_norm.weight",
    "w1": "layers.{}.feed_forward.w1.weight",
    "w2": "layers.{}.feed_forward.w2.weight",
    "w3": "layers.{}.feed_forward.w3.weight",
    "rms_final": "norm.weight",
    "wcls": "output.weight",
}
V0_ORDER = ("emb", "rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3", "rms_final")
V1_ORDER = ("rms_att", "rms_ffn", "rms_final", "emb", "wq", "wk", "wv", "wo", "w1", "w2", "w3")
V2_FP32 = ("rms_att", "rms_ffn", "rms_final")
V2_QUANT = ("emb", "wq", "wk", "wv", "wo", "w1", "w2", "w3")


def tensor_names(cfg: ModelConfig, kinds: tuple[str, ...], classifier: bool = True) -> list[str]:
    """Parameter names in file order: each kind for every layer before the next kind, then [wcls]
    (when ``classifier`` and the model's classifier is untied)."""
    out: list[str] = []
    for kind in kinds:
        template = KIND_NAMES[kind]
        out += [template.format(i) for i in range(cfg.n_layers)] if "{}" in template else [template]
    if classifier and not cfg.tied_classifier:
        out.append(KIND_NAMES["wcls"])
    return out


def rope_tables(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """freq_cos, freq_sin [S, dh/2] computed exactly as llama2.c's ``model.py`` does (float32 torch), so that
    re-exporting a llama2.c file reproduces its tables bit for bit."""
    hs = cfg.dim // cfg.n_heads
    freqs = 1.0 / (10000.0 ** (torch.arange(0, hs, 2)[: hs // 2].float() / hs))
    angles = torch.outer(torch.arange(cfg.seq_len), freqs).float()
    return torch.cos(angles), torch.sin(angles)


def v0_file_size(cfg: ModelConfig) -> int:
    """Bytes of a v0 file: header, parameters, and the two RoPE tables."""
    return V0_HEADER.size + 4 * (cfg.param_count() + cfg.seq_len * (cfg.dim // cfg.n_heads))


def v1_file_size(cfg: ModelConfig) -> int:
    return HEADER_SIZE + 4 * cfg.param_count()


def v2_file_size(cfg: ModelConfig, group_size: int) -> int:
    n_fp32 = (2 * cfg.n_layers + 1) * cfg.dim
    n_quant = cfg.param_count() - n_fp32
    return HEADER_SIZE + 4 * n_fp32 + n_quant + 4 * (n_quant // group_size)


# ------------------------------------------------------------------------------------------------
# Reading


def _v0_config(path: str | os.PathLike[str], raw: np.ndarray) -> ModelConfig:
    if raw.size < V0_HEADER.size:
        raise InputError(path, f"truncated: {raw.size} bytes is shorter than the 28-byte llama2.c header")
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = V0_HEADER.unpack(raw[: V0_HEADER.size].tobytes())
    return config_or_input_error(
        path,
        "llama2.c v0 header",
        dim=dim,
        hidden_dim=hidden,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        vocab_size=abs(vocab),
        seq_len=seq_len,
        tied_classifier=vocab > 0,
        name=Path(path).name,
    )


def _fill(cfg: ModelConfig, names: list[str], raw: np.ndarray, offset: int) -> tuple[ModelParams, int]:
    """Copy consecutive float32 tensors named ``names`` from byte ``offset``; returns the end offset."""
    params = ModelParams.zeros(cfg)
    for name in names:
        t = params[name]
        t.view(-1).copy_(torch.from_numpy(np.array(f32_at(raw, offset, t.numel()), dtype=np.float32)))
        offset += 4 * t.numel()
    return params, offset


def read_llama2c(path: str | os.PathLike[str]) -> LoadedModel:
    """Read a llama2.c model file of any version (v1/v2 by their magic, otherwise v0)."""
    raw = map_file(path)
    if raw.size >= 4 and int(raw[:4].view("<u4")[0]) == MAGIC:
        return _read_v12(path, raw)
    return _read_v0(path, raw)


def _read_v0(path: str | os.PathLike[str], raw: np.ndarray) -> LoadedModel:
    cfg = _v0_config(path, raw)
    expected = v0_file_size(cfg)
    if raw.size != expected:
        raise InputError(
            path,
            f"size {raw.size} bytes does not match its llama2.c v0 header ({cfg.shape_line()}): "
            f"expected {expected}",
        )
    params, _ = _fill(cfg, tensor_names(cfg, V0_ORDER, classifier=False), raw, V0_HEADER.size)
    if not cfg.tied_classifier:  # wcls comes after the RoPE tables
        wcls_at = expected - 4 * cfg.vocab_size * cfg.dim
        params["output.weight"].view(-1).copy_(
            torch.from_numpy(np.array(f32_at(raw, wcls_at, cfg.vocab_size * cfg.dim), dtype=np.float32))
        )
    require_finite(path, params.flat)
    return LoadedModel(cfg=cfg, params=params, format="llama2c-v0")


def _v12_config(path: str | os.PathLike[str], raw: np.ndarray) -> ModelConfig:
    if raw.size < HEADER_SIZE:
        raise InputError(path, f"truncated: {raw.size} bytes is shorter than the 256-byte llama2.c header")
    _, version, dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len, shared = V12_PREFIX.unpack(
        raw[: V12_PREFIX.size].tobytes()
    )
    if version not in (1, 2):
        raise InputError(path, f"unknown llama2.c format version {version} (known: 0, 1, 2)")
    if shared not in (0, 1):
        raise InputError(path, f"shared-classifier flag is {shared}, expected 0 or 1")
    return config_or_input_error(
        path,
        f"llama2.c v{version} header",
        dim=dim,
        hidden_dim=hidden,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        vocab_size=vocab,
        seq_len=seq_len,
        tied_classifier=bool(shared),
        name=Path(path).name,
    )


def _read_v12(path: str | os.PathLike[str], raw: np.ndarray) -> LoadedModel:
    cfg = _v12_config(path, raw)
    version = int(raw[4:8].view("<i4")[0])
    if version == 1:
        expected = v1_file_size(cfg)
        if raw.size != expected:
            raise InputError(
                path,
                f"size {raw.size} bytes does not match its llama2.c v1 header ({cfg.shape_line()}): "
                f"expected {expected}",
            )
        params, _ = _fill(cfg, tensor_names(cfg, V1_ORDER), raw, HEADER_SIZE)
        require_finite(path, params.flat)
        return LoadedModel(cfg=cfg, params=params, format="llama2c-v1")
    return _read_v2(path, raw, cfg)


def _v2_check(path: str | os.PathLike[str], raw: np.ndarray, cfg: ModelConfig) -> int:
    """The group size of a v2 file after checking it and the file's size; raises InputError."""
    (gs,) = GROUP_SIZE.unpack(raw[V12_PREFIX.size : V12_PREFIX.size + 4].tobytes())
    if gs <= 0:
        raise InputError(path, f"Q8_0 group size {gs} must be positive")
    # arithmetic only: the header is checked against the file before anything is built or allocated
    for name, numel in _v2_quantized_sizes(cfg).items():
        if numel % gs:
            raise InputError(path, f"Q8_0 group size {gs} does not divide {name} ({numel} elements)")
    expected = v2_file_size(cfg, gs)
    if raw.size != expected:
        raise InputError(
            path,
            f"size {raw.size} bytes does not match its llama2.c v2 header ({cfg.shape_line()}, "
            f"group size {gs}): expected {expected}",
        )
    return gs


def _v2_quantized_sizes(cfg: ModelConfig) -> dict[str, int]:
    """Elements of each Q8_0-quantized tensor kind, in file order, named by its first tensor (the layers'
    are all alike)."""
    d, f, v = cfg.dim, cfg.hidden_dim, cfg.vocab_size
    numel = {"emb": v * d, "wq": cfg.q_dim * d, "wk": cfg.kv_dim * d, "wv": cfg.kv_dim * d}
    numel |= {"wo": d * cfg.q_dim, "w1": f * d, "w2": d * f, "w3": f * d, "wcls": v * d}
    kinds = [*V2_QUANT, *(() if cfg.tied_classifier else ("wcls",))]
    return {KIND_NAMES[k].format(0): numel[k] for k in kinds}


def _v2_quantized(
    path: str | os.PathLike[str], raw: np.ndarray, cfg: ModelConfig, gs: int, offset: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The Q8_0 tensors of a v2 body from byte ``offset``: name -> (int8 values [numel], float32 scales)."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    numel = {s.name: s.numel for s in param_specs(cfg)}
    for name in tensor_names(cfg, V2_QUANT):
        n = numel[name]
        q = torch.from_numpy(np.array(raw[offset : offset + n].view(np.int8)))
        scale = torch.from_numpy(np.array(f32_at(raw, offset + n, n // gs), dtype=np.float32))
        require_finite(path, scale, f"Q8_0 scales in {name}")
        out[name] = (q, scale)
        offset += n + 4 * (n // gs)
    return out


def _read_v2(path: str | os.PathLike[str], raw: np.ndarray, cfg: ModelConfig) -> LoadedModel:
    gs = _v2_check(path, raw, cfg)
    params, offset = _fill(cfg, tensor_names(cfg, V2_FP32, classifier=False), raw, HEADER_SIZE)
    for name, (q, scale) in _v2_quantized(path, raw, cfg, gs, offset).items():
        params[name].view(-1).copy_(dequantize_q80(q, scale, gs))
    require_finite(path, params.flat)
    return LoadedModel(cfg=cfg, params=params, format="llama2c-v2", extras={"group_size": gs})


@dataclass
class Q80Model:
    """A llama2.c v2 file as it is stored: float32 norm gains, Q8_0 matrices (not dequantized)."""

    cfg: ModelConfig
    group_size: int
    norms: dict[str, torch.Tensor]  # attention_norm / ffn_norm per layer, norm.weight: float32
    quantized: dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (int8 [numel], float32 [numel / gs])


def read_llama2c_q80(path: str | os.PathLike[str]) -> Q80Model:
    """Read a llama2.c version 2 file without dequantizing it (for int8 generation, as runq.c runs it)."""
    raw = map_file(path)
    if raw.size < HEADER_SIZE or int(raw[:4].view("<u4")[0]) != MAGIC:
        raise InputError(path, "not a llama2.c v2 (Q8_0) file: no ak42 header")
    version = int(raw[4:8].view("<i4")[0])
    if version != 2:
        raise InputError(path, f"is llama2.c version {version}, not the Q8_0 version 2")
    cfg = _v12_config(path, raw)
    gs = _v2_check(path, raw, cfg)
    norms: dict[str, torch.Tensor] = {}
    offset = HEADER_SIZE
    for name in tensor_names(cfg, V2_FP32, classifier=False):  # every norm gain is [D]
        norms[name] = torch.from_numpy(np.array(f32_at(raw, offset, cfg.dim), dtype=np.float32))
        require_finite(path, norms[name], name)
        offset += 4 * cfg.dim
    return Q80Model(cfg, gs, norms, _v2_quantized(path, raw, cfg, gs, offset))


def looks_like_v0(raw: np.ndarray) -> bool:
    """Whether ``raw`` has a valid v0 header whose size formula matches the byte count (v0 has no magic)."""
    try:
        return raw.size == v0_file_size(_v0_config("", raw))
    except InputError:
        return False


# ------------------------------------------------------------------------------------------------
# Writing


def write_llama2c(path: str | os.PathLike[str], params: ModelParams, version: int = 0) -> dict[str, Any]:
    """Write ``params`` as a llama2.c version 0, 1 or 2 file, atomically; returns notes for the user.

    Refuses (ConfigError) what the format cannot express; folds a residual scale into wo and w2.
    """
    if version not in (0, 1, 2):
        raise ValueError(f"llama2.c format version {version} does not exist")
    cfg = params.cfg
    require_expressible(cfg, f"llama2.c v{version}")
    notes: dict[str, Any] = {}
    if cfg.residual_scale != 1.0:
        notes["folded_residual_scale"] = cfg.residual_scale
        params = fold_residual_scale(params)
        cfg = params.cfg
    p = params.tensors
    header = (cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads)
    with atomic_write(path) as f:
        if version == 0:
            vocab = cfg.vocab_size if cfg.tied_classifier else -cfg.vocab_size
            f.write(V0_HEADER.pack(*header, vocab, cfg.seq_len))
            write_all_f32(f, (p[n] for n in tensor_names(cfg, V0_ORDER, classifier=False)))
            write_all_f32(f, rope_tables(cfg))
            if not cfg.tied_classifier:
                write_f32(f, p["output.weight"])
            return notes
        prefix = V12_PREFIX.pack(
            MAGIC, version, *header, cfg.vocab_size, cfg.seq_len, int(cfg.tied_classifier)
        )
        if version == 1:
            f.write(prefix.ljust(HEADER_SIZE, b"\0"))
            write_all_f32(f, (p[n] for n in tensor_names(cfg, V1_ORDER)))
            return notes
        gs = q80_group_size(cfg.dim)
        f.write((prefix + GROUP_SIZE.pack(gs)).ljust(HEADER_SIZE, b"\0"))
        write_all_f32(f, (p[n] for n in tensor_names(cfg, V2_FP32, classifier=False)))
        max_err = 0.0
        for name in tensor_names(cfg, V2_QUANT):
            q, scale, err = quantize_q80(p[name], gs)
            f.write(q.numpy().tobytes())
            write_f32(f, scale)
            max_err = max(max_err, err)
        notes.update(group_size=gs, max_quantization_error=max_err)
    return notes
