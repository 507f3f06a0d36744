"""The optimized pipeline: same losses and gradients as the baseline and the reference, no allocations in the
steady state, and its fused kernels against the plain ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anetrain.backends import fused
from anetrain.data.compaction import VocabCompaction
from anetrain.kernels import Rope, rmsnorm_backward, rmsnorm_forward, rope_backward, rope_forward
from anetrain.params import init_params
from anetrain.pipeline.baseline import BaselinePipeline
from anetrain.pipeline.dw import DeviceDW, SerialDW, ThreadDW
from anetrain.pipeline.optimized import OptimizedPipeline
from helpers.pipelines import CFG, CFG_HD, allocations, rel, train_reference, train_steps, windows


@pytest.mark.parametrize("cfg", [CFG, CFG_HD, CFG.with_(tied_classifier=True, residual_scale=1.0)])
@pytest.mark.parametrize("dtype,tol", [("fp32", 1e-5), ("bf16", 2e-2)])
def test_gradients_match_the_baseline(cfg, dtype, tol):
    """fp32: to float32 rounding. bf16: every gradient tensor within 2% (relative L2): the documented
    tolerance for 16-bit compute with fp32 accumulation."""
    p = init_params(cfg, seed=1)
    (w,) = windows(cfg, 1)
    base = BaselinePipeline(p.clone())
    opt = OptimizedPipeline(p.clone(), dtype=dtype)
    lb, lo = base.forward_backward(w, 0.5), opt.forward_backward(w, 0.5)
    opt.close()
    assert abs(lb - lo) / lb < (1e-6 if dtype == "fp32" else 2e-3)
    for name in base.grads.tensors:
        assert rel(opt.grads[name], base.grads[name]) < tol, name


def test_float32_losses_match_the_reference_model_after_ten_steps():
    """The issue's check: float32, 1e-5 relative on the loss after 10 optimizer steps, for both pipelines."""
    p = init_params(CFG, seed=2)
    ws = windows(CFG, 22, seed=3)
    ref = train_reference(CFG, p, ws, 11)
    for pipe in (BaselinePipeline(p.clone()), OptimizedPipeline(p.clone(), dtype="fp32")):
        losses = train_steps(pipe, CFG, ws, 11)
        pipe.close()
        assert abs(losses[-1] - ref[-1]) / ref[-1] < 1e-5, (pipe.name, losses[-1], ref[-1])


def test_bf16_losses_track_the_reference_model():
    """bf16 compute: the loss trajectory stays within 1% of the float32 reference over 10 steps."""
    p = init_params(CFG, seed=2)
    ws = windows(CFG, 22, seed=3)
    ref = train_reference(CFG, p, ws, 11)
    pipe = OptimizedPipeline(p.clone(), dtype="bf16")
    losses = train_steps(pipe, CFG, ws, 11)
    pipe.close()
    assert max(abs(a - b) / b for a, b in zip(losses, ref, strict=True)) < 1e-2


def test_threaded_dw_equals_serial_dw():
    p = init_params(CFG, seed=4)
    ws = windows(CFG, 4)
    a = OptimizedPipeline(p.clone(), dtype="bf16", dw="serial")
    b = OptimizedPipeline(p.clone(), dtype="bf16", dw="thread")
    for w in ws:
        a.forward_backward(w, 0.25)
        b.forward_backward(w, 0.25)
    b.close()
    assert isinstance(a.dw, SerialDW) and isinstance(b.dw, ThreadDW)
    assert torch.equal(a.grads.flat, b.grads.flat)


def test_dw_on_another_device_accumulates_the_same_gradients():
    """DeviceDW copies operands, accumulates remotely and flushes; exercised here with CPU as both ends."""
    p = init_params(CFG, seed=5)
    ws = windows(CFG, 2)
    a = OptimizedPipeline(p.clone(), dtype="fp32", dw="serial")
    b = OptimizedPipeline(p.clone(), dtype="fp32")
    b.dw.close()
    b.dw = DeviceDW(torch.device("cpu"), torch.device("cpu"))
    for w in ws:
        a.forward_backward(w)
        b.forward_backward(w)
    b.close()
    assert rel(b.grads.flat, a.grads.flat) < 1e-6


def test_vocabulary_compaction_matches_the_baseline():
    present = np.arange(0, CFG.vocab_size, 3)
    comp = VocabCompaction.from_tokens(present, CFG.vocab_size)
    p = init_params(CFG, seed=6)
    (w,) = windows(CFG, 1)
    w = (w // 3) * 3  # only tokens that are present
    base = BaselinePipeline(p.clone(), compaction=comp)
    opt = OptimizedPipeline(p.clone(), dtype="fp32", compaction=comp)
    assert abs(base.forward_backward(w) - opt.forward_backward(w)) < 1e-5
    opt.close()
    for name in base.grads.tensors:
        assert rel(opt.grads[name], base.grads[name]) < 1e-5, name


def test_evaluation_loss_equals_the_training_loss_and_leaves_gradients_alone():
    p = init_params(CFG, seed=7)
    (w,) = windows(CFG, 1)
    pipe = OptimizedPipeline(p, dtype="bf16")
    ev = pipe.loss(w)
    assert not pipe.grads.flat.any()
    assert ev == pytest.approx(pipe.forward_backward(w), rel=1e-6)
    pipe.close()


def test_workspace_buffers_have_their_declared_shapes():
    """Every buffer of the workspace (pipeline/workspace.py) and of the fusion's scratch (backends/fusion.py)
    is allocated with the shape and dtype its declaration names; a buffer of a variant that is off (compiled
    fusion, a compacted vocabulary) has no elements."""
    from dataclasses import fields

    from anetrain.backends.buffers import FP32, shape_of
    from anetrain.backends.fusion import CompiledFusion

    (w,) = windows(CFG, 1)
    pipe = OptimizedPipeline(init_params(CFG), dtype="bf16", dw="serial")
    pipe.forward_backward(w)
    ws = pipe.ws
    assert ws is not None
    d = ws.dims
    assert (d.B, d.S, d.N, d.R, d.Dqkv) == (3, 24, 72, 2, 64 + 2 * 32)
    compiled_scratch = CompiledFusion().make_scratch(d, torch.bfloat16, ws.scratch.tables)
    for buffers, off in ((ws, {"compaction"}), (ws.layers[1], set()), (ws.scratch, {"compile"})):
        for f in fields(buffers):
            if "shape" not in f.metadata:
                continue
            t, meta = getattr(buffers, f.name), f.metadata
            want = (0,) if meta["only"] in off else shape_of(meta["shape"], d)
            assert tuple(t.shape) == want, f.name
            assert t.dtype == (torch.bfloat16 if meta["dtype"] == "compute" else meta["dtype"]), f.name
            if buffers is ws.scratch and meta["only"] == "hand":
                assert getattr(compiled_scratch, f.name).numel() == 0, f.name
    assert ws.dlogits.shape == (72, CFG.vocab_size) and ws.layers[0].p.shape == (3 * 4, 2 * 24, 24)
    assert ws.x.dtype == FP32 and ws.scratch.probs.shape == (64, CFG.vocab_size)
    assert ws.scratch.row_base.tolist() == [i * CFG.vocab_size for i in range(64)]
    assert compiled_scratch.grad_scale.shape == ()


def test_steady_state_allocates_no_buffers():
    """After the first step every tensor lives in the workspace: the c10 allocator sees no allocation but
    the 8-byte 0-dim tensors torch wraps Python scalars in. The baseline, for contrast, allocates hundreds
    of buffers per step."""
    (w,) = windows(CFG, 1)
    opt = OptimizedPipeline(init_params(CFG), dtype="bf16", dw="serial")
    opt.forward_backward(w)
    sizes = allocations(lambda: (opt.forward_backward(w), opt.loss(w), opt.after_update()))
    assert max(sizes, default=0) <= 8, sorted(sizes)[-5:]
    base = BaselinePipeline(init_params(CFG))
    base.forward_backward(w)
    assert sum(1 for s in allocations(lambda: base.forward_backward(w)) if s > 8) > 100


# ---- the fused kernels against the plain ones -------------------------------------------------------------
def test_fused_rmsnorm_matches_the_kernel():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 16, generator=g)
    gain = 1 + 0.1 * torch.randn(16, generator=g)
    dy = torch.randn(2, 5, 16, generator=g)
    y_ref, rstd_ref = rmsnorm_forward(x, gain, 1e-5)
    dx_ref, dg_ref = rmsnorm_backward(dy, x, rstd_ref, gain)
    y, rstd, tmp = torch.empty_like(x), torch.empty(2, 5, 1), torch.empty_like(x)
    fused.rmsnorm_forward_into(y, rstd, x, gain, 1e-5, tmp)
    torch.testing.assert_close(y, y_ref)
    dx, dg = torch.zeros_like(x), torch.zeros(16)
    fused.rmsnorm_backward_into(
        dx,
        dg,
        dy,
        x,
        rstd,
        gain,
        (torch.empty_like(x), torch.empty_like(x), tmp),
        torch.empty(2, 5, 1),
        torch.empty(16),
    )
    torch.testing.assert_close(dx, dx_ref)
    torch.testing.assert_close(dg, dg_ref)


def test_fused_rope_matches_the_kernel_with_the_query_scale_folded_in():
    b, s, h, hkv, dh = 2, 6, 4, 2, 8
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(b, s, (h + 2 * hkv) * dh, generator=g)
    rope = Rope.build(s, dh)
    scale = dh**-0.5
    fq, fk = fused.rope_tables(rope.cos, rope.sin, scale)
    q, k, v = torch.empty(b, h, s, dh), torch.empty(b, hkv, s, dh), torch.empty(b, hkv, s, dh)
    fused.rope_split_into(q, k, v, qkv, (fq, fk), torch.empty_like(qkv), torch.empty(b, s, h, dh))
    q_ref = rope_forward(qkv[..., : h * dh].view(b, s, h, dh), rope.cos, rope.sin).transpose(1, 2) * scale
    k_ref = rope_forward(qkv[..., h * dh : (h + hkv) * dh].view(b, s, hkv, dh), rope.cos, rope.sin).transpose(
        1, 2
    )
    torch.testing.assert_close(q, q_ref)
    torch.testing.assert_close(k, k_ref)
    torch.testing.assert_close(v, qkv[..., (h + hkv) * dh :].view(b, s, hkv, dh).transpose(1, 2))
    dq, dk, dv = torch.randn_like(q), torch.randn_like(k), torch.randn_like(v)
    dqkv = torch.empty_like(qkv)
    conj = (fq.conj().resolve_conj(), fk.conj().resolve_conj())
    fused.rope_merge_backward_into(dqkv, dq, dk, dv, conj, torch.empty(b, s, h, dh), torch.empty(b, s, h, dh))
    dq_ref = rope_backward(dq.transpose(1, 2), rope.cos, rope.sin) * scale
    torch.testing.assert_close(dqkv[..., : h * dh].view(b, s, h, dh), dq_ref)
    torch.testing.assert_close(
        dqkv[..., h * dh : (h + hkv) * dh].view(b, s, hkv, dh),
        rope_backward(dk.transpose(1, 2), rope.cos, rope.sin),
    )


@pytest.mark.parametrize("pipeline", ["baseline", "optimized-serial", "optimized-thread"])
@pytest.mark.parametrize("tied", [True, False])
def test_gradient_buckets_are_announced_complete(pipeline, tied):
    """grad_ready_hook sees every bucket of grads.buckets() exactly once, each already final: what lets a
    distributed run start all-reducing a layer's gradients while the backward continues."""
    cfg = CFG.with_(tied_classifier=tied)
    p = init_params(cfg, seed=8)
    buckets = p.buckets()
    assert sum(b.numel() for b in buckets) == p.numel()
    if pipeline == "baseline":
        pipe = BaselinePipeline(p)
    else:
        pipe = OptimizedPipeline(p, dtype="bf16", dw=pipeline.split("-")[1])
    seen = []
    pipe.grad_ready_hook = lambda t: seen.append((t.data_ptr(), t.numel(), t.clone()))
    (w,) = windows(cfg, 1)
    pipe.forward_backward(w)
    pipe.close()
    final = {b.data_ptr(): b for b in pipe.grads.buckets()}
    assert sorted((ptr, n) for ptr, n, _ in seen) == sorted((b.data_ptr(), b.numel()) for b in final.values())
    for ptr, _, snapshot in seen:
        assert torch.equal(snapshot, final[ptr])


def test_fp16_with_loss_scaling_matches_and_overflow_is_visible():
    """Where bf16 is not native the pipeline computes in fp16; the trainer's dynamic loss scale rides in
    grad_scale. A sane scale gives the baseline's gradients (times the scale); an absurd one overflows to
    inf/nan, which the trainer detects and skips."""
    p = init_params(CFG, seed=9)
    (w,) = windows(CFG, 1)
    base = BaselinePipeline(p.clone())
    base.forward_backward(w)
    opt = OptimizedPipeline(p.clone(), dtype="fp16")
    assert opt.needs_loss_scaling
    opt.forward_backward(w, 1024.0)
    for name in base.grads.tensors:
        assert rel(opt.grads[name] / 1024.0, base.grads[name]) < 5e-3, name
    opt.zero_grad()
    opt.forward_backward(w, 1e30)
    assert not torch.isfinite(opt.grads.flat).all()
    opt.close()


def test_fp32_products_through_onednn_and_numpy_equal_torch_blas(monkeypatch):
    """fp32 GEMMs on the CPU go through oneDNN (auto; numpy's OpenBLAS where torch lacks oneDNN), both faster
    here than torch's MKL path; the math is the same. oneDNN results bigger than ONEDNN_MAX_RESULT are formed
    in column blocks (forced here with a tiny limit)."""
    from anetrain.backends import gemm

    monkeypatch.setattr(gemm, "ONEDNN_MAX_RESULT", 4 * 3 * 24 * 7)  # blocks of 7 columns at 72 rows
    p = init_params(CFG, seed=10)
    (w,) = windows(CFG, 1)
    ref = OptimizedPipeline(p.clone(), dtype="fp32", blas="torch")
    others = [
        OptimizedPipeline(p.clone(), dtype="fp32"),
        OptimizedPipeline(p.clone(), dtype="fp32", blas="numpy"),
    ]
    assert [x.blas for x in (ref, *others)] == [
        "torch",
        "onednn" if gemm.onednn_available() else "numpy",
        "numpy",
    ]
    threads = torch.get_num_threads()
    lref = ref.forward_backward(w)
    for x in others:
        lx = x.forward_backward(w)
        assert torch.get_num_threads() == threads  # numpy's single-thread setting is undone afterwards
        assert abs(lx - lref) < 1e-5 * lref
        assert rel(x.grads.flat, ref.grads.flat) < 1e-5
    with pytest.raises(ValueError, match="onednn BLAS path is for float32"):
        gemm.choose(torch.bfloat16, torch.device("cpu"), "onednn")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_grad_in_row_blocks_equals_one_product(dtype):
    """The classifier's dW product is formed a block of rows at a time (a small 16-bit buffer); the fp32
    gradient is the same as from one product, including a last block shorter than the others."""
    from anetrain.pipeline.optimized import _weight_grad
    from anetrain.pipeline.workspace import block_rows

    assert block_rows(32000, 768) == 10667  # 24.6M elements: 3 blocks of at most 2^23 elements
    assert block_rows(100, 10, limit=300) == 25
    g = torch.Generator().manual_seed(0)
    dy = torch.randn(2, 9, 70, generator=g).to(dtype)
    x = torch.randn(2, 9, 12, generator=g).to(dtype)
    acc = torch.randn(70, 12, generator=g)
    want = acc + (dy.reshape(18, 70).float().t() @ x.reshape(18, 12).float())
    prod = torch.empty(30, 12, dtype=dtype)  # 70 rows in blocks of 30, 30, 10
    _weight_grad(acc, dy, x, prod, torch.empty(64))
    torch.testing.assert_close(acc, want, rtol=2e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-2)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize("dtype,dw", [("fp32", "serial"), ("bf16", "serial"), ("fp32", "thread")])
def test_zero_grad_then_accumulation_equals_the_baseline(tied, compact, dtype, dw):
    """zero_grad() leaves the weight gradients to be overwritten by the next micro-step's products (no
    zeroing pass); whatever a previous accumulation left behind, the gradients after zero_grad and three
    micro-steps are the baseline's."""
    cfg = CFG.with_(tied_classifier=tied)
    comp = VocabCompaction.from_tokens(np.arange(0, cfg.vocab_size, 3), cfg.vocab_size) if compact else None
    p = init_params(cfg, seed=7)
    ws = [(w // 3) * 3 if compact else w for w in windows(cfg, 5, seed=8)]
    base = BaselinePipeline(p.clone(), compaction=comp)
    opt = OptimizedPipeline(p.clone(), dtype=dtype, compaction=comp, dw=dw)
    for pipe in (base, opt):
        pipe.forward_backward(ws[0], 0.3)  # a previous accumulation, never zeroed by a pass
        pipe.forward_backward(ws[1], 0.3)
        pipe.zero_grad()
        for w in ws[2:]:
            pipe.forward_backward(w, 1.0 / 3)
    opt.close()
    tol = 1e-5 if dtype == "fp32" else 2e-2
    for name in base.grads.tensors:
        assert rel(opt.grads[name], base.grads[name]) < tol, name


def test_phase_times_count_in_line_dw_once_and_never_go_negative(monkeypatch):
    """With dW run in line (SerialDW), each job's time is taken out of the phase it ran in and counted as dW:
    the classifier's job runs inside the forward phase, the layers' inside backward_dx. Slow jobs (a sleep)
    make a wrong attribution show as a negative phase."""
    import time

    real_submit = SerialDW.submit

    def slow_submit(self, fn, *args):
        return real_submit(self, lambda *a: (time.sleep(0.02), fn(*a)), *args)

    monkeypatch.setattr(SerialDW, "submit", slow_submit)
    (w,) = windows(CFG, 1)
    pipe = OptimizedPipeline(init_params(CFG), dtype="bf16", dw="serial")
    pipe.forward_backward(w)
    pipe.times.reset()
    pipe.forward_backward(w)
    phases = pipe.times.reset()
    jobs = 1 + 4 * CFG.n_layers + 1  # classifier, 4 per layer (w2, w13, wo, qkv), embedding
    assert phases["dw"] >= 20.0 * jobs
    assert all(v >= 0 for v in phases.values()), phases
