"""The forward pass for generation in torch operators: rows of (token, stream, position), a key/value cache.

This is the decoder for what the native one (``native.py``) does not run: float64, CUDA, machines without a C
compiler. It computes what ``native/decode.c`` computes, with the training kernels' math
(``anetrain.kernels``: RMSNorm, interleaved RoPE):

    per layer, rows r = (token t_r, stream s_r, position p_r), all fed at once (a prompt, or N streams):
        xn = rmsnorm(x) g_att;  q, k, v = lin(Wq, xn), lin(Wk, xn), lin(Wv, xn);  RoPE(q, k) at p_r
        cache[s_r, p_r] = k, v                         (every row's, before any row attends)
        per query head h (kv head j = h // R):
            o_h = softmax(q_h K_j[s_r, :p_r+1]^T / sqrt(dh)) V_j[s_r, :p_r+1]
        x += lin(Wo, o);  xn = rmsnorm(x) g_ffn;  x += lin(W2, silu(lin(W1, xn)) * lin(W3, xn))
    logits = lin(Wcls, rmsnorm(x) g_final) for the rows asked for.

``lin`` by precision: fp32/fp64 ``x W^T``; bf16 ``x`` rounded to bfloat16 times the bfloat16 ``W``, summed in
float32; int8 ``x`` quantized per group as runq.c does (``quant.quantize_rows``), the integer dot product of
each group (exact), times both scales. The cache, norms and attention are float32 (float64 for fp64).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import AnetrainError
from ..kernels import Rope, rmsnorm_forward, rope_forward
from .quant import q8_linear
from .sampling import XorShiftRng, sample_logits
from .weights import DecodeWeights, Matrix


def linear(m: Matrix, x: torch.Tensor, group_size: int) -> torch.Tensor:
    """x [R, in] times m^T -> [R, out] in x's dtype, in m's precision (module docstring)."""
    if m.w.dtype == torch.int8:
        assert m.s is not None
        return q8_linear(x, m.w, m.s, group_size)
    if m.w.dtype == torch.bfloat16:
        return F.linear(x.to(torch.bfloat16), m.w).to(x.dtype)
    return F.linear(x, m.w)


class TorchDecoder:
    """A batch of ``n_streams`` streams with a cache of ``cache_len`` positions each, in torch operators."""

    backend = "torch"

    def __init__(
        self,
        weights: DecodeWeights,
        n_streams: int = 1,
        cache_len: int | None = None,
        threads: int | None = None,
    ) -> None:
        cfg = weights.cfg
        self.weights, self.cfg, self.dtype = weights, cfg, weights.dtype
        self.n_streams = n_streams
        self.cache_len = min(cache_len or cfg.seq_len, cfg.seq_len)
        self.device = weights.device
        self.threads = threads or torch.get_num_threads()
        self.description = f"torch operators ({self.device.type})"
        self.act = torch.float64 if weights.dtype == "fp64" else torch.float32
        self.rope = Rope.build(
            self.cache_len, cfg.head_dim, cfg.rope_theta, dtype=self.act, device=self.device
        )
        shape = (cfg.n_layers, n_streams, self.cache_len, cfg.n_kv_heads, cfg.head_dim)
        self.keys = torch.zeros(shape, dtype=self.act, device=self.device)  # after RoPE
        self.values = torch.zeros(shape, dtype=self.act, device=self.device)
        self.scale = 1.0 / math.sqrt(cfg.head_dim)

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        e = self.weights.embedding
        rows = e.w[tokens]  # [R, D]
        if e.s is not None:  # Q8_0: dequantize the looked-up rows only
            gs = self.weights.group_size
            return (rows.to(self.act).view(len(tokens), -1, gs) * e.s[tokens][:, :, None]).flatten(1)
        return rows.to(self.act)

    @torch.inference_mode()
    def forward(
        self,
        tokens: Sequence[int],
        streams: Sequence[int],
        positions: Sequence[int],
        logit_rows: Sequence[int] = (),
    ) -> np.ndarray:
        """Feed rows (token, stream, position) in order; logits [len(logit_rows), V] of the rows asked for
        (float32; float64 for fp64 weights)."""
        return self.forward_tensor(tokens, streams, positions, logit_rows).cpu().numpy()

    @torch.inference_mode()
    def forward_tensor(
        self,
        tokens: Sequence[int],
        streams: Sequence[int],
        positions: Sequence[int],
        logit_rows: Sequence[int] = (),
    ) -> torch.Tensor:
        cfg, w, dev = self.cfg, self.weights, self.device
        n = len(tokens)
        if not n == len(streams) == len(positions):
            raise ValueError("tokens, streams and positions differ in length")
        if n == 0:
            return torch.zeros(0, cfg.vocab_size, dtype=self.act, device=dev)
        if max(positions) >= self.cache_len:
            raise AnetrainError(f"the context is full: position {max(positions)} >= {self.cache_len}")
        bad = [t for t in tokens if not 0 <= t < cfg.vocab_size]
        if bad:
            raise AnetrainError(f"token {bad[0]} is outside the model's vocabulary (0..{cfg.vocab_size - 1})")
        h, hkv, dh, gs = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, w.group_size
        tok = torch.tensor(list(tokens), device=dev)
        st = torch.tensor(list(streams), device=dev)
        ps = torch.tensor(list(positions), device=dev)
        t_len = int(max(positions)) + 1
        cos, sin = self.rope.cos[ps], self.rope.sin[ps]  # [R, dh/2]: row r at its own position
        future = torch.arange(t_len, device=dev)[None, :] > ps[:, None]  # [R, T]: positions a row cannot see
        x = self._embed(tok)  # [R, D]
        for layer, lw in enumerate(w.layers):
            xn, _ = rmsnorm_forward(x, w.attention_norm[layer], cfg.norm_eps)  # [R, D]
            q = rope_forward(linear(lw.wq, xn, gs).view(1, n, h, dh), cos, sin)[0]  # [R, H, dh]
            k = rope_forward(linear(lw.wk, xn, gs).view(1, n, hkv, dh), cos, sin)[0]  # [R, Hkv, dh]
            self.keys[layer, st, ps] = k
            self.values[layer, st, ps] = linear(lw.wv, xn, gs).view(n, hkv, dh)
            keys = self.keys[layer, st, :t_len].transpose(1, 2)  # [R, Hkv, T, dh]
            values = self.values[layer, st, :t_len].transpose(1, 2)
            qg = q.view(n, hkv, h // hkv, dh)  # [R, Hkv, G, dh]: query head j*G + g reads kv head j
            scores = (qg @ keys.transpose(2, 3)) * self.scale  # [R, Hkv, G, T]
            scores = scores.masked_fill(future[:, None, None, :], float("-inf"))
            o = (torch.softmax(scores, dim=-1) @ values).reshape(n, h * dh)  # [R, Dq], heads in order
            x = x + linear(lw.wo, o, gs)
            xn, _ = rmsnorm_forward(x, w.ffn_norm[layer], cfg.norm_eps)
            x = x + linear(lw.w2, F.silu(linear(lw.w1, xn, gs)) * linear(lw.w3, xn, gs), gs)
        if len(logit_rows) == 0:
            return torch.zeros(0, cfg.vocab_size, dtype=self.act, device=dev)
        xf, _ = rmsnorm_forward(x[list(logit_rows)], w.final_norm, cfg.norm_eps)
        return linear(w.classifier, xf, gs)  # [len(logit_rows), V]

    def sample(
        self,
        logits: np.ndarray,
        streams: Sequence[int],
        temperature: float,
        top_p: float,
        top_k: int,
        states: np.ndarray,
    ) -> list[int]:
        """One token per row of ``logits`` [R, V], row r with stream streams[r]'s generator in ``states``."""
        out = []
        for row, s in zip(logits, streams, strict=True):
            rng = XorShiftRng(int(states[s]))
            out.append(sample_logits(row, temperature, top_p, top_k, rng))
            states[s] = rng.state
        return out

    def decode(
        self,
        tokens: Sequence[int],
        streams: Sequence[int],
        positions: Sequence[int],
        temperature: float,
        top_p: float,
        top_k: int,
        states: np.ndarray,
    ) -> list[int]:
        """Feed one token per stream and sample each stream's next token."""
        logits = self.forward(tokens, streams, positions, range(len(tokens)))
        return self.sample(logits, streams, temperature, top_p, top_k, states)

    def copy_stream(self, src: int, dst: int, n_pos: int) -> None:
        self.keys[:, dst, :n_pos] = self.keys[:, src, :n_pos]
        self.values[:, dst, :n_pos] = self.values[:, src, :n_pos]
