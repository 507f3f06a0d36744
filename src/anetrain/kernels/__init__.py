"""WHAT is computed: the transformer layer as explicit forward, dx and dW kernels.

Every kernel is a pure function over tensors with its shapes in comments. Kernels never choose a device,
a dtype policy, a schedule or a thread: the pipelines (``anetrain.pipeline``) decide when and where each one
runs, and backends may substitute a faster implementation of the same math that tests compare with these.

Layout: activations are token-major, ``[B, S, D]``; per-head tensors are ``[B, H, S, dh]``; weights are
``[out, in]`` so a projection is ``x @ W.T``; a weight gradient sums over all N = B*S tokens.

Per layer, forward::

    attention_forward      xn = RMSNorm(x); q,k,v = xn Wq^T, xn Wk^T, xn Wv^T; [QK-norm]; RoPE(q,k);
                           causal GQA attention
    output_forward         x2 = x + alpha * attn Wo^T
    ffn_forward            xn2 = RMSNorm(x2); h1, h3 = xn2 W1^T, xn2 W3^T; g = silu(h1)*h3;
                           x' = x2 + alpha * g W2^T

and backward (dx on the critical path, dW separately schedulable)::

    ffn_backward_dx        df = alpha dy; dg = df W2; SiLU-gate backward; dxn2 = dh1 W1 + dh3 W3
    rmsnorm_backward       dx2 = dy + RMSNorm'(dxn2)
    output_backward_dx     do = alpha dx2; dattn = do Wo
    attention_backward_dx  softmax backward, GQA reduction, inverse RoPE; dxn = dq Wq + dk Wk + dv Wv
    rmsnorm_backward       dx = dx2 + RMSNorm'(dxn)
    weight_grad            gW += dY^T X for each of the seven projections (and the classifier)

QK-norm (Qwen3: per-head RMSNorm of q and k before RoPE) is ``qk_norm.py``: forward, dx, and the gains' dW.
LoRA (``lora.py``): an adapter u = s x A^T, y += u B^T beside a frozen projection, with its dx (du A) and
dW (gB = dy^T u, gA = du^T x) kernels; a frozen projection's own dW product is simply not formed.
"""

from .attention import (
    AttentionGrads,
    AttentionTaps,
    attention_backward_dx,
    attention_forward,
    causal_attention_backward,
    causal_attention_forward,
    output_backward_dx,
    output_forward,
)
from .classifier import classifier_loss
from .embedding import embedding_backward, embedding_forward
from .ffn import FFNGrads, FFNTaps, ffn_backward_dx, ffn_forward, swiglu_backward, swiglu_forward
from .lora import Adapter, lora_backward_dx, lora_forward, lora_weight_grad
from .norm import rmsnorm_backward, rmsnorm_forward
from .qk_norm import qk_norm_backward_dx, qk_norm_forward, qk_norm_weight_grad
from .rope import Rope, rope_backward, rope_forward
from .weight_grad import scattered_weight_grad, weight_grad

__all__ = [
    "Adapter",
    "AttentionGrads",
    "AttentionTaps",
    "FFNGrads",
    "FFNTaps",
    "Rope",
    "attention_backward_dx",
    "attention_forward",
    "causal_attention_backward",
    "causal_attention_forward",
    "classifier_loss",
    "embedding_backward",
    "embedding_forward",
    "ffn_backward_dx",
    "ffn_forward",
    "lora_backward_dx",
    "lora_forward",
    "lora_weight_grad",
    "output_backward_dx",
    "output_forward",
    "qk_norm_backward_dx",
    "qk_norm_forward",
    "qk_norm_weight_grad",
    "rmsnorm_backward",
    "rmsnorm_forward",
    "rope_backward",
    "rope_forward",
    "scattered_weight_grad",
    "swiglu_backward",
    "swiglu_forward",
    "weight_grad",
]
