"""The same model as plain torch modules with autograd: the yardstick for tests and the benchmark.

Written independently of ``anetrain.kernels`` (RoPE through complex multiplication as llama2.c's original
``model.py`` did, attention through ``F.scaled_dot_product_attention``), so that agreement between the two is
evidence, not tautology. Parameter names equal llama2.c's state-dict names and ``anetrain.params``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .params import ModelParams


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = x.to(torch.promote_types(x.dtype, torch.float32))
        y = xs * torch.rsqrt(xs.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.type_as(x) * self.weight


def rope_complex(seq_len: int, head_dim: int, theta: float) -> torch.Tensor:
    """exp(i * p * theta^(-2j/dh)) for p < seq_len, j < dh/2: complex128 [S, dh/2]."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), freqs)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """x: [B, S, H, dh] with interleaved (real, imag) pairs, rotated by freqs: [S, dh/2]."""
    wide = torch.promote_types(x.dtype, torch.float32)
    xc = torch.view_as_complex(x.to(wide).reshape(*x.shape[:-1], -1, 2).contiguous())
    f = freqs.to(xc.dtype)[None, :, None, :]
    return torch.view_as_real(xc * f).flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.q_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.kv_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.kv_dim, bias=False)
        self.wo = nn.Linear(cfg.q_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, self.n_heads, self.head_dim)
        k = self.wk(x).view(b, s, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(b, s, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, freqs[:s]), apply_rope(k, freqs[:s])
        rep = self.n_heads // self.n_kv_heads  # llama2.c's repeat_kv: head h reads kv head h // rep
        k = k.repeat_interleave(rep, dim=2)
        v = v.repeat_interleave(rep, dim=2)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.alpha = cfg.residual_scale
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        h = x + self.alpha * self.attention(self.attention_norm(x), freqs)
        return h + self.alpha * self.feed_forward(self.ffn_norm(h))


class ReferenceModel(nn.Module):
    """A Llama-2 decoder. ``forward(tokens) -> logits``; ``loss(tokens, targets)`` is mean cross-entropy."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tied_classifier:
            self.output.weight = self.tok_embeddings.weight
        # A plain attribute, not a buffer: Module.to(dtype) would cast a complex buffer to real.
        self.freqs = rope_complex(cfg.seq_len, cfg.head_dim, cfg.rope_theta)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        s = tokens.shape[1]
        if s > self.freqs.shape[0]:
            self.freqs = rope_complex(s, self.cfg.head_dim, self.cfg.rope_theta)
        freqs = self.freqs.to(tokens.device)
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer(x, freqs)
        return self.output(self.norm(x))

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.forward(tokens)
        wide = torch.promote_types(logits.dtype, torch.float32)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).to(wide), targets.reshape(-1))

    # ---- conversion to and from the flat parameter set ----------------------------------------
    @classmethod
    def from_params(cls, params: ModelParams, dtype: torch.dtype | None = None) -> ReferenceModel:
        model = cls(params.cfg).to(dtype or params.flat.dtype)
        model.load_params(params)
        return model

    def load_params(self, params: ModelParams) -> None:
        own = dict(self.named_parameters())
        with torch.no_grad():
            for name, t in params.named():
                own[name].copy_(t)

    def grads_as_dict(self) -> dict[str, torch.Tensor]:
        """Parameter gradients by name (the tied classifier appears once, as the embedding)."""
        return {
            name: (p.grad if p.grad is not None else torch.zeros_like(p))
            for name, p in self.named_parameters()
            if not (self.cfg.tied_classifier and name == "output.weight")
        }
