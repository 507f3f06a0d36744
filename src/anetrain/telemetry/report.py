"""The Efficiency Report: the original trainer's end-of-run summary (docs/original.md section 8), on any
device.

For a data-parallel job (``world_size`` > 1) the figures are the job's: tokens and FLOPs of all ranks, timed
on rank 0, with the utilization against ``world_size`` devices' peak. It adds the all-reduce time per step
(``allreduce_ms_per_step``: how long the trainer waited for the gradient all-reduce and the step's small
reductions, i.e. the communication the backward did not hide; ``allreduce_total_ms_per_step``: from the first
bucket's launch until the trainer holds all of them, hidden or not) and the scaling efficiency::

    scaling_efficiency = job tokens/s / (world_size * tokens/s of one rank computing alone)
                       = (train time - exposed all-reduce time) / train time

where one rank's compute-alone speed is taken as its step time without the exposed communication. It does
not see the slowdown of ranks that share a machine's cores, memory bandwidth or PCIe links (compare
``tokens_per_s`` with a 1-process run for that), nor CPU time gloo's threads take from the compute.
"""

from __future__ import annotations

from typing import Any

from ..timing import PHASES


def build_report(
    *,
    total_steps: int,
    wall_s: float,
    compile_s: float,
    train_s: float,
    phase_ms: dict[str, float],
    tokens: int,
    flops: float,
    peak_tflops: float,
    best_val_loss: float | None,
    final_loss: float | None,
    world_size: int = 1,
    global_batch: int | None = None,
    allreduce_ms: float = 0.0,
    allreduce_total_ms: float = 0.0,
    loss_compacted: bool = False,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Aggregate a run (or the steps this process ran, with cumulative counters carried across resumes).

    ``allreduce_ms`` / ``allreduce_total_ms``: cumulative exposed / total all-reduce ms over the timed steps;
    ``global_batch``: sequences per optimizer step over all ranks (ranks x batch x accum).
    """
    steps = max(1, total_steps)
    world = max(1, world_size)
    peak_job = peak_tflops * world
    ms_per_step = train_s * 1e3 / steps
    opt_ms = phase_ms.get("optimizer", 0.0) / steps
    tflops = flops / train_s / 1e12 if train_s > 0 else 0.0
    rep: dict[str, Any] = {
        "total_steps": total_steps,
        "wall_s": wall_s,
        "compile_s": compile_s,
        "train_s": train_s,
        "ms_per_step": ms_per_step,
        "ms_per_step_no_opt": ms_per_step - opt_ms,
        "tokens": tokens,
        "tokens_per_s": tokens / train_s if train_s > 0 else 0.0,
        "tflops": tflops,
        "peak_tflops": peak_tflops,
        "utilization": tflops / peak_job if peak_job > 0 else 0.0,
        "io_ms_per_step": phase_ms.get("io", 0.0) / steps,
        "optimizer_ms_per_step": opt_ms,
        "phases_ms_per_step": {
            p: phase_ms.get(p, 0.0) / steps
            for p in (*PHASES, *sorted(k for k in phase_ms if k not in PHASES))
        },
        "best_val_loss": best_val_loss,
        "final_loss": final_loss,
        "world_size": world_size,
        "global_batch": global_batch,
        "allreduce_ms_per_step": allreduce_ms / steps,
        "allreduce_total_ms_per_step": allreduce_total_ms / steps,
        "scaling_efficiency": max(0.0, 1.0 - allreduce_ms / (train_s * 1e3)) if train_s > 0 else 1.0,
        "loss_compacted": loss_compacted,
    }
    rep.update(extra or {})
    return rep


def format_report(rep: dict[str, Any]) -> str:
    """The report as text, one field per line, in the original's order."""
    wall = rep["wall_s"] or 1e-9
    phases = ", ".join(f"{k} {v:.1f}" for k, v in rep["phases_ms_per_step"].items())
    ane = rep["phases_ms_per_step"].get("ane")
    lines = [
        "=== Efficiency Report ===",
        f"Total steps:     {rep['total_steps']}  ({rep['tokens']:,} tokens, world size {rep['world_size']})",
        f"Wall time:       {rep['wall_s']:.1f} s",
        f"Compile time:    {rep['compile_s']:.1f} s ({100 * rep['compile_s'] / wall:.1f}%)",
        f"Train time:      {rep['train_s']:.1f} s ({100 * rep['train_s'] / wall:.1f}%)",
        f"Avg train:       {rep['ms_per_step']:.1f} ms/step "
        f"({rep['ms_per_step_no_opt']:.1f} ms/step without the optimizer)",
        f"Throughput:      {rep['tokens_per_s']:,.0f} tokens/s",
        f"Model TFLOPS:    {rep['tflops']:.3f} sustained",
        (
            f"Utilization:     {100 * rep['utilization']:.1f}% of the measured peak "
            f"{rep['peak_tflops']:.3f} TFLOPS"
            + (f" x {rep['world_size']} devices" if rep.get("world_size", 1) > 1 else "")
            if rep["peak_tflops"]
            else "Utilization:     n/a (no peak known for this backend; pass --peak-tflops)"
        ),
        *([f"ANE:             {ane:.2f} ms/step in the Neural Engine programs"] if ane else []),
        f"IO:              {rep['io_ms_per_step']:.2f} ms/step",
        f"Optimizer:       {rep['optimizer_ms_per_step']:.2f} ms/step",
        f"Phases (ms/step): {phases}",
    ]
    if rep.get("world_size", 1) > 1:
        lines.append(
            f"Data parallel:   {rep['world_size']} ranks, global batch {rep.get('global_batch')} "
            "sequences per step"
        )
        lines.append(
            f"All-reduce:      {rep.get('allreduce_ms_per_step', 0.0):.2f} ms/step waited "
            f"({rep.get('allreduce_total_ms_per_step', 0.0):.2f} ms/step in flight)"
        )
        lines.append(
            f"Scaling eff.:    {100 * rep.get('scaling_efficiency', 0.0):.0f}% (job tokens/s over world "
            "size x one rank's tokens/s without the waited communication)"
        )
    if rep.get("best_val_loss") is not None:
        comp = " (compacted vocabulary)" if rep.get("loss_compacted") else ""
        lines.append(f"Best val loss:   {rep['best_val_loss']:.4f}{comp}")
    if rep.get("final_loss") is not None:
        comp = " (compacted vocabulary)" if rep.get("loss_compacted") else ""
        lines.append(f"Final loss:      {rep['final_loss']:.4f}{comp}")
    return "\n".join(lines)
