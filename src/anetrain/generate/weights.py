"""A model's weights in the precision text is generated in: fp32, bf16, int8 (Q8_0), or fp64 (reference).

* ``fp32`` / ``fp64``: every matrix as it is (fp64 only for checks; it runs on the torch path);
* ``bf16``: the matrices (embedding, attention, feed-forward, classifier) rounded to bfloat16 (nearest even);
* ``int8``: the matrices in llama2.c's Q8_0 as ``runq.c`` reads them: int8 values with one float32 scale per
  group of ``group_size`` consecutive values of a row (``anetrain.formats.q80``: scale = max|w| / 127,
  q = round(w / scale)). A llama2.c version 2 file is taken as it is stored; any other model is quantized on
  load with the group size llama2.c's exporter would pick (64, halved until it divides every matrix's rows).

The norm gains stay float32 in every precision. A residual scale alpha != 1 is folded into wo and w2 first
(``anetrain.params.fold_residual_scale``), so the decoders compute a plain Llama block.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from ..config import ModelConfig
from ..errors import AnetrainError, ConfigError, InputError
from ..formats.llama2c import Q80Model, read_llama2c_q80
from ..formats.q80 import quantize_q80
from ..params import ModelParams, fold_residual_scale

DTYPES = ("fp32", "bf16", "int8", "fp64")
# The spellings ``anetrain train`` uses, and the long ones ``generate`` always took.
DTYPE_ALIASES = {
    "fp32": "fp32",
    "float32": "fp32",
    "bf16": "bf16",
    "bfloat16": "bf16",
    "int8": "int8",
    "q8_0": "int8",
    "fp64": "fp64",
    "float64": "fp64",
}
_TORCH_NAMES = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.int8: "int8"}


def dtype_name(dtype: str | torch.dtype) -> str:
    """The canonical name (fp32, bf16, int8, fp64) of a dtype given by name, alias or torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _TORCH_NAMES:
            raise AnetrainError(f"generation does not run in {dtype} (known: {', '.join(DTYPES)})")
        return _TORCH_NAMES[dtype]
    name = DTYPE_ALIASES.get(str(dtype).lower())
    if name is None:
        raise AnetrainError(f"unknown generation dtype {dtype!r} (known: {', '.join(DTYPE_ALIASES)})")
    return name


def q8_group_size(cfg: ModelConfig, start: int = 64) -> int:
    """The Q8_0 group size for quantizing ``cfg`` on load: ``start``, halved until it divides the width of
    every matrix's rows (D, Dq, F), as llama2.c's exporter does for D."""
    gs = start
    while cfg.dim % gs or cfg.q_dim % gs or cfg.hidden_dim % gs:
        gs //= 2
    return gs


@dataclass
class Matrix:
    """One weight matrix [out, in] in a decode precision."""

    w: torch.Tensor  # float32 / float64 / bfloat16 / int8 [out, in]
    s: torch.Tensor | None = None  # int8 only: float32 scales [out, in / group_size]

    @property
    def nbytes(self) -> int:
        return self.w.numel() * self.w.element_size() + (0 if self.s is None else 4 * self.s.numel())


@dataclass
class LayerMatrices:
    wq: Matrix  # [Dq, D]
    wk: Matrix  # [Dkv, D]
    wv: Matrix  # [Dkv, D]
    wo: Matrix  # [D, Dq]
    w1: Matrix  # [F, D]
    w2: Matrix  # [D, F]
    w3: Matrix  # [F, D]

    def all(self) -> tuple[Matrix, ...]:
        return (self.wq, self.wk, self.wv, self.wo, self.w1, self.w2, self.w3)


@dataclass
class DecodeWeights:
    cfg: ModelConfig  # residual_scale is 1 (folded)
    dtype: str  # fp32 | bf16 | int8 | fp64
    attention_norm: torch.Tensor  # [L, D] float32 (float64 for fp64)
    ffn_norm: torch.Tensor  # [L, D]
    final_norm: torch.Tensor  # [D]
    embedding: Matrix  # [V, D]
    layers: list[LayerMatrices]
    classifier: Matrix  # [V, D]; the embedding itself when tied
    group_size: int = 0  # int8 only
    origin: str = ""  # how the weights were made, for the statistics line
    extras: dict[str, float] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.embedding.w.device

    def bytes_per_token(self) -> int:
        """Weight bytes one decode step reads: every layer matrix and the classifier (one embedding row)."""
        mats = sum(m.nbytes for layer in self.layers for m in layer.all())
        return mats + self.classifier.nbytes

    @classmethod
    def from_params(
        cls, params: ModelParams, dtype: str | torch.dtype = "fp32", group_size: int | None = None
    ) -> DecodeWeights:
        """Weights of ``params`` in ``dtype`` (fp32 shares the memory of float32 parameters)."""
        name = dtype_name(dtype)
        if name == "fp64" and params.flat.dtype != torch.float64:
            params = params.to(dtype=torch.float64)  # fold alpha in float64 too
        if params.cfg.residual_scale != 1.0:
            params = fold_residual_scale(params)
        cfg = params.cfg
        norm_dtype = torch.float64 if name == "fp64" else torch.float32
        gs = 0
        if name == "int8":
            gs = group_size or q8_group_size(cfg)
            _check_group_size(cfg, gs, None)

        def mat(w: torch.Tensor) -> Matrix:
            if name == "fp32":
                return Matrix(w.to(torch.float32).contiguous())
            if name == "fp64":
                return Matrix(w.to(torch.float64).contiguous())
            if name == "bf16":
                return Matrix(w.to(torch.bfloat16).contiguous())
            q, s, _ = quantize_q80(w, gs)
            return Matrix(q.view(w.shape).to(w.device), s.view(w.shape[0], -1).to(w.device))

        layers = [
            LayerMatrices(*(mat(t) for t in (p.wq, p.wk, p.wv, p.wo, p.w1, p.w2, p.w3)))
            for p in params.layers
        ]
        emb = mat(params.embedding)
        origin = {
            "fp32": "float32",
            "fp64": "float64",
            "bf16": "bfloat16 (rounded on load)",
            "int8": f"Q8_0 int8 (quantized on load, group size {gs})",
        }[name]
        return cls(
            cfg=cfg,
            dtype=name,
            attention_norm=torch.stack([p.attention_norm for p in params.layers]).to(norm_dtype),
            ffn_norm=torch.stack([p.ffn_norm for p in params.layers]).to(norm_dtype),
            final_norm=params.final_norm.to(norm_dtype).clone(),
            embedding=emb,
            layers=layers,
            classifier=emb if cfg.tied_classifier else mat(params.classifier),
            group_size=gs,
            origin=origin,
        )

    @classmethod
    def from_q80(cls, model: Q80Model, path: str | os.PathLike[str] = "") -> DecodeWeights:
        """A llama2.c v2 file's Q8_0 matrices as they are stored (``runq.c``'s model)."""
        cfg, gs = model.cfg, model.group_size
        _check_group_size(cfg, gs, path or "llama2.c v2 file")

        def mat(name: str, rows: int) -> Matrix:
            q, s = model.quantized[name]
            if bool((q == -128).any()):
                raise InputError(path, f"{name} holds the int8 value -128, outside Q8_0's range -127..127")
            return Matrix(q.view(rows, -1), s.view(rows, -1))

        def layer(i: int) -> LayerMatrices:
            p = f"layers.{i}."
            return LayerMatrices(
                wq=mat(p + "attention.wq.weight", cfg.q_dim),
                wk=mat(p + "attention.wk.weight", cfg.kv_dim),
                wv=mat(p + "attention.wv.weight", cfg.kv_dim),
                wo=mat(p + "attention.wo.weight", cfg.dim),
                w1=mat(p + "feed_forward.w1.weight", cfg.hidden_dim),
                w2=mat(p + "feed_forward.w2.weight", cfg.dim),
                w3=mat(p + "feed_forward.w3.weight", cfg.hidden_dim),
            )

        emb = mat("tok_embeddings.weight", cfg.vocab_size)
        n = model.norms
        return cls(
            cfg=cfg,
            dtype="int8",
            attention_norm=torch.stack([n[f"layers.{i}.attention_norm.weight"] for i in range(cfg.n_layers)]),
            ffn_norm=torch.stack([n[f"layers.{i}.ffn_norm.weight"] for i in range(cfg.n_layers)]),
            final_norm=n["norm.weight"],
            embedding=emb,
            layers=[layer(i) for i in range(cfg.n_layers)],
            classifier=emb if cfg.tied_classifier else mat("output.weight", cfg.vocab_size),
            group_size=gs,
            origin=f"Q8_0 int8 as stored in the llama2.c v2 file (group size {gs})",
        )

    @classmethod
    def from_llama2c_v2(cls, path: str | os.PathLike[str]) -> DecodeWeights:
        return cls.from_q80(read_llama2c_q80(path), path)


def _check_group_size(cfg: ModelConfig, gs: int, path: str | os.PathLike[str] | None) -> None:
    """Every matrix input (D, Dq, F values) must be whole groups: runq.c quantizes them the same way."""
    for what, n in (("dim", cfg.dim), ("n_heads * head_dim", cfg.q_dim), ("hidden_dim", cfg.hidden_dim)):
        if gs <= 0 or n % gs:
            problem = f"Q8_0 group size {gs} does not divide {what} = {n}"
            raise InputError(path, problem) if path else ConfigError(problem)
