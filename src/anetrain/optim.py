"""Optimizers over the flat parameter set: AdamW (decoupled decay) and Adam, LR schedules, clipping.

(Work in progress: the state container is defined first so formats can read and write it.)
"""

from __future__ import annotations

from dataclasses import dataclass

from .params import ModelParams


@dataclass
class AdamState:
    """Adam/AdamW moments in the parameters' layout, and the update counter t (for bias correction)."""

    m: ModelParams
    v: ModelParams
    t: int = 0

    @classmethod
    def zeros_like(cls, params: ModelParams) -> AdamState:
        return cls(params.like(), params.like(), 0)
