"""AneSimPipeline: forward and dx as ANE programs in the simulator, the rest on the CPU.

A full step's gradients against autograd (anetrain.reference), for MHA and GQA models in every program
form (the original's programs, the default, and anetrain's with packed and separate inputs): relative
Frobenius error <= 1.5e-3 per tensor (measured up to 1.12e-3 with the original's programs and 1.18e-3 with
anetrain's; fp16 activations and weights with fp32 accumulation), loss within 2e-6 relative (measured
<= 1.4e-6). With the original's programs this also checks the GQA head mapping (h // R) and the host's
tiling, group sums and inverse RoPE. Then a stories260K-shaped model (GQA 8/4, head_dim 8 padded to 32,
hidden 172 padded to 192; 2 layers and seq 32 to keep CI fast) trained from scratch on TinyStories tokens
next to the float32 BaselinePipeline.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anetrain.ane.pipeline import AneSimPipeline
from anetrain.ane.sim import SimExecutor
from anetrain.config import PRESETS, make_config
from anetrain.errors import ConfigError
from anetrain.params import init_params
from anetrain.pipeline.baseline import BaselinePipeline
from anetrain.pipeline.dw import SerialDW
from anetrain.reference import ReferenceModel
from helpers.data import shared_file

GRAD_TOL = 1.5e-3
FORMS = [("original", "packed"), ("anetrain", "packed"), ("anetrain", "separate")]
SCALE = 1024.0  # a loss scale, as the trainer's dynamic scaler would pass in grad_scale

CASES = {
    # MHA, head_dim 16 (padded to 32), hidden 80 (padded to 96), seq 24 (padded to 32), untied classifier
    "mha": dict(dim=64, hidden_dim=80, n_layers=2, n_heads=4, n_kv_heads=4, tied_classifier=False),
    # GQA shaped like stories260K: head_dim 8, hidden 172, 8 query heads on 4 kv heads
    "gqa": dict(dim=64, hidden_dim=172, n_layers=2, n_heads=8, n_kv_heads=4),
    # GQA with head_dim 32 != dim/heads (the Qwen3-shaped structure)
    "gqa-hd32": dict(dim=64, hidden_dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32),
}


def setup(case: str, seed: int = 0, seq: int = 24, batch: int = 2):
    cfg = make_config(**CASES[case], vocab_size=96, seq_len=64, residual_scale="deepnet")
    params = init_params(cfg, "llama2c", seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    params.no_decay.copy_(1 + 0.3 * torch.randn(params.no_decay.shape, generator=g))  # gains != 1
    window = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g)
    return cfg, params, window


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("form", FORMS, ids=lambda f: "/".join(f))
@pytest.mark.parametrize("case", list(CASES))
def test_step_matches_autograd(case: str, form: tuple[str, str]) -> None:
    _, params, window = setup(case)
    pipe = AneSimPipeline(params, programs=form[0], inputs=form[1])
    loss = pipe.forward_backward(window, SCALE)
    pipe.close()
    model = ReferenceModel.from_params(params)
    ref_loss = model.loss(window[:, :-1], window[:, 1:])
    ref_loss.backward()
    assert abs(loss - ref_loss.item()) <= 2e-6 * ref_loss.item()
    ref = model.grads_as_dict()
    assert set(ref) == set(pipe.grads.tensors)
    for name, r in ref.items():
        err = rel_err(pipe.grads[name] / SCALE, r)
        assert err <= GRAD_TOL, f"{name}: relative error {err:.2e} > {GRAD_TOL}"


def test_gradients_accumulate_and_the_executor_is_a_seam() -> None:
    """Two half-scaled micro-steps add up; a wrapped executor sees every program run (10 per layer and
    sequence: 3 forward, 7 dx)."""

    class Counting(SimExecutor):
        def run(self, program, inputs):  # type: ignore[no-untyped-def]
            self.names.append(program.name)
            return super().run(program, inputs)

    cfg, params, window = setup("gqa", seq=16, batch=1)
    ex = Counting()
    ex.names = []  # type: ignore[attr-defined]
    pipe = AneSimPipeline(params, executor=ex, dw=SerialDW())
    pipe.forward_backward(window, SCALE / 2)
    pipe.forward_backward(window, SCALE / 2)
    once = AneSimPipeline(params)
    once.forward_backward(window, SCALE)
    assert torch.allclose(
        pipe.grads.flat, once.grads.flat, rtol=0, atol=1e-3 * float(once.grads.flat.abs().max())
    )
    assert len(ex.names) == 2 * cfg.n_layers * 10  # type: ignore[attr-defined]
    assert ex.names[:3] == ["sdpa_fwd", "wo_fwd", "ffn_fused"]  # type: ignore[attr-defined]
    assert all(p.program_set == "original" for p in pipe._for_seq(16).kernels)  # the default
    assert ex.compiles == 10  # every program compiled once, shared by both layers
    for p in (pipe, once):
        p.close()


def test_weights_reach_the_programs_only_through_after_update() -> None:
    _, params, window = setup("gqa", seq=16, batch=1)
    pipe = AneSimPipeline(params)
    before = pipe.loss(window)
    with torch.no_grad():
        params.layers[0].w1.mul_(3.0)
        params.layers[1].wq.mul_(-2.0)
    assert pipe.loss(window) == before  # the staged fp16 copies are unchanged
    pipe.after_update()
    after = pipe.loss(window)
    assert after != before
    assert abs(after - BaselinePipeline(params).loss(window)) < 1e-3
    pipe.close()


def test_fp16_overflow_shows_up_as_non_finite_gradients() -> None:
    """A loss scale too large for fp16 overflows on the ANE; the trainer sees inf/nan and skips."""
    _, params, window = setup("mha")
    pipe = AneSimPipeline(params)
    pipe.forward_backward(window, 1e9)
    assert not bool(torch.isfinite(pipe.grads.flat).all())
    pipe.zero_grad()
    pipe.forward_backward(window, SCALE)
    assert bool(torch.isfinite(pipe.grads.flat).all())
    pipe.close()


def test_bad_settings_are_config_errors() -> None:
    _, params, _ = setup("mha")
    with pytest.raises(ConfigError, match="unknown chip"):
        AneSimPipeline(params, chip="a17")
    with pytest.raises(ConfigError, match="float32 master weights"):
        AneSimPipeline(params.to(torch.float64))


def train(
    pipe, tokens: np.ndarray, starts: np.ndarray, seq: int, scale: float, lr: float = 3e-3
) -> list[float]:
    """Plain Adam (beta 0.9/0.95, no decay), one micro-batch per step; returns the training losses."""
    p = pipe.params.flat
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    losses = []
    for t, row in enumerate(starts, start=1):
        window = torch.from_numpy(np.stack([tokens[s : s + seq + 1] for s in row]))
        pipe.zero_grad()
        losses.append(pipe.forward_backward(window, scale))
        g = pipe.grads.flat / scale
        assert bool(torch.isfinite(g).all()), f"step {t}: fp16 overflow at loss scale {scale}"
        m.mul_(0.9).add_(g, alpha=0.1)
        v.mul_(0.95).addcmul_(g, g, value=0.05)
        p.sub_(lr * (m / (1 - 0.9**t)) / ((v / (1 - 0.95**t)).sqrt() + 1e-8))
        pipe.after_update()
    return losses


@pytest.mark.slow
def test_stories260K_shaped_training_tracks_the_float32_baseline() -> None:
    """From the same init and batches, the fp16 ANE pipeline (the original's programs) keeps its loss curve
    within 0.18 nats (20-step moving average) of the float32 baseline's over 250 steps, and both learn
    (6.25 -> ~4.1).

    Measured (this seed): final averages 4.128 (baseline) and 4.060 (ANE), max gap 0.133, mean 0.051 (with
    anetrain's programs: 4.040, max gap 0.128, mean 0.054); earlier versions with other data orders over
    300 steps gave max gaps of 0.10 and 0.03, the ANE sometimes above and sometimes below.

    The trajectories do drift apart (Adam amplifies any difference; a 1e-4 relative weight perturbation
    of the baseline alone moves its own curve by ~0.05), so the bound is on the curves, not the weights.
    """
    tokens = np.fromfile(shared_file("derived/tinystories_valid_head.tok512.bin"), dtype=np.uint16).astype(
        np.int64
    )
    seq, batch, steps = 32, 4, 250
    cfg = PRESETS["stories260K"].with_(n_layers=2, seq_len=seq)
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.hidden_dim) == (8, 4, 8, 172)
    init = init_params(cfg, "llama2c", seed=0)
    starts = np.random.default_rng(0).integers(0, len(tokens) - seq - 1, size=(steps, batch))
    base = train(BaselinePipeline(init.clone()), tokens, starts, seq, 1.0)
    ane_pipe = AneSimPipeline(init.clone())
    ane = train(ane_pipe, tokens, starts, seq, SCALE)
    ane_pipe.close()
    assert abs(ane[0] - base[0]) < 1e-4  # the same model before any update
    k = 20
    sb = np.convolve(base, np.ones(k) / k, mode="valid")
    sa = np.convolve(ane, np.ones(k) / k, mode="valid")
    assert sb[-1] < base[0] - 1.5 and sa[-1] < ane[0] - 1.5
    gap = np.abs(sa - sb)
    assert gap.max() < 0.18, f"max gap {gap.max():.3f}"
