"""The optimized pipeline's test fixtures: small configs, windows, a few training steps done by a pipeline and
by the reference model, and the allocations a function makes."""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from anetrain.config import make_config
from anetrain.optim import AdamW, OptimizerConfig, clip_grads, global_grad_norm
from anetrain.reference import ReferenceModel

# GQA (8 query heads on 4 kv heads), a hidden size that is not a multiple of anything nice, alpha != 1
CFG = make_config(
    dim=64,
    hidden_dim=172,
    n_layers=2,
    n_heads=8,
    n_kv_heads=4,
    vocab_size=96,
    seq_len=32,
    residual_scale="deepnet",
    tied_classifier=False,
)
CFG_HD = make_config(
    dim=48, hidden_dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=80, seq_len=32
)  # head_dim != dim / heads


def windows(cfg, n, batch=3, seq=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g) for _ in range(n)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def train_steps(pipe, cfg, ws, steps, accum=2):
    """A few AdamW steps; returns the loss of each micro-step."""
    opt = AdamW(pipe.params, OptimizerConfig.for_kind("adamw", lr=3e-3, warmup=0, total_steps=steps))
    losses = []
    it = iter(ws)
    for _ in range(steps):
        pipe.zero_grad()
        for _ in range(accum):
            losses.append(pipe.forward_backward(next(it), 1.0 / accum))
        norm = global_grad_norm(pipe.grads)
        clip_grads(pipe.grads, 1.0, norm)
        opt.step(pipe.grads, 3e-3)
        pipe.after_update()
    return losses


def train_reference(cfg, p, ws, steps, accum=2):
    model = ReferenceModel.from_params(p.clone())
    decay = [t for n, t in model.named_parameters() if t.dim() >= 2]
    no_decay = [t for n, t in model.named_parameters() if t.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=3e-3,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    losses = []
    it = iter(ws)
    for _ in range(steps):
        opt.zero_grad()
        for _ in range(accum):
            w = next(it)
            loss = model.loss(w[:, :-1], w[:, 1:])
            (loss / accum).backward()
            losses.append(float(loss.detach()))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return losses


def allocations(fn) -> list[int]:
    """Sizes of the allocations made while ``fn`` runs: tensor outputs (attributed to their operator as
    self memory) and allocations outside operators ([memory] events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return [
        e.self_cpu_memory_usage if e.name != "[memory]" else e.cpu_memory_usage
        for e in prof.events()
        if (e.self_cpu_memory_usage if e.name != "[memory]" else e.cpu_memory_usage) > 0
    ]
