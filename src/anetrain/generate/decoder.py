"""One-token-at-a-time forward pass with a key/value cache, for text generation.

Per layer it keeps the keys (after RoPE) and values of every past position in preallocated buffers
``[Hkv, S, dh]``, so feeding the token at position ``pos`` costs the projections of one token plus
attention over ``pos + 1`` cached rows, whatever ``pos`` is (no recomputation of the past). The math is
the training kernels' (``anetrain.kernels``: RMSNorm, interleaved RoPE, the output projection and the
SwiGLU block with the residual scale alpha on both branches); only the attention of one query over the
cache is written here:

    per query head h, with kv head j = h // R (R = H / Hkv):
        att_h = softmax(q_h K_j[:pos+1]^T / sqrt(dh));   out_h = att_h V_j[:pos+1]

then the final RMSNorm and the classifier (the embedding when tied).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import AnetrainError
from ..kernels import Rope, ffn_forward, output_forward, qk_norm_forward, rmsnorm_forward, rope_forward
from ..kernels.norm import stat_dtype
from ..params import ModelParams


class KVCacheDecoder:
    """Feeds tokens one position at a time; :meth:`step` returns the logits for the next token."""

    def __init__(
        self, params: ModelParams, dtype: torch.dtype = torch.float32, positions: int | None = None
    ) -> None:
        """``positions``: the most positions that will be fed (default the model's seq_len; a 40,960-token
        Qwen3 context would need a 9 GB cache)."""
        self.params = params if params.flat.dtype == dtype else params.to(dtype=dtype)
        self.cfg = cfg = params.cfg
        self.dtype = dtype
        device = self.params.flat.device
        self.positions = n = min(cfg.seq_len, positions or cfg.seq_len)
        self.rope = Rope.build(n, cfg.head_dim, cfg.rope_theta, dtype=dtype, device=device)
        shape = (cfg.n_layers, cfg.n_kv_heads, n, cfg.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)  # after RoPE
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        self.pos = 0

    def reset(self) -> None:
        """Start a new sequence (the cache is overwritten as positions are fed again)."""
        self.pos = 0

    @torch.inference_mode()
    def step(self, token: int, logits: bool = True) -> torch.Tensor | None:
        """Feed ``token`` at the next position; the logits [V] for the token after it (None if not asked)."""
        cfg, p, pos = self.cfg, self.params, self.pos
        if pos >= self.positions:
            raise AnetrainError(
                f"the context is full: {self.positions} positions (the model's seq_len is {cfg.seq_len})"
            )
        if not 0 <= token < cfg.vocab_size:
            raise AnetrainError(f"token {token} is outside the model's vocabulary (0..{cfg.vocab_size - 1})")
        h, hkv, dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        acc = stat_dtype(self.dtype)
        cos, sin = self.rope.cos[pos : pos + 1], self.rope.sin[pos : pos + 1]  # [1, dh/2]
        x = p.embedding[token].view(1, 1, cfg.dim)  # [B=1, S=1, D]
        for layer, w in enumerate(p.layers):
            xn, _ = rmsnorm_forward(x, w.attention_norm, cfg.norm_eps)  # [1, 1, D]
            q = F.linear(xn, w.wq).view(1, 1, h, dh)  # [1, 1, H, dh]
            k = F.linear(xn, w.wk).view(1, 1, hkv, dh)  # [1, 1, Hkv, dh]
            if w.q_norm is not None and w.k_norm is not None:  # QK-norm (Qwen3): each head, before RoPE
                q, k = (
                    qk_norm_forward(q, w.q_norm, cfg.norm_eps)[0],
                    qk_norm_forward(k, w.k_norm, cfg.norm_eps)[0],
                )
            q, k = rope_forward(q, cos, sin), rope_forward(k, cos, sin)
            self.keys[layer, :, pos] = k.view(hkv, dh)
            self.values[layer, :, pos] = F.linear(xn, w.wv).view(hkv, dh)
            keys = self.keys[layer, :, : pos + 1]  # [Hkv, T, dh]
            values = self.values[layer, :, : pos + 1]
            qg = q.view(hkv, h // hkv, dh)  # [Hkv, R, dh]: query head j*R + r reads kv head j
            scores = (qg @ keys.transpose(1, 2)).to(acc) * self.scale  # [Hkv, R, T]
            att = torch.softmax(scores, dim=-1).to(self.dtype)
            attn = (att @ values).reshape(1, 1, h * dh)  # [1, 1, Dq], heads in order
            x = output_forward(x, attn, w.wo, cfg.residual_scale)
            x, _ = ffn_forward(x, w.ffn_norm, w.w1, w.w2, w.w3, cfg.residual_scale, cfg.norm_eps)
        self.pos = pos + 1
        if not logits:
            return None
        xf, _ = rmsnorm_forward(x, p.final_norm, cfg.norm_eps)
        return F.linear(xf.view(cfg.dim), p.classifier)  # [V]
