"""The dimensions of a model's kernels and their zero padding to the ANE's multiple-of-32 matmul rule.

A matmul whose inner (contracted) dimension is not a multiple of 32 silently returns zeros on the ANE. Every
dimension a kernel contracts over is therefore padded with zeros, which changes nothing mathematically:

    dim D        projections (forward), classifier
    hidden F     W2 forward, W1^T/W3^T backward
    head_dim dh  Q K^T and dO V^T, padded per head (each head's dh real entries, then zeros)
    seq S        P V, dV, dQ, dK; padded key positions lie in every real query's causal future
    Dq, Dkv      H*dh_p and Hkv*dh_p: multiples of 32 once dh is padded

stories260K (dh 8, F 172) runs with dh_p 32 and F_p 192. The host pads operands before staging them and
unpads results (:meth:`Axis.pad` / :meth:`Axis.unpad`); each program records the padding in its metadata.

An :class:`Axis` is one axis of a logical operand: ``groups`` blocks of ``size`` real entries, each block
padded to ``padded`` (one block for D, F, S; H blocks of dh for Dq; H blocks of S for stacked score rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import ModelConfig
from .mil import MATMUL_MULTIPLE


def round_up(n: int, multiple: int = MATMUL_MULTIPLE) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class Axis:
    """One axis of a logical operand and its padded form."""

    name: str
    groups: int
    size: int
    padded: int

    @property
    def n(self) -> int:
        """Real length."""
        return self.groups * self.size

    @property
    def np(self) -> int:
        """Padded length (what the ANE sees)."""
        return self.groups * self.padded

    def pad(self, a: np.ndarray, axis: int) -> np.ndarray:
        """Insert the zero padding along ``axis`` (length n -> np)."""
        if a.shape[axis] != self.n:
            raise ValueError(f"axis {self.name}: expected length {self.n}, got {a.shape[axis]}")
        if self.padded == self.size:
            return a
        a = np.moveaxis(a, axis, -1)
        blocks = a.reshape(*a.shape[:-1], self.groups, self.size)
        out = np.zeros((*a.shape[:-1], self.groups, self.padded), dtype=a.dtype)
        out[..., : self.size] = blocks
        return np.moveaxis(out.reshape(*a.shape[:-1], self.np), -1, axis)

    def unpad(self, a: np.ndarray, axis: int) -> np.ndarray:
        """Drop the padding along ``axis`` (length np -> n)."""
        if a.shape[axis] != self.np:
            raise ValueError(f"axis {self.name}: expected padded length {self.np}, got {a.shape[axis]}")
        if self.padded == self.size:
            return a
        a = np.moveaxis(a, axis, -1)
        blocks = a.reshape(*a.shape[:-1], self.groups, self.padded)[..., : self.size]
        return np.moveaxis(blocks.reshape(*a.shape[:-1], self.n), -1, axis)


@dataclass(frozen=True)
class Dims:
    """Every axis the kernels of one model and sequence length use."""

    cfg: ModelConfig
    seq: int
    D: Axis
    F: Axis
    S: Axis
    Dq: Axis
    Dkv: Axis
    HS: Axis  # H stacked blocks of S rows (scores, probabilities)
    V: Axis
    ONE: Axis

    @classmethod
    def build(cls, cfg: ModelConfig, seq: int | None = None) -> Dims:
        s = cfg.seq_len if seq is None else int(seq)
        dh_p = round_up(cfg.head_dim)
        s_p = round_up(s)
        return cls(
            cfg=cfg,
            seq=s,
            D=Axis("dim", 1, cfg.dim, round_up(cfg.dim)),
            F=Axis("hidden_dim", 1, cfg.hidden_dim, round_up(cfg.hidden_dim)),
            S=Axis("seq", 1, s, s_p),
            Dq=Axis("q_dim", cfg.n_heads, cfg.head_dim, dh_p),
            Dkv=Axis("kv_dim", cfg.n_kv_heads, cfg.head_dim, dh_p),
            HS=Axis("heads_x_seq", cfg.n_heads, s, s_p),
            V=Axis("vocab_size", 1, cfg.vocab_size, cfg.vocab_size),
            ONE=Axis("one", 1, 1, 1),
        )

    @property
    def dh_p(self) -> int:
        return self.Dq.padded

    def padding(self) -> dict[str, list[int]]:
        """The padded dimensions as {name: [real, padded]} (only those that changed)."""
        pairs = {
            "dim": (self.D.size, self.D.padded),
            "hidden_dim": (self.F.size, self.F.padded),
            "head_dim": (self.Dq.size, self.Dq.padded),
            "seq": (self.S.size, self.S.padded),
        }
        return {k: [a, b] for k, (a, b) in pairs.items() if a != b}
