"""The optimizer against torch.optim.AdamW, the LR schedule, clipping and loss scaling."""

from __future__ import annotations

import math

import pytest
import torch

from anetrain.config import make_config
from anetrain.optim import AdamW, DynamicLossScaler, OptimizerConfig, clip_grads, global_grad_norm, lr_at
from anetrain.params import init_params

CFG = make_config(dim=32, hidden_dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, seq_len=16)


@pytest.mark.parametrize("kind", ["adamw", "adam"])
def test_matches_torch_adamw_with_decay_only_on_matrices(kind):
    params = init_params(CFG, seed=0)
    ocfg = OptimizerConfig.for_kind(kind, lr=1e-2)
    opt = AdamW(params, ocfg)
    # torch reference: one tensor per named parameter, decay groups as llama2.c's train.py builds them
    ref = {n: t.clone().requires_grad_() for n, t in params.named()}
    decay = [t for t in ref.values() if t.dim() >= 2]
    no_decay = [t for t in ref.values() if t.dim() < 2]
    torch_opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": ocfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-2,
        betas=(ocfg.beta1, ocfg.beta2),
        eps=ocfg.eps,
    )
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        grads = params.like()
        grads.flat.copy_(torch.randn(grads.flat.shape, generator=g))
        for n, t in ref.items():
            t.grad = grads[n].clone()
        opt.step(grads, 1e-2)
        torch_opt.step()
    for n, t in ref.items():
        torch.testing.assert_close(params[n], t.detach(), rtol=1e-6, atol=1e-7, msg=n)
    assert opt.state.t == 5


def test_schedule_warmup_then_cosine_to_min_lr():
    c = OptimizerConfig.for_kind("adamw", lr=1e-3, warmup=10, total_steps=110)
    assert lr_at(0, c) == pytest.approx(1e-4)  # first step runs at lr/warmup, not 0
    assert lr_at(9, c) == pytest.approx(1e-3)
    assert lr_at(10, c) == pytest.approx(1e-3)
    assert lr_at(60, c) == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi * 0.505)) * 9e-4, rel=1e-3)
    assert lr_at(109, c) == pytest.approx(1e-4)  # default min_lr = lr / 10
    assert lr_at(5, OptimizerConfig.for_kind("adam", lr=2e-4)) == 2e-4


def test_clipping_scales_to_the_threshold():
    grads = init_params(CFG).like()
    grads.flat.fill_(1.0)
    norm = global_grad_norm(grads)
    assert norm == pytest.approx(math.sqrt(grads.numel()), rel=1e-6)
    clip_grads(grads, 1.0, norm)
    assert global_grad_norm(grads) == pytest.approx(1.0, rel=1e-5)


def test_loss_scaler_backs_off_skips_and_grows():
    s = DynamicLossScaler(init_scale=1024, growth_interval=2)
    assert not s.update(False) and s.scale == 512 and s.skipped == 1
    assert s.update(True) and s.scale == 512
    assert s.update(True) and s.scale == 1024


def test_grad_divisor_equals_dividing_the_gradients_first():
    """Loss-scale removal and clipping ride inside the fused update: step(g, lr, d) == step(g / d, lr)."""
    a, b = init_params(CFG, seed=1), init_params(CFG, seed=1)
    oa, ob = AdamW(a, OptimizerConfig()), AdamW(b, OptimizerConfig())
    g = a.like()
    g.flat.copy_(torch.randn(g.flat.shape, generator=torch.Generator().manual_seed(2)))
    g2 = a.like()
    g2.flat.copy_(g.flat / 7.5)
    oa.step(g, 1e-3, grad_divisor=7.5)
    ob.step(g2, 1e-3)
    torch.testing.assert_close(g.flat, g2.flat)  # the divided values are left in the gradients
    torch.testing.assert_close(a.flat, b.flat, rtol=1e-6, atol=1e-9)
