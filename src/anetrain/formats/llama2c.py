"""llama2.c model files (``run.c``'s ``.bin``), version 0 (legacy) so far.

Version 0: a 28-byte header of 7 little-endian int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads,
vocab_size, seq_len; a negative vocab_size means an unshared classifier follows), then float32 tensors
grouped by kind across layers: emb, rms_att[L], wq[L], wk[L], wv[L], wo[L], rms_ffn[L], w1[L], w2[L], w3[L],
rms_final, freq_cos[S, dh/2], freq_sin[S, dh/2], [wcls].
"""

from __future__ import annotations

import os
import struct

import numpy as np
import torch

from ..config import make_config
from ..errors import ConfigError, InputError
from ..params import ModelParams
from .common import LoadedModel

V0_HEADER = struct.Struct("<7i")


def read_llama2c(path: str | os.PathLike[str]) -> LoadedModel:
    """Read a llama2.c version-0 model file."""
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise InputError(path, f"cannot read ({e.strerror or e})") from None
    if raw.size < V0_HEADER.size:
        raise InputError(path, f"truncated: {raw.size} bytes is shorter than the 28-byte llama2.c header")
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = V0_HEADER.unpack_from(
        raw.tobytes()[: V0_HEADER.size]
    )
    tied = vocab > 0
    try:
        cfg = make_config(
            dim=dim,
            hidden_dim=hidden,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=n_kv,
            vocab_size=abs(vocab),
            seq_len=seq_len,
            tied_classifier=tied,
            name=os.path.basename(os.fspath(path)),
        )
    except ConfigError as e:
        raise InputError(path, f"not a valid llama2.c v0 header ({e})") from None
    d, f, L, v, dh, kvd = cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.vocab_size, cfg.head_dim, cfg.kv_dim
    sizes = [
        ("emb", v * d),
        ("rms_att", L * d),
        ("wq", L * d * d),
        ("wk", L * kvd * d),
        ("wv", L * kvd * d),
        ("wo", L * d * d),
        ("rms_ffn", L * d),
        ("w1", L * f * d),
        ("w2", L * d * f),
        ("w3", L * f * d),
        ("rms_final", d),
        ("freq_cos", seq_len * dh // 2),
        ("freq_sin", seq_len * dh // 2),
    ]
    if not tied:
        sizes.append(("wcls", v * d))
    expected = V0_HEADER.size + 4 * sum(n for _, n in sizes)
    if raw.size != expected:
        raise InputError(
            path, f"size {raw.size} bytes does not match its header ({cfg.shape_line()}): expected {expected}"
        )
    body = raw[V0_HEADER.size :].view("<f4")
    parts: dict[str, np.ndarray] = {}
    off = 0
    for name, n in sizes:
        parts[name] = body[off : off + n]
        off += n
    t: dict[str, torch.Tensor] = {
        "tok_embeddings.weight": torch.from_numpy(parts["emb"].reshape(v, d).copy())
    }
    per_layer = {
        "attention_norm.weight": ("rms_att", (d,)),
        "attention.wq.weight": ("wq", (d, d)),
        "attention.wk.weight": ("wk", (kvd, d)),
        "attention.wv.weight": ("wv", (kvd, d)),
        "attention.wo.weight": ("wo", (d, d)),
        "ffn_norm.weight": ("rms_ffn", (d,)),
        "feed_forward.w1.weight": ("w1", (f, d)),
        "feed_forward.w2.weight": ("w2", (d, f)),
        "feed_forward.w3.weight": ("w3", (f, d)),
    }
    for name, (key, shape) in per_layer.items():
        stacked = parts[key].reshape(L, *shape)
        for layer in range(L):
            t[f"layers.{layer}.{name}"] = torch.from_numpy(stacked[layer].copy())
    t["norm.weight"] = torch.from_numpy(parts["rms_final"].copy())
    if not tied:
        t["output.weight"] = torch.from_numpy(parts["wcls"].reshape(v, d).copy())
    params = ModelParams.from_tensors(cfg, t)
    if not torch.isfinite(params.flat).all():
        raise InputError(path, "contains NaN or infinite weights")
    return LoadedModel(cfg=cfg, params=params, format="llama2c-v0")
