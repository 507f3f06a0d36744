"""``anetrain bench``: the usual PyTorch trainer against anetrain's pipelines, same tokens, same weights.

Rows (``--rows``):

* ``reference``: the reference model trained the usual way, as llama2.c's train.py does it with its
  optimizer made as fast as torch allows: autograd, ``torch.compile``, autocast to the benchmark precision,
  torch's AdamW (``fused=True``; decay on 2-D tensors only), global-norm clipping, gradient accumulation.
* ``baseline``: anetrain's core kernels run serially in float32.
* ``optimized``: anetrain's optimized pipeline in the benchmark precision.

A step is one micro-batch of ``batch x seq`` tokens, as in the original trainer; the optimizer runs once per
``accum`` micro-steps and its time is spread over them. Every row starts from the same initial weights and
sees the same random token windows in the same order, so their loss trajectories are comparable.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil
import torch

from . import __version__
from .config import ModelConfig
from .errors import AnetrainError
from .fsutil import atomic_write_text
from .optim import AdamW, OptimizerConfig, clip_divisor, global_grad_norm
from .params import init_params
from .pipeline_factory import PipelineChoice, cpu_has_bf16, make_pipeline, resolve_device
from .reference import ReferenceModel
from .telemetry.flops import training_flops_per_sequence
from .telemetry.peak import _cpu_name, peak_tflops

ROWS = ("reference", "baseline", "optimized")
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class BenchConfig:
    cfg: ModelConfig
    batch: int = 1
    seq: int = 256
    accum: int = 10
    steps: int = 20  # timed micro-steps
    warmup: int = 10  # untimed micro-steps first (compilation, allocation)
    dtype: str = "bf16"
    rows: tuple[str, ...] = ROWS
    seed: int = 1337
    lr: float = 3e-4
    clip: float = 1.0
    device: str = "auto"
    compile: bool = True
    fusion: str = "auto"  # the optimized row's elementwise fusion
    repeat: int = 1  # rounds over the rows (round-robin), their timed steps pooled


@dataclass
class RowResult:
    name: str
    precision: str
    ms_per_step: float
    micro_ms: list[float]
    optimizer_ms: float
    io_ms: float
    losses: list[float]
    peak_rss_mb: float
    compile_s: float
    extra: dict[str, Any] = field(default_factory=dict)


class _RssSampler:
    """The process's peak resident memory while a row runs, sampled every 100 ms (the workspace, the largest
    part, is steady through a step; a sampler that wakes often steals time from a 2-core machine)."""

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(0.1)

    def __enter__(self) -> _RssSampler:
        self.peak = self.proc.memory_info().rss
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def make_windows(bc: BenchConfig) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(bc.seed)
    total = bc.warmup + bc.steps
    return [torch.randint(0, bc.cfg.vocab_size, (bc.batch, bc.seq + 1), generator=g) for _ in range(total)]


def _time_loop(
    bc: BenchConfig,
    windows: list[torch.Tensor],
    micro: Callable[[torch.Tensor], float],
    update: Callable[[], None],
    device: torch.device,
) -> tuple[list[float], list[float], list[float], list[float], float]:
    """Run warm-up + timed micro-steps with an update every ``accum``; returns (micro ms, optimizer ms,
    io ms, losses, warm-up seconds)."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    micro_ms, opt_ms, io_ms, losses = [], [], [], []
    t_warm = time.perf_counter()
    for i, w in enumerate(windows):
        timed = i >= bc.warmup
        if i == bc.warmup:
            warm_s = time.perf_counter() - t_warm
        sync()
        t0 = time.perf_counter()
        win = w.to(device, non_blocking=True)
        sync()
        t1 = time.perf_counter()
        losses.append(micro(win))
        sync()
        t2 = time.perf_counter()
        if (i + 1) % bc.accum == 0:
            update()
            sync()
            if timed:
                opt_ms.append((time.perf_counter() - t2) * 1e3)
        if timed:
            micro_ms.append((t2 - t0) * 1e3)
            io_ms.append((t1 - t0) * 1e3)
    if bc.warmup == 0:
        warm_s = 0.0
    return micro_ms, opt_ms, io_ms, losses, warm_s


def run_reference(bc: BenchConfig, windows: list[torch.Tensor]) -> RowResult:
    device = resolve_device(bc.device)
    dtype = TORCH_DTYPES[bc.dtype]
    model = ReferenceModel.from_params(init_params(bc.cfg, "llama2c", bc.seed), torch.float32).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=bc.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
        fused=True,
    )
    scaler = torch.amp.GradScaler(device.type, enabled=bc.dtype == "fp16")
    forward = torch.compile(model.loss) if bc.compile else model.loss
    autocast = torch.autocast(device.type, dtype=dtype, enabled=bc.dtype != "fp32")

    def micro(w: torch.Tensor) -> float:
        with autocast:
            loss = forward(w[:, :-1], w[:, 1:])
        scaler.scale(loss / bc.accum).backward()
        return float(loss.detach())

    def update() -> None:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), bc.clip)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    with _RssSampler() as rss:
        micro_ms, opt_ms, io_ms, losses, warm = _time_loop(bc, windows, micro, update, device)
    return _row("reference", bc.dtype, bc, micro_ms, opt_ms, io_ms, losses, rss.peak, warm)


def run_pipeline(name: str, bc: BenchConfig, windows: list[torch.Tensor]) -> RowResult:
    precision = "fp32" if name == "baseline" else bc.dtype
    choice = PipelineChoice(pipeline=name, backend=bc.device, dtype=precision, fusion=bc.fusion)
    pipe = make_pipeline(init_params(bc.cfg, "llama2c", bc.seed), choice)
    opt = AdamW(
        pipe.params, OptimizerConfig.for_kind("adamw", lr=bc.lr, warmup=0, total_steps=10**9, clip=bc.clip)
    )
    scale = 1.0 if not pipe.needs_loss_scaling else 2.0**12

    def micro(w: torch.Tensor) -> float:
        return pipe.forward_backward(w, scale / bc.accum)

    def update() -> None:
        g = pipe.grads
        norm = global_grad_norm(g) / scale
        opt.step(g, bc.lr, scale * clip_divisor(norm, bc.clip))
        pipe.after_update()
        pipe.zero_grad()

    device = pipe.params.flat.device
    with _RssSampler() as rss:
        micro_ms, opt_ms, io_ms, losses, warm = _time_loop(bc, windows, micro, update, device)
    phases = pipe.times.reset()
    pipe.close()
    row = _row(name, precision, bc, micro_ms, opt_ms, io_ms, losses, rss.peak, warm)
    total = bc.warmup + bc.steps
    row.extra["phases_ms_per_step"] = {k: v / total for k, v in phases.items()}
    return row


def _row(
    name: str,
    precision: str,
    bc: BenchConfig,
    micro_ms: list[float],
    opt_ms: list[float],
    io_ms: list[float],
    losses: list[float],
    peak_rss: int,
    warm_s: float,
) -> RowResult:
    opt_mean = statistics.fmean(opt_ms) if opt_ms else 0.0
    ms = statistics.median(micro_ms) + opt_mean / bc.accum
    return RowResult(
        name=name,
        precision=precision,
        ms_per_step=ms,
        micro_ms=micro_ms,
        optimizer_ms=opt_mean / bc.accum,
        io_ms=statistics.median(io_ms) if io_ms else 0.0,
        losses=losses,
        peak_rss_mb=peak_rss / 2**20,
        compile_s=warm_s,
    )


def _pool(runs: list[RowResult]) -> RowResult:
    """One row from several rounds of it: the median over all their timed steps, the mean optimizer time,
    the highest peak memory; losses, warm-up and phases from the first round (the losses are the same)."""
    first = runs[0]
    micro = [ms for r in runs for ms in r.micro_ms]
    opt = statistics.fmean(r.optimizer_ms for r in runs)
    return RowResult(
        name=first.name,
        precision=first.precision,
        ms_per_step=statistics.median(micro) + opt,
        micro_ms=micro,
        optimizer_ms=opt,
        io_ms=statistics.median(r.io_ms for r in runs),
        losses=first.losses,
        peak_rss_mb=max(r.peak_rss_mb for r in runs),
        compile_s=first.compile_s,
        extra=first.extra,
    )


def machine_info(device: torch.device, dtype: str) -> dict[str, Any]:
    info = {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "anetrain": __version__,
        "cpu_bf16": cpu_has_bf16(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    for dt in {dtype, "fp32"}:
        info[f"peak_tflops_{dt}"] = peak_tflops(device, TORCH_DTYPES[dt])
    return info


def run_bench(bc: BenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    for r in bc.rows:
        if r not in ROWS:
            raise AnetrainError(f"unknown bench row {r!r} (known: {', '.join(ROWS)})")
    if bc.dtype == "bf16" and resolve_device(bc.device).type == "cpu" and not cpu_has_bf16():
        log("note: this CPU has no native bf16 (AVX512-BF16/AMX); bf16 rows will be slow")
    device = resolve_device(bc.device)
    machine = machine_info(device, bc.dtype)
    windows = make_windows(bc)
    flops_seq = training_flops_per_sequence(bc.cfg, bc.seq)
    runs: dict[str, list[RowResult]] = {name: [] for name in bc.rows}
    for round_ in range(bc.repeat):
        for name in bc.rows:
            tag = f" (round {round_ + 1}/{bc.repeat})" if bc.repeat > 1 else ""
            log(f"running {name} ({bc.warmup} warm-up + {bc.steps} timed micro-steps){tag}...")
            gc.collect()
            # each row makes the same initial weights afresh (same seed): no extra copy is held while it runs
            res = run_reference(bc, windows) if name == "reference" else run_pipeline(name, bc, windows)
            runs[name].append(res)
            gc.collect()
    results = [_pool(rs) for rs in runs.values()]
    ref_ms = next((r.ms_per_step for r in results if r.name == "reference"), None)
    rows = []
    for r in results:
        peak = machine.get(f"peak_tflops_{r.precision}", 0.0)
        tflops = flops_seq * bc.batch / (r.ms_per_step / 1e3) / 1e12
        rows.append(
            {
                "name": r.name,
                "precision": r.precision,
                "ms_per_step": r.ms_per_step,
                "tokens_per_s": bc.batch * bc.seq / (r.ms_per_step / 1e3),
                "tflops": tflops,
                "utilization": tflops / peak if peak else None,
                "io_ms": r.io_ms,
                "optimizer_ms": r.optimizer_ms,
                "peak_rss_mb": r.peak_rss_mb,
                "speedup_vs_reference": ref_ms / r.ms_per_step if ref_ms else None,
                "warmup_s": r.compile_s,
                "losses": r.losses,
                **r.extra,
            }
        )
    result = {
        "machine": machine,
        "config": {
            "model": bc.cfg.to_dict(),
            "batch": bc.batch,
            "seq": bc.seq,
            "accum": bc.accum,
            "steps": bc.steps,
            "warmup": bc.warmup,
            "repeat": bc.repeat,
            "fusion": bc.fusion,
            "dtype": bc.dtype,
            "seed": bc.seed,
            "lr": bc.lr,
            "flops_per_step": flops_seq * bc.batch,
        },
        "rows": rows,
    }
    result["loss_check"] = loss_check(rows, bc.dtype)
    return result


LOSS_TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 3e-2}


def loss_check(rows: list[dict[str, Any]], dtype: str) -> dict[str, Any] | None:
    """Does the optimized row's loss trajectory match the reference's? (max relative difference)"""
    by = {r["name"]: r for r in rows}
    if "reference" not in by or "optimized" not in by:
        return None
    a, c = by["reference"]["losses"], by["optimized"]["losses"]
    worst = max(abs(x - y) / abs(x) for x, y in zip(a, c, strict=True))
    tol = LOSS_TOLERANCE[dtype]
    return {"max_rel_diff": worst, "tolerance": tol, "ok": worst <= tol}


def format_table(result: dict[str, Any]) -> str:
    head = ["row", "prec", "ms/step", "tok/s", "TFLOPS", "util", "IO ms", "opt ms", "peak MB", "speedup"]
    lines = ["  ".join(f"{h:>9}" for h in head)]
    for r in result["rows"]:
        util = f"{100 * r['utilization']:.1f}%" if r["utilization"] is not None else "n/a"
        sp = f"{r['speedup_vs_reference']:.2f}x" if r["speedup_vs_reference"] is not None else "n/a"
        cells = [
            r["name"],
            r["precision"],
            f"{r['ms_per_step']:.1f}",
            f"{r['tokens_per_s']:,.0f}",
            f"{r['tflops']:.3f}",
            util,
            f"{r['io_ms']:.2f}",
            f"{r['optimizer_ms']:.1f}",
            f"{r['peak_rss_mb']:,.0f}",
            sp,
        ]
        lines.append("  ".join(f"{c:>9}" for c in cells))
    lc = result.get("loss_check")
    if lc:
        verdict = "OK" if lc["ok"] else "MISMATCH"
        lines.append(
            f"loss trajectory, optimized vs reference: max relative difference {lc['max_rel_diff']:.2e} "
            f"(tolerance {lc['tolerance']:.0e}): {verdict}"
        )
    return "\n".join(lines)


def write_json(result: dict[str, Any], path: str) -> None:
    atomic_write_text(path, json.dumps(result, indent=1))
