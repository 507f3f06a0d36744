"""The same model as plain torch modules with autograd: the yardstick for tests and the benchmark.

Written independently of ``anetrain.kernels`` (RoPE through complex multiplication as llama2.c's original
``model.py`` did, attention through ``F.scaled_dot_product_attention``), so that agreement between the two is
evidence, not tautology. Parameter names equal llama2.c's state-dict names and ``anetrain.params``.

QK-norm models get Qwen3's ``q_norm``/``k_norm`` (an RMSNorm over each head before RoPE). With a
:class:`~anetrain.lora.LoraConfig` every adapted projection becomes ``W x + s B A x`` with the base weights
frozen (``requires_grad`` off) and ``lora_A``/``lora_B`` the only trainable tensors, as peft does it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .params import ModelParams

if TYPE_CHECKING:
    from .lora import LoraConfig, LoraParams


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


class LoRALinear(nn.Module):
    """y = x W^T + (alpha/r) (x A^T) B^T, W frozen: peft's LoRA layer, without dropout."""

    def __init__(self, d_in: int, d_out: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_out, d_in), requires_grad=False)
        self.lora_A = nn.Parameter(torch.zeros(rank, d_in))
        self.lora_B = nn.Parameter(torch.zeros(d_out, rank))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight) + self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)


def linear(d_in: int, d_out: int, name: str, lora: LoraConfig | None) -> nn.Module:
    if lora is not None and name in lora.targets:
        return LoRALinear(d_in, d_out, lora.rank, lora.alpha)
    return nn.Linear(d_in, d_out, bias=False)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, lora: LoraConfig | None = None) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = linear(cfg.dim, cfg.q_dim, "wq", lora)
        self.wk = linear(cfg.dim, cfg.kv_dim, "wk", lora)
        self.wv = linear(cfg.dim, cfg.kv_dim, "wv", lora)
        self.wo = linear(cfg.q_dim, cfg.dim, "wo", lora)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, self.n_heads, self.head_dim)
        k = self.wk(x).view(b, s, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(b, s, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:  # Qwen3: per head, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, freqs[:s]), apply_rope(k, freqs[:s])
        rep = self.n_heads // self.n_kv_heads  # llama2.c's repeat_kv: head h reads kv head h // rep
        k = k.repeat_interleave(rep, dim=2)
        v = v.repeat_interleave(rep, dim=2)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig, lora: LoraConfig | None = None) -> None:
        super().__init__()
        self.w1 = linear(cfg.dim, cfg.hidden_dim, "w1", lora)
        self.w2 = linear(cfg.hidden_dim, cfg.dim, "w2", lora)
        self.w3 = linear(cfg.dim, cfg.hidden_dim, "w3", lora)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, lora: LoraConfig | None = None) -> None:
        super().__init__()
        self.alpha = cfg.residual_scale
        self.attention = Attention(cfg, lora)
        self.feed_forward = FeedForward(cfg, lora)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        h = x + self.alpha * self.attention(self.attention_norm(x), freqs)
        return h + self.alpha * self.feed_forward(self.ffn_norm(h))


class ReferenceModel(nn.Module):
    """A Llama-2 decoder. ``forward(tokens) -> logits``; ``loss(tokens, targets)`` is mean cross-entropy."""

    def __init__(self, cfg: ModelConfig, lora: LoraConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg, lora) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tied_classifier:
            self.output.weight = self.tok_embeddings.weight
        if lora is not None:  # only the adapters train
            for name, p in self.named_parameters():
                p.requires_grad_(".lora_" in name)
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

    def loss(
        self, tokens: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mean cross-entropy; with ``mask`` ([B, S] bool), the mean over the targets it selects."""
        logits = self.forward(tokens)
        wide = torch.promote_types(logits.dtype, torch.float32)
        flat = logits.reshape(-1, logits.shape[-1]).to(wide)
        if mask is None:
            return F.cross_entropy(flat, targets.reshape(-1))
        per_token = F.cross_entropy(flat, targets.reshape(-1), reduction="none")
        keep = mask.reshape(-1).to(per_token.dtype)
        return (per_token * keep).sum() / keep.sum().clamp_min(1)

    # ---- conversion to and from the flat parameter set ----------------------------------------
    @classmethod
    def from_params(
        cls, params: ModelParams, dtype: torch.dtype | None = None, lora: LoraParams | None = None
    ) -> ReferenceModel:
        model = cls(params.cfg, lora.lora if lora is not None else None).to(dtype or params.flat.dtype)
        model.load_params(params)
        if lora is not None:
            model.load_params(lora)
        return model

    def load_params(self, params: ModelParams | LoraParams) -> None:
        own = dict(self.named_parameters())
        with torch.no_grad():
            for name, t in params.named():
                own[name].copy_(t)

    def lora_grads(self) -> dict[str, torch.Tensor]:
        """The adapters' gradients by name (a LoRA model)."""
        return {
            name: (p.grad if p.grad is not None else torch.zeros_like(p))
            for name, p in self.named_parameters()
            if ".lora_" in name
        }

    def grads_as_dict(self) -> dict[str, torch.Tensor]:
        """Parameter gradients by name (the tied classifier appears once, as the embedding)."""
        return {
            name: (p.grad if p.grad is not None else torch.zeros_like(p))
            for name, p in self.named_parameters()
            if not (self.cfg.tied_classifier and name == "output.weight") and ".lora_" not in name
        }
