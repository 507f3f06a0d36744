"""FLOP accounting, the original's way (docs/original.md section 8), generalized to GQA and any head_dim.

Per sequence of S tokens::

    FWD  = 2 * S * (per-layer matmul weights) * L      q/k/v/o projections and the three FFN matrices
    SDPA = L * 2 * H * 5 * S^2 * dh                     "5 S^2 dh matmul-equivalents": QK^T, PV and backward
    CLS  = 2 * V * D * S                               classifier
    TOTAL = 3 * FWD + SDPA + 3 * CLS                   forward + backward dx + backward dW

For stories110M at S = 256 this gives 174,248 MFLOP, the original's figure. Model TFLOPS = TOTAL *
sequences / seconds; it counts the attention as dense (the causal half is not subtracted), as the original.

With LoRA the frozen weights' dW products are not formed: TOTAL = 2 * FWD + SDPA + 2 * CLS + 3 * LORA, with
LORA = 2 * S * r * (in + out) summed over the adapted projections and layers (u = x A^T, u B^T).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..config import ModelConfig

if TYPE_CHECKING:
    from ..lora import LoraConfig


def forward_matmul_flops(cfg: ModelConfig, seq: int) -> float:
    d, f = cfg.dim, cfg.hidden_dim
    per_layer = cfg.q_dim * d + 2 * cfg.kv_dim * d + d * cfg.q_dim + 3 * f * d
    return 2.0 * seq * per_layer * cfg.n_layers


def attention_flops(cfg: ModelConfig, seq: int) -> float:
    return cfg.n_layers * 2.0 * cfg.n_heads * 5 * seq * seq * cfg.head_dim


def classifier_flops(cfg: ModelConfig, seq: int, vocab: int | None = None) -> float:
    return 2.0 * (vocab or cfg.vocab_size) * cfg.dim * seq


def lora_flops(cfg: ModelConfig, seq: int, lora: LoraConfig) -> float:
    """Forward FLOPs of the adapters over one sequence."""
    from ..lora import io_dims

    per_layer = sum(lora.rank * sum(io_dims(cfg, t)) for t in lora.targets)
    return 2.0 * seq * per_layer * cfg.n_layers


def training_flops_per_sequence(
    cfg: ModelConfig, seq: int, vocab: int | None = None, lora: LoraConfig | None = None
) -> float:
    """FLOPs of one forward + backward over one sequence of ``seq`` tokens (with ``lora``: a frozen base)."""
    if lora is not None:
        return (
            2 * forward_matmul_flops(cfg, seq)
            + attention_flops(cfg, seq)
            + 2 * classifier_flops(cfg, seq, vocab)
            + 3 * lora_flops(cfg, seq, lora)
        )
    return (
        3 * forward_matmul_flops(cfg, seq) + attention_flops(cfg, seq) + 3 * classifier_flops(cfg, seq, vocab)
    )
