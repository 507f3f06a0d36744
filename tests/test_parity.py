"""The explicit kernels against autograd: loss and every parameter gradient, float64 and float32."""

from __future__ import annotations

import pytest
import torch

from anetrain.config import PRESETS, make_config
from anetrain.params import init_params
from anetrain.pipeline.baseline import BaselinePipeline
from anetrain.pipeline.dw import ThreadDW
from anetrain.reference import ReferenceModel


def scaled(name: str, **over) -> dict:
    """A preset's structure (GQA ratio, head_dim vs dim/heads) at a size that runs in milliseconds."""
    c = PRESETS[name]
    base = dict(
        dim=c.dim,
        hidden_dim=c.hidden_dim,
        n_layers=c.n_layers,
        n_heads=c.n_heads,
        n_kv_heads=c.n_kv_heads,
        vocab_size=c.vocab_size,
        seq_len=c.seq_len,
    )
    if c.head_dim != c.dim // c.n_heads:
        base["head_dim"] = c.head_dim
    base.update(over)
    return base


CASES = {
    # name: config overrides (kept small; structure preserved)
    "stories260K": scaled("stories260K", seq_len=32),
    "stories15M": scaled("stories15M", dim=48, hidden_dim=128, n_layers=2, vocab_size=96, seq_len=32),
    "stories42M": scaled("stories42M", dim=64, hidden_dim=172, n_layers=2, vocab_size=96, seq_len=32),
    "stories110M": scaled("stories110M", dim=96, hidden_dim=256, n_layers=2, vocab_size=96, seq_len=32),
    # GQA with head_dim (16) != dim/heads (8): the Qwen3-shaped structure
    "qwen3-0.6b-shaped": scaled(
        "qwen3-0.6b-shaped",
        dim=64,
        hidden_dim=192,
        n_layers=2,
        n_heads=8,
        n_kv_heads=4,
        head_dim=16,
        vocab_size=96,
        seq_len=32,
    ),
}


def run_both(cfg, dtype, seed=0, batch=3, seq=24, grad_scale=1.0, dw=None):
    params = init_params(cfg, "llama2c", seed=seed).to(dtype)
    # perturb the norm gains so that RMSNorm backward errors cannot hide behind g == 1
    g = torch.Generator().manual_seed(seed + 1)
    params.no_decay.copy_(
        1 + 0.3 * torch.randn(params.no_decay.shape, generator=g, dtype=torch.float64).to(dtype)
    )
    window = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g)
    pipe = BaselinePipeline(params, dw=dw)
    loss = pipe.forward_backward(window, grad_scale)
    if dw is not None:
        dw.close()
    model = ReferenceModel.from_params(params, dtype)
    ref_loss = model.loss(window[:, :-1], window[:, 1:])
    (ref_loss * grad_scale).backward()
    return loss, float(ref_loss.detach()), pipe.grads, model.grads_as_dict()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("alpha", [1.0, "deepnet"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-4)])
def test_step_matches_autograd(case, tied, alpha, dtype, tol):
    cfg = make_config(**CASES[case], tied_classifier=tied, residual_scale=alpha)
    loss, ref_loss, grads, ref_grads = run_both(cfg, dtype)
    assert abs(loss - ref_loss) / abs(ref_loss) <= tol
    assert set(ref_grads) == set(grads.tensors)
    for name, ref in ref_grads.items():
        err = rel_err(grads[name], ref)
        assert err <= tol, f"{name}: relative error {err:.3g} > {tol}"


def test_float64_is_much_tighter_than_required():
    """In float64 the two implementations agree to ~1e-12, far inside the 1e-6 requirement."""
    cfg = make_config(**CASES["qwen3-0.6b-shaped"], tied_classifier=False, residual_scale="deepnet")
    loss, ref_loss, grads, ref_grads = run_both(cfg, torch.float64)
    assert abs(loss - ref_loss) <= 1e-12 * abs(ref_loss)
    assert max(rel_err(grads[n], r) for n, r in ref_grads.items()) < 1e-10


def test_threaded_dw_gives_identical_gradients():
    cfg = make_config(**CASES["stories260K"])
    _, _, serial, _ = run_both(cfg, torch.float64)
    _, _, threaded, _ = run_both(cfg, torch.float64, dw=ThreadDW())
    assert torch.equal(serial.flat, threaded.flat)


def test_grad_scale_and_accumulation():
    """Two micro-steps with grad_scale 1/2 accumulate to the mean of the two gradients."""
    cfg = make_config(**CASES["stories260K"])
    params = init_params(cfg, seed=3).to(torch.float64)
    g = torch.Generator().manual_seed(5)
    w1, w2 = (torch.randint(0, cfg.vocab_size, (2, 17), generator=g) for _ in range(2))
    pipe = BaselinePipeline(params)
    pipe.forward_backward(w1, 0.5)
    pipe.forward_backward(w2, 0.5)
    model = ReferenceModel.from_params(params)
    ((model.loss(w1[:, :-1], w1[:, 1:]) + model.loss(w2[:, :-1], w2[:, 1:])) / 2).backward()
    for name, ref in model.grads_as_dict().items():
        assert rel_err(pipe.grads[name], ref) < 1e-10, name


# ---- QK-norm (Qwen3) and LoRA ------------------------------------------------------------------------

QWEN3 = dict(
    dim=64,
    hidden_dim=96,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=24,  # != dim / heads
    vocab_size=96,
    seq_len=32,
    rope_theta=1e6,
    norm_eps=1e-6,
    qk_norm=True,
)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-4)])
def test_qk_norm_step_matches_autograd(tied, dtype, tol):
    """Qwen3's per-head RMSNorm of q and k: loss and every gradient, the q_norm/k_norm gains included."""
    cfg = make_config(**QWEN3, tied_classifier=tied)
    loss, ref_loss, grads, ref_grads = run_both(cfg, dtype)
    assert any(".q_norm." in n for n in grads.tensors) and any(".k_norm." in n for n in grads.tensors)
    assert abs(loss - ref_loss) / abs(ref_loss) <= tol
    assert set(ref_grads) == set(grads.tensors)
    for name, ref in ref_grads.items():
        err = rel_err(grads[name], ref)
        assert err <= tol, f"{name}: relative error {err:.3g} > {tol}"


def random_adapters(cfg, lc, dtype, seed=7):
    """Adapters with B != 0 (fresh ones have B = 0, which would make dA vanish and hide errors)."""
    from anetrain.lora import init_lora

    ad = init_lora(cfg, lc, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    for s in ad.specs:
        if s.name.endswith("lora_B"):
            ad.tensors[s.name].normal_(0.0, 0.05, generator=g)
    return ad.to(dtype)


def run_lora(cfg, lc, dtype, mask=None, dw=None, seed=0):
    params = init_params(cfg, "llama2c", seed=seed).to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    params.no_decay.copy_(
        1 + 0.3 * torch.randn(params.no_decay.shape, generator=g, dtype=torch.float64).to(dtype)
    )
    window = torch.randint(0, cfg.vocab_size, (3, 25), generator=g)
    if mask == "random":
        mask = torch.rand(3, 24, generator=g) < 0.4
    ad = random_adapters(cfg, lc, dtype)
    pipe = BaselinePipeline(params, lora=ad.clone(), dw=dw)
    loss = pipe.forward_backward(window, 0.5, loss_mask=mask)
    pipe.close()
    model = ReferenceModel.from_params(params, dtype, lora=ad)
    ref = model.loss(window[:, :-1], window[:, 1:], mask)
    (ref * 0.5).backward()
    return loss, float(ref.detach()), pipe, model


@pytest.mark.parametrize(
    "targets", [("wq", "wk", "wv", "wo", "w1", "w3", "w2"), ("wq", "wv"), ("wo", "w2"), ("wk", "w1")]
)
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-4)])
def test_lora_adapter_gradients_match_autograd(targets, qk_norm, dtype, tol):
    """A frozen base, adapters on some projections: the adapters' gradients equal autograd's (peft's math),
    the pipeline trains nothing else, and the loss mask (instruction data) is honoured."""
    from anetrain.lora import LoraConfig

    cfg = make_config(**{**QWEN3, "qk_norm": qk_norm}, tied_classifier=False, residual_scale=0.7)
    lc = LoraConfig(rank=4, alpha=8.0, targets=targets)
    for mask in (None, "random"):
        loss, ref_loss, pipe, model = run_lora(cfg, lc, dtype, mask)
        assert abs(loss - ref_loss) / abs(ref_loss) <= tol
        ref_grads = model.lora_grads()
        assert set(ref_grads) == set(pipe.grads.tensors)  # only the adapters have gradients
        assert pipe.grads.numel() == sum(t.numel() for t in ref_grads.values())
        for name, ref in ref_grads.items():
            assert ref.abs().max() > 0, name
            err = rel_err(pipe.grads[name], ref)
            assert err <= tol, f"{name}: relative error {err:.3g} > {tol}"
        # nothing else in the reference model received a gradient
        assert all(p.grad is None for n, p in model.named_parameters() if ".lora_" not in n)


def test_lora_forms_no_frozen_weight_gradient_product():
    """The dW executor receives only adapter jobs: no product of a frozen matrix is ever formed."""
    from anetrain.lora import LoraConfig
    from anetrain.pipeline.dw import SerialDW

    class Recording(SerialDW):
        def __init__(self):
            super().__init__()
            self.fns = []

        def submit(self, fn, *args):
            self.fns.append(fn.__name__)
            super().submit(fn, *args)

    cfg = make_config(**QWEN3)
    dw = Recording()
    run_lora(cfg, LoraConfig(4, 8.0), torch.float64, dw=dw)
    assert set(dw.fns) == {"lora_weight_grad"}
    assert len(dw.fns) == 7 * cfg.n_layers
