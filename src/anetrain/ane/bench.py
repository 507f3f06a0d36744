"""``anetrain bench --backend ane``: the ANE pipeline timed, reported with the original's Efficiency Report.

:func:`run_ane_bench` trains ``warmup + steps`` micro-steps of ``batch x seq`` random tokens (an AdamW
update every ``accum``) through :func:`.runtime.make_runtime_pipeline` and reports, per micro-step as the
original does (docs/ane.md, appendix A.5):

* ``ms_per_step``: median time of a timed micro-step, the optimizer excluded (the original's "Avg train");
  ``ms_per_step_with_optimizer`` adds the update's time spread over ``accum`` steps;
* ``ane_tflops``: (2 FWD + SDPA) x batch / time, the work the original puts on the ANE (forward and dx of
  every projection, attention); ``total_tflops``: (3 FWD + SDPA + 3 CLS) x batch / time (ANE + CPU);
  FLOPs from :mod:`anetrain.telemetry.flops`;
* ``utilization``: ``ane_tflops`` over the chip's **published** peak (:mod:`.machine`), not a measured one
  (``anetrain ane peak`` measures it);
* ``io_ms_per_step``: host copies into and out of the surfaces (and across the worker boundary) plus the
  staging of weights after each update; ``compile_s``: compiling and loading the programs.

``executor="sim"`` runs the same code with the simulator as the device, on any machine (slowly).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from ..config import ModelConfig
from ..errors import ConfigError
from ..optim import AdamW, OptimizerConfig, clip_divisor, global_grad_norm
from ..params import init_params
from ..telemetry.flops import attention_flops, classifier_flops, forward_matmul_flops
from .machine import published_peak
from .runtime import make_runtime_pipeline, resolve_runtime_chip, runtime_name

LOSS_SCALE = 2.0**12


def ane_flops_per_step(cfg: ModelConfig, seq: int, batch: int) -> float:
    """(2 FWD + SDPA) per micro-step of ``batch`` sequences: the ANE's share in the original's accounting."""
    return batch * (2 * forward_matmul_flops(cfg, seq) + attention_flops(cfg, seq))


def total_flops_per_step(cfg: ModelConfig, seq: int, batch: int) -> float:
    """(3 FWD + SDPA + 3 CLS) per micro-step: forward, dx and dW, ANE and CPU."""
    return batch * (
        3 * forward_matmul_flops(cfg, seq) + attention_flops(cfg, seq) + 3 * classifier_flops(cfg, seq)
    )


def run_ane_bench(
    cfg: ModelConfig,
    batch: int,
    seq: int,
    accum: int,
    steps: int,
    chip: str,
    inputs: str,
    log: Callable[[str], None] = print,
    *,
    executor: str = "private",
    warmup: int | None = None,
    seed: int = 1337,
    lr: float = 3e-4,
    isolate: bool | None = None,
    programs: str = "original",
) -> dict[str, Any]:
    """Time the ANE pipeline; returns the Efficiency Report fields (see the module docstring)."""
    for name, value in (("batch", batch), ("seq", seq), ("accum", accum), ("steps", steps)):
        if value < 1:
            raise ConfigError(f"bench: {name} must be positive, got {value}")
    runtime = runtime_name(executor)
    info = resolve_runtime_chip(chip, runtime)
    warm = max(1, accum) if warmup is None else warmup
    pipe = make_runtime_pipeline(
        init_params(cfg, "llama2c", seed),
        chip=info.chip,
        programs=programs,
        inputs=inputs,
        runtime=runtime,
        isolate=isolate,
        seq=seq,
    )
    ex = pipe.executor
    opt = AdamW(pipe.params, OptimizerConfig.for_kind("adamw", lr=lr, warmup=0, total_steps=10**9, clip=1.0))
    g = torch.Generator().manual_seed(seed)
    windows = [torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g) for _ in range(warm + steps)]
    log(
        f"ANE bench: {cfg.name} ({cfg.shape_line()}), batch {batch} x {seq}, accum {accum}, {info.chip}, "
        f"{programs} programs, {inputs} inputs, runtime {runtime} "
        f"({warm} warm-up + {steps} timed micro-steps)"
    )
    micro_ms: list[float] = []
    opt_ms: list[float] = []
    losses: list[float] = []
    t_start = time.perf_counter()
    stats0 = ex.stats.copy()
    try:
        for i, w in enumerate(windows):
            if i == warm:  # the timed part starts: count from here
                stats0 = ex.stats.copy()
                pipe.times.reset()
            t0 = time.perf_counter()
            losses.append(pipe.forward_backward(w, LOSS_SCALE / accum))
            t1 = time.perf_counter()
            if (i + 1) % accum == 0 or i == len(windows) - 1:
                norm = global_grad_norm(pipe.grads) / LOSS_SCALE
                if norm == norm and norm != float("inf"):  # skip an update an fp16 overflow would poison
                    opt.step(pipe.grads, lr, LOSS_SCALE * clip_divisor(norm, 1.0))
                pipe.after_update()
                pipe.zero_grad()
                if i >= warm:
                    opt_ms.append((time.perf_counter() - t1) * 1e3)
            if i >= warm:
                micro_ms.append((t1 - t0) * 1e3)
        wall_s = time.perf_counter() - t_start
        timed = ex.stats.since(stats0)
        phases = pipe.times.reset()
        compile_s, compiles = ex.stats.compile_s, ex.stats.compiles
        restarts = ex.stats.restarts
    finally:
        pipe.close()
    ms = statistics.median(micro_ms)
    opt_share = (sum(opt_ms) / len(micro_ms)) if micro_ms else 0.0
    ane_flops = ane_flops_per_step(cfg, seq, batch)
    total_flops = total_flops_per_step(cfg, seq, batch)
    ane_tflops = ane_flops / (ms / 1e3) / 1e12
    peak, source = published_peak(info.chip, info.ultra)
    io_ms = (timed.io_s * 1e3 + phases.get("io", 0.0)) / steps
    return {
        "backend": "ane",
        "runtime": runtime,
        "isolated": type(ex).__name__ == "WorkerExecutor",
        "chip": info.chip,
        "chip_brand": info.brand,
        "programs": programs,
        "inputs": inputs,
        "model": cfg.to_dict(),
        "batch": batch,
        "seq": seq,
        "accum": accum,
        "steps": steps,
        "warmup": warm,
        "total_steps": warm + steps,
        "wall_s": wall_s,
        "compile_s": compile_s,
        "compiles": compiles,
        "worker_restarts": restarts,
        "ms_per_step": ms,
        "ms_per_step_with_optimizer": ms + opt_share,
        "optimizer_ms_per_step": opt_share,
        "tokens_per_s": batch * seq / (ms / 1e3),
        "ane_flops_per_step": ane_flops,
        "total_flops_per_step": total_flops,
        "ane_tflops": ane_tflops,
        "total_tflops": total_flops / (ms / 1e3) / 1e12,
        "peak_tflops": peak,
        "peak_source": f"published, not measured: {source}",
        "utilization": ane_tflops / peak,
        "io_ms_per_step": io_ms,
        "ane_eval_ms_per_step": timed.eval_s * 1e3 / steps,
        "ane_evals_per_step": timed.evals / steps,
        "phases_ms_per_step": {k: v / steps for k, v in phases.items()},
        "losses": losses,
    }


def format_ane_report(rep: dict[str, Any]) -> str:
    """The original's Efficiency Report lines for an ANE bench result."""
    wall = rep["wall_s"] or 1e-9
    return "\n".join(
        [
            "=== Efficiency Report (ANE) ===",
            f"Runtime:         {rep['runtime']} on {rep['chip']}"
            + (f" ({rep['chip_brand']})" if rep.get("chip_brand") else "")
            + (", in a worker process" if rep["isolated"] else ""),
            f"Total steps:     {rep['total_steps']} ({rep['warmup']} warm-up, {rep['steps']} timed)",
            f"Wall time:       {rep['wall_s']:.1f} s",
            f"Compile time:    {rep['compile_s'] * 1e3:.0f} ms ({100 * rep['compile_s'] / wall:.1f}%), "
            f"{rep['compiles']} compiles, {rep['worker_restarts']} worker restarts",
            f"Avg train:       {rep['ms_per_step']:.1f} ms/step "
            f"({rep['ms_per_step_with_optimizer']:.1f} with the optimizer)",
            f"ANE TFLOPS:      {rep['ane_tflops']:.3f} sustained",
            f"Total TFLOPS:    {rep['total_tflops']:.3f} (ANE+CPU)",
            f"ANE utilization: {100 * rep['utilization']:.1f}% of {rep['peak_tflops']:.1f} TFLOPS "
            f"({rep['peak_source']})",
            f"IO:              {rep['io_ms_per_step']:.2f} ms/step; ANE evaluations "
            f"{rep['ane_eval_ms_per_step']:.2f} ms/step ({rep['ane_evals_per_step']:.0f} programs)",
        ]
    )
