"""The parameter set: every trainable tensor of a model, named, in one flat buffer. No math here.

Like llm.c, all parameters live in a single contiguous tensor and each named tensor is a view into it. The
same layout serves the weights, their gradients, the optimizer's moments and any low-precision compute
copy, so that zeroing gradients, casting weights to bf16, all-reducing gradients or running AdamW are each
one operation over one buffer. The buffer is ordered so that the tensors without weight decay (the RMSNorm
gains) come first and form one slice, ``no_decay``, and everything else (matrices and the embedding) forms
the other, ``decay``. Within a layer the order is wq, wk, wv (adjacent, so ``qkv`` is one [Dq+2Dkv, D] matrix
for a fused projection), wo, w1, w3 (adjacent: ``w13`` is one [2F, D] matrix), w2.

Names follow llama2.c's ``model.py`` (and so its state dicts)::

    tok_embeddings.weight                 [V, D]
    layers.{l}.attention_norm.weight      [D]
    layers.{l}.attention.wq.weight        [Dq, D]      wk, wv: [Dkv, D]    wo: [D, Dq]
    layers.{l}.attention.q_norm.weight    [dh]         k_norm: [dh]        (QK-norm models only: Qwen3)
    layers.{l}.ffn_norm.weight            [D]
    layers.{l}.feed_forward.w1.weight     [F, D]       w3: [F, D]          w2: [D, F]
    norm.weight                           [D]
    output.weight                         [V, D]       only when the classifier is not tied

Weights are stored ``[out, in]`` so a linear layer is ``y = x @ W.T`` on token-major activations.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .config import ModelConfig
from .errors import ConfigError, InputError
from .rng import Drand48

# ------------------------------------------------------------------------------------------------
# Layout


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    decay: bool  # AdamW weight decay applies (matrices, embedding) or not (norm gains)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def layer_prefix(layer: int) -> str:
    return f"layers.{layer}."


def param_specs(cfg: ModelConfig) -> list[TensorSpec]:
    """Every parameter of ``cfg`` in storage order: the no-decay norm gains first, then the matrices."""
    d, f, v = cfg.dim, cfg.hidden_dim, cfg.vocab_size
    norms: list[TensorSpec] = []
    mats: list[TensorSpec] = [TensorSpec("tok_embeddings.weight", (v, d), True)]
    for layer in range(cfg.n_layers):
        p = layer_prefix(layer)
        norms.append(TensorSpec(p + "attention_norm.weight", (d,), False))
        norms.append(TensorSpec(p + "ffn_norm.weight", (d,), False))
        if cfg.qk_norm:
            norms.append(TensorSpec(p + "attention.q_norm.weight", (cfg.head_dim,), False))
            norms.append(TensorSpec(p + "attention.k_norm.weight", (cfg.head_dim,), False))
        mats += [
            TensorSpec(p + "attention.wq.weight", (cfg.q_dim, d), True),
            TensorSpec(p + "attention.wk.weight", (cfg.kv_dim, d), True),
            TensorSpec(p + "attention.wv.weight", (cfg.kv_dim, d), True),
            TensorSpec(p + "attention.wo.weight", (d, cfg.q_dim), True),
            TensorSpec(p + "feed_forward.w1.weight", (f, d), True),
            TensorSpec(p + "feed_forward.w3.weight", (f, d), True),
            TensorSpec(p + "feed_forward.w2.weight", (d, f), True),
        ]
    norms.append(TensorSpec("norm.weight", (d,), False))
    if not cfg.tied_classifier:
        mats.append(TensorSpec("output.weight", (v, d), True))
    return norms + mats


def require_file_holds(
    path: object, cfg: ModelConfig, available: int, per_param: float = 1, unit: str = "bytes"
) -> None:
    """Refuse (InputError naming ``path``) a model whose parameters cannot be in ``available`` bytes of file
    at ``per_param`` bytes each (or ``available`` values: ``unit="values"``): the check a reader makes
    before allocating what a header or config claims."""
    n = cfg.param_count()
    if n * per_param > available:
        raise InputError(
            str(path),
            f"describes a model of {n:,} parameters ({cfg.shape_line()}), but the weights hold only "
            f"{available:,} {unit}",
        )


# ------------------------------------------------------------------------------------------------
# The parameter set


@dataclass
class LayerParams:
    """Views of one transformer layer's tensors (weights, or gradients, or moments: same layout)."""

    attention_norm: torch.Tensor  # [D]
    q_norm: torch.Tensor | None  # [dh]  QK-norm gains (None without QK-norm)
    k_norm: torch.Tensor | None  # [dh]
    wq: torch.Tensor  # [Dq, D]
    wk: torch.Tensor  # [Dkv, D]
    wv: torch.Tensor  # [Dkv, D]
    wo: torch.Tensor  # [D, Dq]
    ffn_norm: torch.Tensor  # [D]
    w1: torch.Tensor  # [F, D]  gate
    w2: torch.Tensor  # [D, F]  down
    w3: torch.Tensor  # [F, D]  up
    qkv: torch.Tensor  # [Dq + 2 Dkv, D]: wq, wk, wv stacked (the same memory)
    w13: torch.Tensor  # [2F, D]: w1, w3 stacked (the same memory)


class FlatParams:
    """Named tensors laid out in one flat buffer, the no-decay ones first: what an optimizer, a gradient
    all-reduce and a checkpoint work on. :class:`ModelParams` (a whole model) and
    :class:`anetrain.lora.LoraParams` (a model's low-rank adapters) are the two kinds."""

    cfg: ModelConfig

    def __init__(self, specs: list[TensorSpec], flat: torch.Tensor) -> None:
        total = sum(s.numel for s in specs)
        if flat.dim() != 1 or flat.numel() != total:
            raise ValueError(f"flat buffer has {flat.numel()} elements, the layout needs {total}")
        self.flat = flat
        self.specs = specs
        self.tensors: dict[str, torch.Tensor] = {}
        offset = 0
        n_no_decay = 0
        for s in specs:
            self.tensors[s.name] = flat[offset : offset + s.numel].view(s.shape)
            offset += s.numel
            if not s.decay:
                n_no_decay = offset
        self.no_decay = flat[:n_no_decay]
        self.decay = flat[n_no_decay:]

    def _with_flat(self, flat: torch.Tensor) -> FlatParams:
        """The same layout over another flat buffer."""
        raise NotImplementedError

    def like(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Any:
        """A zero-filled set with the same layout (for gradients, moments, compute copies)."""
        return self._with_flat(
            torch.zeros(self.flat.numel(), dtype=dtype or self.flat.dtype, device=device or self.flat.device)
        )

    def clone(self) -> Any:
        return self._with_flat(self.flat.clone())

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Any:
        return self._with_flat(
            self.flat.to(dtype=dtype or self.flat.dtype, device=device or self.flat.device)
        )

    def named(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(self.tensors.items())

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def numel(self) -> int:
        return self.flat.numel()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Named views (sharing storage with ``flat``)."""
        return dict(self.tensors)

    def buckets(self) -> list[torch.Tensor]:
        """The flat buffer cut into the slices a backward pass finishes one after another (see
        :meth:`ModelParams.buckets`); one slice unless a subclass knows better."""
        return [self.flat]


class ModelParams(FlatParams):
    """A named set of tensors laid out in one flat buffer (see the module docstring)."""

    def __init__(self, cfg: ModelConfig, flat: torch.Tensor) -> None:
        super().__init__(param_specs(cfg), flat)
        self.cfg = cfg
        self.layers = [self._layer(i) for i in range(cfg.n_layers)]

    def _with_flat(self, flat: torch.Tensor) -> ModelParams:
        return ModelParams(self.cfg, flat)

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def zeros(
        cls, cfg: ModelConfig, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> ModelParams:
        total = sum(s.numel for s in param_specs(cfg))
        return cls(cfg, torch.zeros(total, dtype=dtype, device=device))

    @classmethod
    def from_tensors(
        cls, cfg: ModelConfig, tensors: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32
    ) -> ModelParams:
        """Copy named tensors into a new flat buffer; every name of the layout must be present."""
        p = cls.zeros(cfg, dtype)
        for s in p.specs:
            if s.name not in tensors:
                raise ConfigError(f"missing tensor {s.name}")
            t = tensors[s.name]
            if tuple(t.shape) != s.shape:
                raise ConfigError(f"tensor {s.name} has shape {tuple(t.shape)}, expected {s.shape}")
            p.tensors[s.name].copy_(t)
        return p

    # ---- access ----------------------------------------------------------------------------------
    def _layer(self, i: int) -> LayerParams:
        p = layer_prefix(i)
        t = self.tensors
        return LayerParams(
            attention_norm=t[p + "attention_norm.weight"],
            q_norm=t.get(p + "attention.q_norm.weight"),
            k_norm=t.get(p + "attention.k_norm.weight"),
            wq=t[p + "attention.wq.weight"],
            wk=t[p + "attention.wk.weight"],
            wv=t[p + "attention.wv.weight"],
            wo=t[p + "attention.wo.weight"],
            ffn_norm=t[p + "ffn_norm.weight"],
            w1=t[p + "feed_forward.w1.weight"],
            w2=t[p + "feed_forward.w2.weight"],
            w3=t[p + "feed_forward.w3.weight"],
            qkv=self._stacked(p + "attention.wq.weight", p + "attention.wv.weight"),
            w13=self._stacked(p + "feed_forward.w1.weight", p + "feed_forward.w3.weight"),
        )

    def _stacked(self, first: str, last: str) -> torch.Tensor:
        """A view of adjacent [*, in] matrices first..last as one matrix (they share memory)."""
        a, b = self.tensors[first], self.tensors[last]
        start = a.data_ptr() - self.flat.data_ptr()
        rows = (b.data_ptr() - a.data_ptr()) // (a.element_size() * a.shape[1]) + b.shape[0]
        return self.flat[start // a.element_size() :][: rows * a.shape[1]].view(rows, a.shape[1])

    def buckets(self) -> list[torch.Tensor]:
        """The flat buffer cut into the slices a backward pass finishes one after another: the matrices of
        each layer from the last to the first (each layer's are contiguous), then the rest (norm gains and
        embedding, and the untied classifier). Used to all-reduce gradients while the backward goes on."""
        starts = [
            self.tensors[f"layers.{i}.attention.wq.weight"].data_ptr() for i in range(self.cfg.n_layers)
        ]
        base, size = self.flat.data_ptr(), self.flat.element_size()
        offsets = [(p - base) // size for p in starts]
        ends = [*offsets[1:], offsets[-1] + self.cfg.layer_param_count() - self.cfg.layer_norm_count()]
        out = [self.flat[lo:hi] for lo, hi in zip(offsets, ends, strict=True)][::-1]
        out.append(self.flat[: offsets[0]])
        if ends[-1] < self.flat.numel():
            out.append(self.flat[ends[-1] :])
        return out

    @property
    def embedding(self) -> torch.Tensor:
        """E: [V, D]."""
        return self.tensors["tok_embeddings.weight"]

    @property
    def final_norm(self) -> torch.Tensor:
        """g_final: [D]."""
        return self.tensors["norm.weight"]

    @property
    def classifier(self) -> torch.Tensor:
        """Wcls: [V, D]; the embedding itself when tied."""
        return self.tensors["tok_embeddings.weight" if self.cfg.tied_classifier else "output.weight"]

    def gains(self, dtype: torch.dtype) -> ModelParams:
        """A set whose norm gains (the no-decay slice) are ``dtype`` copies of these and whose matrices are
        empty: what a pipeline with a frozen 16-bit model reads its fp32 gains from (``.layers[i].ffn_norm``,
        ``.final_norm``). Only the gain views of the result are meaningful."""
        flat = torch.empty(self.flat.numel(), dtype=dtype, device=self.flat.device)[: self.no_decay.numel()]
        flat.copy_(self.no_decay)
        return _GainsOnly(self.cfg, flat)


class _GainsOnly(ModelParams):
    """A :class:`ModelParams` over just the no-decay slice (see :meth:`ModelParams.gains`)."""

    def __init__(self, cfg: ModelConfig, gains: torch.Tensor) -> None:
        specs = [s for s in param_specs(cfg) if not s.decay]
        FlatParams.__init__(self, specs, gains)
        self.cfg = cfg
        t = self.tensors
        self.layers = [
            LayerParams(
                attention_norm=t[layer_prefix(i) + "attention_norm.weight"],
                q_norm=t.get(layer_prefix(i) + "attention.q_norm.weight"),
                k_norm=t.get(layer_prefix(i) + "attention.k_norm.weight"),
                wq=gains[:0],
                wk=gains[:0],
                wv=gains[:0],
                wo=gains[:0],
                ffn_norm=t[layer_prefix(i) + "ffn_norm.weight"],
                w1=gains[:0],
                w2=gains[:0],
                w3=gains[:0],
                qkv=gains[:0],
                w13=gains[:0],
            )
            for i in range(cfg.n_layers)
        ]


# ------------------------------------------------------------------------------------------------
# Initialization

INIT_SCHEMES = ("llama2c", "original", "original-static")


def init_params(cfg: ModelConfig, scheme: str = "llama2c", seed: int = 1337) -> ModelParams:
    """Fresh fp32 parameters.

    ``llama2c``: every matrix and the embedding ~ N(0, 0.02); then wo and w3 (llama2.c's choice, not w2)
    ~ N(0, 0.02/sqrt(2L)); norm gains 1. Reproducible from ``seed`` (torch's CPU generator).

    ``original``: the original trainer's dynamic-pipeline ``--scratch`` init (docs/original.md section 6),
    drawn from drand48 seeded with ``seed`` in its order: per layer Wq, Wk, Wv (u/sqrt(D)), Wo
    (u/sqrt(Dq)/sqrt(2L)), W1 (u/sqrt(F)), W2 (u/sqrt(D)/sqrt(2L)), W3 (u/sqrt(F)); then E (0.02 u), with
    u = 2*drand48() - 1. Use seed 42 to reproduce the original exactly.

    ``original-static``: the static pipeline's init (train_large / train_opt): interleaved Wq/Wk then Wv/Wo
    draws, all u/sqrt(D), then W1 (u/sqrt(F)), W2 (u/sqrt(D)), W3 (u/sqrt(F)); then E. Its interleaving
    assumes square attention matrices (Dq = Dkv = D).
    """
    p = ModelParams.zeros(cfg)
    p.no_decay.fill_(1.0)  # every norm gain (attention, FFN, final; q_norm/k_norm with QK-norm)
    if scheme == "llama2c":
        g = torch.Generator().manual_seed(seed)
        small = 0.02 / math.sqrt(2 * cfg.n_layers)
        for s in p.specs:
            if not s.decay:
                continue
            std = small if s.name.endswith(("attention.wo.weight", "feed_forward.w3.weight")) else 0.02
            p.tensors[s.name].normal_(0.0, std, generator=g)
    elif scheme == "original":
        rng = Drand48(seed)
        alpha = 1.0 / math.sqrt(2 * cfg.n_layers)
        d, f, dq = cfg.dim, cfg.hidden_dim, cfg.q_dim

        def fill(t: torch.Tensor, scale: float) -> None:
            t.copy_(torch.from_numpy((rng.uniform_pm1(t.numel()) * scale).astype(np.float32)).view(t.shape))

        for layer in p.layers:
            fill(layer.wq, 1 / math.sqrt(d))
            fill(layer.wk, 1 / math.sqrt(d))
            fill(layer.wv, 1 / math.sqrt(d))
            fill(layer.wo, 1 / math.sqrt(dq) * alpha)
            fill(layer.w1, 1 / math.sqrt(f))
            fill(layer.w2, 1 / math.sqrt(d) * alpha)
            fill(layer.w3, 1 / math.sqrt(f))
        fill(p.embedding, 0.02)
        if not cfg.tied_classifier:
            fill(p.tensors["output.weight"], 0.02)
    elif scheme == "original-static":
        if not (cfg.q_dim == cfg.kv_dim == cfg.dim):
            raise ConfigError(
                "init 'original-static' needs square attention matrices (MHA with head_dim = dim/heads)"
            )
        rng = Drand48(seed)
        d, f = cfg.dim, cfg.hidden_dim
        n = d * d

        def draws(count: int, scale: float) -> torch.Tensor:
            return torch.from_numpy((rng.uniform_pm1(count) * scale).astype(np.float32))

        for layer in p.layers:
            qk = draws(2 * n, 1 / math.sqrt(d)).view(n, 2)  # interleaved: Wq[i], Wk[i], Wq[i+1], ...
            layer.wq.copy_(qk[:, 0].reshape(d, d))
            layer.wk.copy_(qk[:, 1].reshape(d, d))
            vo = draws(2 * n, 1 / math.sqrt(d)).view(n, 2)
            layer.wv.copy_(vo[:, 0].reshape(d, d))
            layer.wo.copy_(vo[:, 1].reshape(d, d))
            layer.w1.copy_(draws(f * d, 1 / math.sqrt(f)).view(f, d))
            layer.w2.copy_(draws(d * f, 1 / math.sqrt(d)).view(d, f))
            layer.w3.copy_(draws(f * d, 1 / math.sqrt(f)).view(f, d))
        p.embedding.copy_(draws(cfg.vocab_size * d, 0.02).view(cfg.vocab_size, d))
        if not cfg.tied_classifier:
            p.tensors["output.weight"].copy_(draws(cfg.vocab_size * d, 0.02).view(cfg.vocab_size, d))
    else:
        raise ConfigError(f"unknown init scheme {scheme!r} (known: {', '.join(INIT_SCHEMES)})")
    return p


# ------------------------------------------------------------------------------------------------
# Exporting: fold the residual scale into the branch outputs


def fold_residual_scale(p: ModelParams) -> ModelParams:
    """A copy with alpha folded into wo and w2 (and ``residual_scale`` reset to 1).

    With x2 = x + alpha * (attn @ Wo^T) and x' = x2 + alpha * (g @ W2^T), scaling Wo and W2 by alpha gives a
    plain Llama model with identical outputs, which every other tool can read.
    """
    alpha = p.cfg.residual_scale
    out = ModelParams(p.cfg.with_(residual_scale=1.0), p.flat.clone())
    if alpha != 1.0:
        for layer in out.layers:
            layer.wo.mul_(alpha)
            layer.w2.mul_(alpha)
    return out
