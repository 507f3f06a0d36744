"""FLOP accounting, the original's way (docs/original.md section 8), generalized to GQA and any head_dim.

Per sequence of S tokens::

    FWD  = 2 * S * (per-layer matmul weights) * L      q/k/v/o projections and the three FFN matrices
    SDPA = L * 2 * H * 5 * S^2 * dh                     "5 S^2 dh matmul-equivalents": QK^T, PV and backward
    CLS  = 2 * V * D * S                               classifier
    TOTAL = 3 * FWD + SDPA + 3 * CLS                   forward + backward dx + backward dW

For stories110M at S = 256 this gives 174,248 MFLOP, the original's figure. Model TFLOPS = TOTAL *
sequences / seconds; it counts the attention as dense (the causal half is not subtracted), as the original.
"""

from __future__ import annotations

from ..config import ModelConfig


def forward_matmul_flops(cfg: ModelConfig, seq: int) -> float:
    d, f = cfg.dim, cfg.hidden_dim
    per_layer = cfg.q_dim * d + 2 * cfg.kv_dim * d + d * cfg.q_dim + 3 * f * d
    return 2.0 * seq * per_layer * cfg.n_layers


def attention_flops(cfg: ModelConfig, seq: int) -> float:
    return cfg.n_layers * 2.0 * cfg.n_heads * 5 * seq * seq * cfg.head_dim


def classifier_flops(cfg: ModelConfig, seq: int, vocab: int | None = None) -> float:
    return 2.0 * (vocab or cfg.vocab_size) * cfg.dim * seq


def training_flops_per_sequence(cfg: ModelConfig, seq: int, vocab: int | None = None) -> float:
    """FLOPs of one forward + backward over one sequence of ``seq`` tokens."""
    return (
        3 * forward_matmul_flops(cfg, seq) + attention_flops(cfg, seq) + 3 * classifier_flops(cfg, seq, vocab)
    )
