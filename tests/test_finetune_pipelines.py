"""QK-norm and LoRA in the optimized pipeline: the same losses and gradients as the baseline (which the parity
suite checks against autograd), loss masks, gradient accumulation, and the frozen base staying frozen."""

from __future__ import annotations

import pytest
import torch

from anetrain.config import make_config
from anetrain.lora import LoraConfig, init_lora
from anetrain.params import init_params
from anetrain.pipeline.baseline import BaselinePipeline
from anetrain.pipeline.optimized import OptimizedPipeline
from helpers.pipelines import rel, windows

QWEN = make_config(
    dim=64,
    hidden_dim=96,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=24,
    vocab_size=96,
    seq_len=32,
    rope_theta=1e6,
    norm_eps=1e-6,
    qk_norm=True,
)


def base_params(cfg, seed=1):
    p = init_params(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed)
    p.no_decay.copy_(1 + 0.3 * torch.randn(p.no_decay.shape, generator=g))
    return p


def adapters(cfg, lc, seed=3):
    ad = init_lora(cfg, lc, seed=seed)
    g = torch.Generator().manual_seed(seed)
    for s in ad.specs:
        if s.name.endswith("lora_B"):
            ad.tensors[s.name].normal_(0.0, 0.05, generator=g)
    return ad


def masks(n, batch=3, seq=24, seed=9):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(batch, seq, generator=g) < 0.5 for _ in range(n)]


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("dtype,tol", [("fp32", 1e-5), ("bf16", 2e-2)])
def test_qk_norm_full_finetuning_matches_the_baseline(tied, dtype, tol):
    cfg = QWEN.with_(tied_classifier=tied)
    p = base_params(cfg)
    (w,) = windows(cfg, 1)
    (m,) = masks(1)
    for mask in (None, m):
        base = BaselinePipeline(p.clone())
        opt = OptimizedPipeline(p.clone(), dtype=dtype, dw="serial")
        lb, lo = base.forward_backward(w, 0.5, loss_mask=mask), opt.forward_backward(w, 0.5, loss_mask=mask)
        assert opt.loss(w, loss_mask=mask) == pytest.approx(lo, rel=1e-6)
        opt.close()
        assert abs(lb - lo) / lb < (1e-6 if dtype == "fp32" else 3e-3)
        for name in base.grads.tensors:
            assert rel(opt.grads[name], base.grads[name]) < tol, name


@pytest.mark.parametrize(("qk_norm", "targets"), [(True, "all"), (True, "wq,wv"), (False, "wo,w3,w2")])
@pytest.mark.parametrize("dtype,tol", [("fp32", 1e-5), ("bf16", 3e-2)])
def test_lora_matches_the_baseline(qk_norm, targets, dtype, tol):
    """Adapter gradients equal the baseline's (fp32: to rounding; bf16: within 3%), with and without a loss
    mask, over two accumulated micro-steps after zero_grad (the first overwrites, the second adds)."""
    from anetrain.lora import parse_targets

    cfg = QWEN.with_(qk_norm=qk_norm, residual_scale=0.8)
    lc = LoraConfig(4, 8.0, parse_targets(targets))
    p, ad = base_params(cfg), adapters(cfg, lc)
    ws, ms = windows(cfg, 2), masks(2)
    base = BaselinePipeline(p.clone(), lora=ad.clone())
    opt = OptimizedPipeline(p.clone(), lora=ad.clone(), dtype=dtype, dw="serial")
    for pipe in (base, opt):
        pipe.zero_grad()
        losses = [pipe.forward_backward(w, 0.5, loss_mask=m) for w, m in zip(ws, (None, ms[1]), strict=True)]
        pipe.losses = losses
    opt.close()
    for a, b in zip(base.losses, opt.losses, strict=True):
        assert abs(a - b) / a < (1e-6 if dtype == "fp32" else 3e-3)
    assert set(opt.grads.tensors) == set(base.grads.tensors)
    for name in base.grads.tensors:
        assert rel(opt.grads[name], base.grads[name]) < tol, name


def test_lora_keeps_the_base_frozen_in_16_bits_and_trains_only_the_adapters():
    from anetrain.optim import AdamW, OptimizerConfig

    cfg = QWEN
    lc = LoraConfig(4, 8.0)
    p = base_params(cfg)
    before = p.clone()
    pipe = OptimizedPipeline(p.to(torch.bfloat16), lora=init_lora(cfg, lc), dtype="bf16", dw="serial")
    assert pipe.w.flat.dtype == torch.bfloat16 and pipe.params.flat.dtype == torch.float32
    assert (
        pipe.grads.numel()
        == pipe.params.numel()
        == cfg.n_layers
        * 4
        * (
            3 * cfg.dim
            + cfg.q_dim
            + 2 * cfg.kv_dim
            + cfg.q_dim
            + cfg.dim
            + 2 * cfg.dim
            + 2 * cfg.hidden_dim
            + cfg.hidden_dim
            + cfg.dim
        )
    )
    opt = AdamW(pipe.params, OptimizerConfig.for_kind("adamw", lr=1e-2, warmup=0, total_steps=10))
    assert opt.state.m.numel() == pipe.params.numel()  # no optimizer state for the base
    frozen = pipe.w.flat.clone()
    ws = windows(cfg, 6, seed=4)
    losses = []
    for w in ws:
        pipe.zero_grad()
        losses.append(pipe.forward_backward(w))
        opt.step(pipe.grads, 1e-2)
        pipe.after_update()
    pipe.close()
    assert torch.equal(pipe.w.flat, frozen)  # the base never changes
    assert torch.equal(p.flat, before.flat)
    assert losses[-1] < losses[0]


def test_lora_threaded_dw_equals_serial():
    cfg = QWEN
    lc = LoraConfig(4, 8.0)
    p, ad = base_params(cfg), adapters(cfg, lc)
    ws = windows(cfg, 3)
    a = OptimizedPipeline(p.clone(), lora=ad.clone(), dtype="bf16", dw="serial")
    b = OptimizedPipeline(p.clone(), lora=ad.clone(), dtype="bf16", dw="thread")
    for pipe in (a, b):
        pipe.zero_grad()
        for w in ws:
            pipe.forward_backward(w, 1 / 3)
        pipe.close()
    assert torch.equal(a.grads.flat, b.grads.flat)


def test_gradient_buckets_of_adapters_are_announced_per_layer():
    cfg = QWEN
    lc = LoraConfig(4, 8.0)
    for cls, kw in ((BaselinePipeline, {}), (OptimizedPipeline, {"dtype": "fp32", "dw": "serial"})):
        pipe = cls(base_params(cfg), lora=adapters(cfg, lc), **kw)
        seen: list[tuple[int, int, float]] = []

        def hook(t, seen=seen):
            seen.append((t.data_ptr(), t.numel(), t.abs().sum().item()))

        pipe.grad_ready_hook = hook
        pipe.zero_grad()
        pipe.forward_backward(windows(cfg, 1)[0])
        pipe.close()
        assert len(seen) == cfg.n_layers and sum(n for _, n, _ in seen) == pipe.grads.numel()
        assert all(total > 0 for _, _, total in seen)


def test_weighted_cross_entropy_compiled_equals_hand_fused():
    """The compiled fusion's masked cross-entropy (the one compiled kernel fine-tuning adds; QK-norm and
    LoRA run hand-fused code in both fusions) against the hand-fused one."""
    from anetrain.backends import compiled, fused
    from anetrain.backends.compiled import available

    ok, why = available(torch.device("cpu"))
    if not ok:
        pytest.skip(f"torch.compile cannot run here: {why}")
    g = torch.Generator().manual_seed(0)
    c, v = 8, 40
    logits = torch.randn(c, v, generator=g).to(torch.bfloat16)
    targets = torch.randint(0, v, (c,), generator=g)
    weights = (torch.rand(c, generator=g) < 0.5).float()
    a, loss_a = logits.clone(), torch.zeros(())
    compiled.weighted_cross_entropy_chunk(a, loss_a, targets, torch.tensor(0.25), weights)
    b, loss_b = logits.clone(), torch.zeros(())
    fused.cross_entropy_chunk_into(
        b,
        loss_b,
        b,
        targets,
        0.25,
        torch.empty(c, v),
        torch.empty(c, 1),
        torch.empty(()),
        torch.empty(c, dtype=torch.long),
        torch.arange(c) * v,
        torch.full((c,), -1.0),
        weights,
    )
    ref = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
    assert float(loss_a) == pytest.approx(float((ref * weights).sum()), rel=1e-5)
    assert float(loss_b) == pytest.approx(float((ref * weights).sum()), rel=1e-5)
    torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=1e-2)
    assert not a[weights == 0].any()
