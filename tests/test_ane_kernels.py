"""Every ANE kernel program, executed by the simulator from its MIL text, against anetrain.kernels.

Three model shapes (MHA with padded head_dim 16 and seq 24; stories260K's GQA with head_dim 8 and hidden 172;
GQA with head_dim 32 != dim/heads) in both input conventions. The reference is anetrain.kernels in float64
on the same fp16-rounded inputs; the simulator holds fp16 values and accumulates matmuls in fp32.

Tolerance: relative Frobenius error <= 1.2e-3 for every output. fp16 has a unit roundoff of 2^-11 = 4.9e-4;
each output is the end of a short chain of rounded ops (attention: projection, RoPE, scores, softmax,
P V). Measured: 2.1e-4 (single GEMMs) to 8.3e-4 (dK, dQ after the two-part attention backward).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

from anetrain import kernels as K
from anetrain.ane.programs import KernelSet, build_kernel_set
from anetrain.ane.sim import SimExecutor
from anetrain.ane.surfaces import Staging, read_operand
from anetrain.config import ModelConfig, make_config

TOL = 1.2e-3

CASES = {
    "mha": dict(dim=64, hidden_dim=80, n_layers=1, n_heads=4, n_kv_heads=4, vocab_size=96, seq_len=24),
    "gqa-260K": dict(dim=64, hidden_dim=172, n_layers=1, n_heads=8, n_kv_heads=4, vocab_size=96, seq_len=40),
    "gqa-hd32": dict(
        dim=64, hidden_dim=128, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=32, vocab_size=96, seq_len=32
    ),
}
CONVENTIONS = ("separate", "packed")


def config(case: str) -> ModelConfig:
    return make_config(**CASES[case], residual_scale="deepnet", name=case)


@functools.cache
def kernel_set(case: str, inputs: str) -> KernelSet:
    return build_kernel_set(config(case), "m4", inputs, extras=True, programs="anetrain")


EXECUTOR = SimExecutor()


def run(ks: KernelSet, name: str, **operands: np.ndarray) -> dict[str, np.ndarray]:
    """Stage logical operands (activations token-major [S, C], weights [out, in]), run, return [S, C]."""
    prog = ks[name]
    st = Staging(prog)
    for k, v in operands.items():
        kind_act = v.ndim == 2 and prog.in_placements[k].cols.name == "seq"
        st.write(k, v.T if kind_act else v)
    out = EXECUTOR.run(prog, st.arrays)
    return {k: read_operand(prog, out, k).T for k in prog.out_placements}


def rnd(gen: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    """Random values that are exact in fp16 (so the reference sees the ANE's inputs)."""
    return (gen.standard_normal(shape) * scale).astype(np.float16).astype(np.float64)


def t64(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))


def rel(a: np.ndarray, ref: torch.Tensor | np.ndarray) -> float:
    r = np.asarray(ref, dtype=np.float64)
    return float(np.linalg.norm(np.asarray(a, dtype=np.float64) - r) / np.linalg.norm(r))


def check(got: dict[str, np.ndarray], want: dict[str, torch.Tensor | np.ndarray]) -> None:
    for k, ref in want.items():
        assert got[k].shape == tuple(ref.shape), k
        err = rel(got[k], ref)
        assert err <= TOL, f"{k}: relative error {err:.2e} > {TOL}"


params = pytest.mark.parametrize("inputs", CONVENTIONS)
cases = pytest.mark.parametrize("case", list(CASES))


def attention_inputs(cfg: ModelConfig, gen: np.random.Generator) -> dict[str, np.ndarray]:
    s, d = cfg.seq_len, cfg.dim
    return dict(
        xn=rnd(gen, s, d),
        wq=rnd(gen, cfg.q_dim, d, scale=d**-0.5),
        wk=rnd(gen, cfg.kv_dim, d, scale=d**-0.5),
        wv=rnd(gen, cfg.kv_dim, d, scale=d**-0.5),
    )


def reference_qkv(cfg: ModelConfig, op: dict[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
    """q, k (after RoPE), v per head: [1, H or Hkv, S, dh], from the kernels' own RoPE."""
    s, dh = cfg.seq_len, cfg.head_dim
    rope = K.Rope.build(s, dh, cfg.rope_theta, torch.float64)
    xn = t64(op["xn"])[None]
    q = (xn @ t64(op["wq"]).T).view(1, s, cfg.n_heads, dh)
    k = (xn @ t64(op["wk"]).T).view(1, s, cfg.n_kv_heads, dh)
    v = (xn @ t64(op["wv"]).T).view(1, s, cfg.n_kv_heads, dh)
    q = K.rope_forward(q, rope.cos, rope.sin).transpose(1, 2)
    k = K.rope_forward(k, rope.cos, rope.sin).transpose(1, 2)
    return q, k, v.transpose(1, 2), rope


def token_major(x: torch.Tensor) -> torch.Tensor:
    """[1, H, S, dh] -> [S, H*dh]."""
    return x[0].transpose(0, 1).reshape(x.shape[2], -1)


@cases
@params
def test_sdpa_fwd(case: str, inputs: str) -> None:
    cfg = config(case)
    gen = np.random.default_rng(1)
    op = attention_inputs(cfg, gen)
    q, k, v, _ = reference_qkv(cfg, op)
    out, _ = K.causal_attention_forward(q, k, v)
    got = run(kernel_set(case, inputs), "sdpa_fwd", **op)
    check(
        got,
        {"attn": token_major(out), "q_rope": token_major(q), "k_rope": token_major(k), "v": token_major(v)},
    )


@cases
@params
def test_attention_backward_pair(case: str, inputs: str) -> None:
    """sdpa_bwd1 then sdpa_bwd2 (P and dP passed through the host) give dq, dk, dv of the kernels."""
    cfg = config(case)
    gen = np.random.default_rng(2)
    q, k, v, rope = reference_qkv(cfg, attention_inputs(cfg, gen))
    q, k, v = (t64(token_major(t).numpy().astype(np.float16).astype(np.float64)) for t in (q, k, v))
    s, dh = cfg.seq_len, cfg.head_dim
    dattn = rnd(gen, s, cfg.q_dim)
    heads = lambda t, n: t.view(1, s, n, dh).transpose(1, 2)  # noqa: E731
    qh, kh, vh = heads(q, cfg.n_heads), heads(k, cfg.n_kv_heads), heads(v, cfg.n_kv_heads)
    _, lse = K.causal_attention_forward(qh, kh, vh)
    dq, dk, dv = K.causal_attention_backward(heads(t64(dattn), cfg.n_heads), qh, kh, vh, lse)
    dq = K.rope_backward(dq.transpose(1, 2), rope.cos, rope.sin).reshape(s, -1)
    dk = K.rope_backward(dk.transpose(1, 2), rope.cos, rope.sin).reshape(s, -1)
    ks = kernel_set(case, inputs)
    b1 = run(ks, "sdpa_bwd1", q_rope=q.numpy(), k_rope=k.numpy(), v=v.numpy(), dattn=dattn)
    check(b1, {"dv": token_major(dv)})
    b2 = run(ks, "sdpa_bwd2", p=b1["p"], dp=b1["dp"], q_rope=q.numpy(), k_rope=k.numpy())
    check(b2, {"dq": dq, "dk": dk})


@cases
@params
def test_projections(case: str, inputs: str) -> None:
    """wo_fwd, wot_bwd, q_bwd, kv_bwd, ffn_bwd_w2t, ffn_bwd_w13t: one GEMM (or two) each."""
    cfg = config(case)
    gen = np.random.default_rng(3)
    s, d, f = cfg.seq_len, cfg.dim, cfg.hidden_dim
    wo, wq = rnd(gen, d, cfg.q_dim, scale=0.1), rnd(gen, cfg.q_dim, d, scale=0.1)
    wk, wv = rnd(gen, cfg.kv_dim, d, scale=0.1), rnd(gen, cfg.kv_dim, d, scale=0.1)
    w1, w2, w3 = rnd(gen, f, d, scale=0.1), rnd(gen, d, f, scale=0.1), rnd(gen, f, d, scale=0.1)
    attn, dx2 = rnd(gen, s, cfg.q_dim), rnd(gen, s, d)
    dq, dk, dv = rnd(gen, s, cfg.q_dim), rnd(gen, s, cfg.kv_dim), rnd(gen, s, cfg.kv_dim)
    dh1, dh3 = rnd(gen, s, f), rnd(gen, s, f)
    ks = kernel_set(case, inputs)
    zeros = torch.zeros(s, d, dtype=torch.float64)
    check(run(ks, "wo_fwd", attn=attn, wo=wo), {"o": K.output_forward(zeros, t64(attn), t64(wo), 1.0)})
    check(run(ks, "wot_bwd", do=dx2, wo=wo), {"dattn": K.output_backward_dx(t64(dx2), t64(wo), 1.0)[0]})
    check(run(ks, "q_bwd", dq=dq, wq=wq), {"dx": t64(dq) @ t64(wq)})
    check(run(ks, "kv_bwd", dk=dk, dv=dv, wk=wk, wv=wv), {"dx": t64(dk) @ t64(wk) + t64(dv) @ t64(wv)})
    check(run(ks, "ffn_bwd_w2t", dffn=dx2, w2=w2), {"dg": t64(dx2) @ t64(w2)})
    check(
        run(ks, "ffn_bwd_w13t", dh1=dh1, dh3=dh3, w1=w1, w3=w3),
        {"dxn2": t64(dh1) @ t64(w1) + t64(dh3) @ t64(w3)},
    )


@cases
@params
def test_ffn_fused(case: str, inputs: str) -> None:
    """h1, h3, g = silu(h1) h3 (the kernels' swiglu_forward) and x' = x2 + alpha g W2^T."""
    cfg = config(case)
    gen = np.random.default_rng(4)
    s, d, f = cfg.seq_len, cfg.dim, cfg.hidden_dim
    x2, xn2 = rnd(gen, s, d), rnd(gen, s, d)
    w1, w2, w3 = rnd(gen, f, d, scale=d**-0.5), rnd(gen, d, f, scale=f**-0.5), rnd(gen, f, d, scale=d**-0.5)
    h1, h3 = t64(xn2) @ t64(w1).T, t64(xn2) @ t64(w3).T
    gate = K.swiglu_forward(h1, h3)
    x_next = t64(x2) + cfg.residual_scale * (gate @ t64(w2).T)
    got = run(kernel_set(case, inputs), "ffn_fused", xn2=xn2, x2=x2, w1=w1, w2=w2, w3=w3)
    check(got, {"h1": h1, "h3": h3, "g": gate, "x_next": x_next})


@cases
@params
def test_extras(case: str, inputs: str) -> None:
    """rmsnorm, rmsnorm_bwd, classifier and softmax against the kernels' RMSNorm and plain math."""
    cfg = config(case)
    gen = np.random.default_rng(5)
    s, d, v = cfg.seq_len, cfg.dim, cfg.vocab_size
    x, dy = rnd(gen, s, d, scale=3.0), rnd(gen, s, d)
    g = (1 + 0.3 * gen.standard_normal(d)).astype(np.float16).astype(np.float64)
    w = rnd(gen, v, d, scale=0.1)
    logits = rnd(gen, s, v, scale=2.0)
    ks = kernel_set(case, inputs)
    y, rstd = K.rmsnorm_forward(t64(x), t64(g), cfg.norm_eps)
    check(run(ks, "rmsnorm", xin=x, g=g), {"y": y})
    dx, _ = K.rmsnorm_backward(t64(dy), t64(x), rstd, t64(g))
    check(run(ks, "rmsnorm_bwd", dy=dy, xin=x, g=g), {"dx": dx})
    check(run(ks, "classifier", xf=x, wcls=w), {"logits": t64(x) @ t64(w).T})
    check(run(ks, "softmax", logits=logits), {"probs": torch.softmax(t64(logits), dim=-1)})


def test_causal_mask_blocks_the_future() -> None:
    """Changing a later token's inputs never changes an earlier token's attention output."""
    cfg = config("gqa-260K")
    gen = np.random.default_rng(6)
    op = attention_inputs(cfg, gen)
    ks = kernel_set("gqa-260K", "separate")
    a = run(ks, "sdpa_fwd", **op)["attn"]
    op["xn"][20:] = rnd(gen, cfg.seq_len - 20, cfg.dim)
    b = run(ks, "sdpa_fwd", **op)["attn"]
    assert np.array_equal(a[:20], b[:20])
    assert not np.allclose(a[20:], b[20:])
    assert math.isfinite(float(np.abs(b).max()))
