"""Token embedding lookup and its backward, each a single indexed operation."""

from __future__ import annotations

import torch


def embedding_forward(tokens: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """x = E[tokens].  tokens: [B, S] (int64); emb: [V, D] -> [B, S, D]."""
    return emb.index_select(0, tokens.reshape(-1)).view(*tokens.shape, emb.shape[1])


def embedding_backward(g_emb: torch.Tensor, tokens: torch.Tensor, dx: torch.Tensor) -> None:
    """g_emb[tokens[n]] += dx[n] for every token n (repeated tokens accumulate).  dx: [B, S, D]."""
    g_emb.index_add_(0, tokens.reshape(-1), dx.reshape(-1, dx.shape[-1]).to(g_emb.dtype))
