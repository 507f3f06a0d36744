"""LoRA adapters as a parameter set: which projections are adapted, their matrices in one buffer, merging.

A LoRA run trains only the adapters (the math is in ``anetrain.kernels.lora``); the model they adapt, the
*base*, stays frozen in the pipeline's compute precision: it has no gradients and no optimizer state, and no
pipeline forms the dW product of a frozen matrix. :class:`LoraParams` has the interface of
:class:`anetrain.params.FlatParams`, so the optimizer, the gradient all-reduce and the checkpoints treat the
adapters exactly as they treat a whole model.

Layout, per layer, in the order a backward pass finishes them (so that each layer's adapters are one
contiguous bucket)::

    layers.{l}.attention.wq.lora_A   [r, D]     wk, wv: [r, D]     (A's of wq, wk, wv adjacent: one [3r, D])
    layers.{l}.attention.wq.lora_B   [Dq, r]    wk, wv: [Dkv, r]
    layers.{l}.attention.wo.lora_A   [r, Dq]    lora_B: [D, r]
    layers.{l}.feed_forward.w1.lora_A [r, D]    w3 likewise (adjacent: one [2r, D])   lora_B: [F, r]
    layers.{l}.feed_forward.w2.lora_A [r, F]    lora_B: [D, r]

only for the adapted targets (``--lora-targets``); the scale is alpha / r.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import torch

from .config import ModelConfig
from .errors import ConfigError
from .kernels.lora import Adapter
from .params import FlatParams, ModelParams, TensorSpec, layer_prefix

#: every projection an adapter can sit beside, in the parameter set's order
TARGETS = ("wq", "wk", "wv", "wo", "w1", "w3", "w2")
#: projections that share an input, in the order their outputs are stacked in the fused GEMMs
GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("wq", "wk", "wv"),
    "wo": ("wo",),
    "w13": ("w1", "w3"),
    "w2": ("w2",),
}
_MODULE = {
    "wq": "attention.wq",
    "wk": "attention.wk",
    "wv": "attention.wv",
    "wo": "attention.wo",
    "w1": "feed_forward.w1",
    "w2": "feed_forward.w2",
    "w3": "feed_forward.w3",
}
DEFAULT_TARGETS = TARGETS


def parse_targets(spec: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """--lora-targets "wq,wv" -> ("wq", "wv") in canonical order; "all" means every projection. Hugging
    Face module names (q_proj, ..., gate_proj, up_proj, down_proj) are accepted too."""
    hf = {
        "q_proj": "wq",
        "k_proj": "wk",
        "v_proj": "wv",
        "o_proj": "wo",
        "gate_proj": "w1",
        "up_proj": "w3",
        "down_proj": "w2",
    }
    names = [t.strip() for t in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [t for t in names if t]
    if names == ["all"]:
        return TARGETS
    out = []
    for t in names:
        t = hf.get(t, t)
        if t not in TARGETS:
            raise ConfigError(
                f"unknown LoRA target {t!r} (known: {', '.join(TARGETS)}, their Hugging Face names, or all)"
            )
        out.append(t)
    if not out:
        raise ConfigError("--lora-targets names no projection")
    return tuple(t for t in TARGETS if t in out)


@dataclass(frozen=True)
class LoraConfig:
    rank: int
    alpha: float
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ConfigError(
                f"--lora-rank must be positive for LoRA (0 means full fine-tuning), got {self.rank}"
            )
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ConfigError(f"--lora-alpha must be a positive number, got {self.alpha}")

    @property
    def scale(self) -> float:
        """s = alpha / r, the factor on the adapter's output."""
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoraConfig:
        return cls(int(d["rank"]), float(d["alpha"]), parse_targets(list(d["targets"])))


def io_dims(cfg: ModelConfig, target: str) -> tuple[int, int]:
    """(in, out) of a projection."""
    d, f = cfg.dim, cfg.hidden_dim
    return {
        "wq": (d, cfg.q_dim),
        "wk": (d, cfg.kv_dim),
        "wv": (d, cfg.kv_dim),
        "wo": (cfg.q_dim, d),
        "w1": (d, f),
        "w3": (d, f),
        "w2": (f, d),
    }[target]


def adapter_name(layer: int, target: str, which: str) -> str:
    """layers.3.attention.wq.lora_A"""
    return f"{layer_prefix(layer)}{_MODULE[target]}.lora_{which}"


def lora_specs(cfg: ModelConfig, lc: LoraConfig) -> list[TensorSpec]:
    specs = []
    r = lc.rank
    for layer in range(cfg.n_layers):
        for members in GROUPS.values():
            adapted = [t for t in members if t in lc.targets]
            for t in adapted:  # the A's of a group adjacent: one stacked [k r, in] matrix
                specs.append(TensorSpec(adapter_name(layer, t, "A"), (r, io_dims(cfg, t)[0]), True))
            for t in adapted:
                specs.append(TensorSpec(adapter_name(layer, t, "B"), (io_dims(cfg, t)[1], r), True))
    return specs


class LoraParams(FlatParams):
    """The adapters of every layer in one flat buffer (see the module docstring); ``base`` is the frozen
    model they adapt, where the pipeline has set it (not part of the buffer, never trained)."""

    def __init__(
        self, cfg: ModelConfig, lc: LoraConfig, flat: torch.Tensor, base: ModelParams | None = None
    ) -> None:
        super().__init__(lora_specs(cfg, lc), flat)
        self.cfg = cfg
        self.lora = lc
        self.base = base

    def _with_flat(self, flat: torch.Tensor) -> LoraParams:
        return LoraParams(self.cfg, self.lora, flat, self.base)

    @classmethod
    def zeros(
        cls, cfg: ModelConfig, lc: LoraConfig, dtype: torch.dtype = torch.float32, device: str = "cpu"
    ) -> LoraParams:
        total = sum(s.numel for s in lora_specs(cfg, lc))
        return cls(cfg, lc, torch.zeros(total, dtype=dtype, device=device))

    @classmethod
    def from_tensors(cls, cfg: ModelConfig, lc: LoraConfig, tensors: dict[str, torch.Tensor]) -> LoraParams:
        p = cls.zeros(cfg, lc)
        for s in p.specs:
            if s.name not in tensors:
                raise ConfigError(f"missing adapter tensor {s.name}")
            if tuple(tensors[s.name].shape) != s.shape:
                raise ConfigError(
                    f"adapter {s.name} has shape {tuple(tensors[s.name].shape)}, expected {s.shape}"
                )
            p.tensors[s.name].copy_(tensors[s.name])
        return p

    # ---- access ----------------------------------------------------------------------------------
    def adapters(self, layer: int) -> dict[str, Adapter]:
        """The adapted projections of one layer: target -> Adapter (views of this buffer)."""
        t = self.tensors
        return {
            name: Adapter(
                t[adapter_name(layer, name, "A")], t[adapter_name(layer, name, "B")], self.lora.scale
            )
            for name in self.lora.targets
        }

    def stacked_a(self, layer: int, group: str) -> torch.Tensor | None:
        """The A's of a group's adapted projections as one [k r, in] matrix (the same memory), or None."""
        adapted = [t for t in GROUPS[group] if t in self.lora.targets]
        if not adapted:
            return None
        first = self.tensors[adapter_name(layer, adapted[0], "A")]
        start = (first.data_ptr() - self.flat.data_ptr()) // first.element_size()
        rows = self.lora.rank * len(adapted)
        return self.flat[start : start + rows * first.shape[1]].view(rows, first.shape[1])

    def buckets(self) -> list[torch.Tensor]:
        """One slice per layer (each layer's adapters are contiguous), the last layer's first."""
        per_layer = self.flat.numel() // self.cfg.n_layers
        return [self.flat[i * per_layer : (i + 1) * per_layer] for i in reversed(range(self.cfg.n_layers))]


def init_lora(cfg: ModelConfig, lc: LoraConfig, seed: int = 1337) -> LoraParams:
    """Fresh adapters as peft makes them: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming_uniform with a = sqrt(5)),
    B = 0, so the adapted model starts as the base model. Reproducible from ``seed``."""
    p = LoraParams.zeros(cfg, lc)
    g = torch.Generator().manual_seed(seed)
    for s in p.specs:
        if s.name.endswith("lora_A"):
            bound = 1.0 / math.sqrt(s.shape[1])
            p.tensors[s.name].uniform_(-bound, bound, generator=g)
    return p


def merge(base: ModelParams, adapters: LoraParams) -> ModelParams:
    """A float32 copy of ``base`` with every adapter folded in: W + s B A."""
    out = base.to(dtype=torch.float32) if base.flat.dtype != torch.float32 else base.clone()
    for i, layer in enumerate(out.layers):
        for name, ad in adapters.adapters(i).items():
            w = getattr(layer, name)
            w.add_((ad.b.float() @ ad.a.float()) * ad.scale)
    return out


def fingerprint(params: ModelParams) -> str:
    """sha256 of a model's values rounded to bfloat16: how a LoRA run recognizes its base model again. The
    same whether the model was read in float32 or straight into bfloat16 (the common file dtype)."""
    h = hashlib.sha256()
    flat = params.flat.detach().cpu()
    step = 1 << 24
    for lo in range(0, flat.numel(), step):
        h.update(flat[lo : lo + step].to(torch.bfloat16).view(torch.int16).numpy())
    return h.hexdigest()
