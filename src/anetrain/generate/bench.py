"""``anetrain bench --generate``: prefill and decode speed per precision and number of streams, and llama2.c's
run.c / runq.c on the same model file, in one run.

Rows: for each dtype (fp32, bf16, int8) and each stream count N, anetrain's decoder (the one ``anetrain
generate`` uses) runs, from BOS, greedy, ``steps`` positions of N streams; decode tok/s is run.c's
measure (positions after the first over the time after the first), all streams together. Prefill: one
forward pass over ``prompt`` random token ids (shown on the N = 1 rows). With ``--peer-runc`` /
``--peer-runq`` the compiled run.c / runq.c binaries run the same model (``-t 0 -n steps``) with
``OMP_NUM_THREADS`` = the thread count, and their printed "achieved tok/s" is the row. Rounds go over all
rows in turn (``repeat``), and each row reports its median, so a busy machine slows every row alike.

A preset model (stories15M, stories110M, ...) is random-initialized weights (``init_params(cfg, "llama2c",
seed)``) with the BOS row of the tied embedding zeroed: its logit is then exactly 0 in every precision while
the largest of the other 31,999 is positive, so greedy decoding never samples BOS and every row runs all its
positions (run.c stops at BOS). Peers get the model as llama2.c v0 (run.c) and v2 (runq.c) files, written to a
temporary directory unless the given model file already is one.

The JSON also holds the weight bytes each decode step reads, the bandwidth that implies, and the machine's
read bandwidth measured in-process (summing a 512 MiB tensor), for the per-token profile in BENCHMARKS.md.
"""

from __future__ import annotations

import os
import platform
import re
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..config import PRESETS, ModelConfig
from ..errors import AnetrainError, InputError
from ..formats import detect_format, load_model
from ..formats.llama2c import write_llama2c
from ..params import ModelParams, init_params
from ..telemetry.peak import _cpu_name
from .backend import make_decoder
from .native import native_status
from .weights import DecodeWeights, dtype_name


@dataclass
class GenBenchConfig:
    model: str = "stories110M"  # a preset name or a model file
    dtypes: tuple[str, ...] = ("fp32", "bf16", "int8")
    streams: tuple[int, ...] = (1, 8)
    steps: int = 256  # positions per run, BOS included (run.c's -n)
    prompt: int = 128  # prefill tokens
    repeat: int = 3
    threads: int | None = None
    backend: str = "auto"
    seed: int = 1337
    peer_runc: str | None = None
    peer_runq: str | None = None
    tokenizer: str | None = None
    bandwidth_mib: int = 512  # the tensor summed to measure the memory read bandwidth


@dataclass
class Row:
    name: str  # "anetrain", "run.c", "runq.c"
    dtype: str
    streams: int
    decode: list[float] = field(default_factory=list)  # tok/s, all streams, one per round
    prefill_ms: list[float] = field(default_factory=list)
    bytes_per_token: int = 0

    def summary(self, prompt: int) -> dict[str, Any]:
        dec = statistics.median(self.decode) if self.decode else 0.0
        pre = statistics.median(self.prefill_ms) if self.prefill_ms else None
        gbs = self.bytes_per_token * dec / self.streams / 1e9 if self.bytes_per_token else None
        return {
            "name": self.name,
            "dtype": self.dtype,
            "streams": self.streams,
            "decode_tokens_per_s": dec,
            "decode_tokens_per_s_per_stream": dec / self.streams,
            "decode_rounds": self.decode,
            "prefill_ms": pre,
            "prefill_tokens": prompt if pre is not None else None,
            "prefill_tokens_per_s": prompt / (pre / 1e3) if pre else None,
            "weight_bytes_per_step": self.bytes_per_token or None,
            "weight_gb_per_s": gbs,
        }


def _model_params(bc: GenBenchConfig) -> tuple[ModelParams, str | None, str]:
    """(float32 parameters, the model file if one was given, a description)."""
    if bc.model in PRESETS:
        cfg: ModelConfig = PRESETS[bc.model]
        params = init_params(cfg, "llama2c", bc.seed)
        bos = 1
        if cfg.tied_classifier and bos < cfg.vocab_size:
            params.embedding[bos].zero_()
        return params, None, f"{bc.model} (random init, seed {bc.seed}, BOS row zeroed)"
    path = Path(bc.model)
    if not path.exists():
        raise InputError(path, f"neither a model file nor a preset ({', '.join(PRESETS)})")
    return load_model(path).params, str(path), str(path)


def _weights(params: ModelParams, model_file: str | None, dtype: str) -> DecodeWeights:
    if dtype == "int8" and model_file is not None and detect_format(model_file) == "llama2c-v2":
        return DecodeWeights.from_llama2c_v2(model_file)
    return DecodeWeights.from_params(params, dtype)


def read_bandwidth_gbs(threads: int, mib: int = 512) -> float:
    """The machine's memory read bandwidth as torch sums a ``mib`` MiB float32 tensor (best of 3)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.ones(mib * 2**18, dtype=torch.float32)
        best = float("inf")
        for _ in range(4):
            t = time.perf_counter()
            float(x.sum())
            best = min(best, time.perf_counter() - t)
        return mib * 2**20 / best / 1e9
    finally:
        torch.set_num_threads(old)


def _time_prefill(dec: Any, cfg: ModelConfig, prompt: int, seed: int) -> float:
    tokens = np.random.default_rng(seed).integers(2, cfg.vocab_size, prompt).tolist()
    t = time.perf_counter()
    dec.forward(tokens, [0] * prompt, list(range(prompt)), [prompt - 1])
    return (time.perf_counter() - t) * 1e3


def _time_decode(dec: Any, n: int, steps: int) -> float:
    """run.c's measure for n greedy streams from BOS: tokens after the first over the time after the first."""
    states = np.arange(1, n + 1, dtype=np.uint64)
    streams = list(range(n))
    logits = dec.forward([1], [0], [0], [0])
    for s in streams[1:]:
        dec.copy_stream(0, s, 1)
    tokens = dec.sample(np.repeat(logits, n, axis=0), streams, 0.0, 0.9, 0, states)
    t = time.perf_counter()
    for pos in range(1, steps):
        tokens = dec.decode(tokens, streams, [pos] * n, 0.0, 0.9, 0, states)
    return n * (steps - 1) / (time.perf_counter() - t)


_ACHIEVED = re.compile(rb"achieved tok/s: ([0-9.]+)")


def run_peer(binary: str, model_file: str, tokenizer: str, steps: int, threads: int) -> float:
    """A compiled run.c / runq.c on ``model_file``, greedy, ``steps`` positions: its achieved tok/s."""
    cmd = [binary, model_file, "-z", tokenizer, "-t", "0", "-n", str(steps), "-s", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    try:
        proc = subprocess.run(cmd, capture_output=True, env=env, timeout=1800)
    except OSError as e:
        raise InputError(binary, f"cannot run ({e.strerror or e})") from None
    m = _ACHIEVED.search(proc.stderr)
    if proc.returncode != 0 or m is None:
        last = (proc.stderr.strip().splitlines() or [b"no output"])[-1].decode(errors="replace")
        raise InputError(binary, f"did not report its speed (exit {proc.returncode}): {last}")
    return float(m.group(1))


def run_generation_bench(bc: GenBenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    dtypes = tuple(dtype_name(d) for d in bc.dtypes)
    if bc.steps < 2 or bc.prompt < 1 or bc.repeat < 1 or any(n < 1 for n in bc.streams):
        raise AnetrainError("--gen-steps must be >= 2, --gen-prompt, --repeat and every stream count >= 1")
    if (bc.peer_runc or bc.peer_runq) and not bc.tokenizer:
        raise AnetrainError("--peer-runc/--peer-runq need --tokenizer (the tokenizer.bin the peers read)")
    threads = bc.threads or torch.get_num_threads()
    params, model_file, described = _model_params(bc)
    cfg = params.cfg
    steps = min(bc.steps, cfg.seq_len)
    prompt = min(bc.prompt, cfg.seq_len)
    ok, features = native_status()
    log(f"model {described}: {cfg.shape_line()}; native kernels: {features}")

    weights = {d: _weights(params, model_file, d) for d in dtypes}
    rows = [
        Row("anetrain", d, n, bytes_per_token=weights[d].bytes_per_token())
        for d in dtypes
        for n in bc.streams
    ]
    with tempfile.TemporaryDirectory(prefix="anetrain-bench-") as tmp:
        peers: list[tuple[Row, str, str]] = []
        fmt = detect_format(model_file) if model_file else None
        if bc.peer_runc:
            v0 = model_file if fmt == "llama2c-v0" else os.path.join(tmp, "model.v0.bin")
            if v0 != model_file:
                write_llama2c(v0, params, 0)
            fp32_bytes = DecodeWeights.from_params(params, "fp32").bytes_per_token()
            peers.append((Row("run.c", "fp32", 1, bytes_per_token=fp32_bytes), bc.peer_runc, v0))
        if bc.peer_runq:
            v2 = model_file if fmt == "llama2c-v2" else os.path.join(tmp, "model.v2.bin")
            if v2 != model_file:
                write_llama2c(v2, params, 2)
            q = weights["int8"] if "int8" in weights else DecodeWeights.from_params(params, "int8")
            peers.append((Row("runq.c", "int8", 1, bytes_per_token=q.bytes_per_token()), bc.peer_runq, v2))
        for round_ in range(bc.repeat):
            for row in rows:
                dec = make_decoder(weights[row.dtype], row.streams, max(steps, prompt), bc.backend, threads)
                if row.streams == 1:
                    row.prefill_ms.append(_time_prefill(dec, cfg, prompt, bc.seed + round_))
                row.decode.append(_time_decode(dec, row.streams, steps))
                log(
                    f"round {round_ + 1}/{bc.repeat}: anetrain {row.dtype} x{row.streams}: "
                    f"{row.decode[-1]:.1f} tok/s"
                )
                del dec
            for row, binary, path in peers:
                row.decode.append(run_peer(binary, path, str(bc.tokenizer), steps, threads))
                log(f"round {round_ + 1}/{bc.repeat}: {row.name}: {row.decode[-1]:.1f} tok/s")
    all_rows = rows + [r for r, _, _ in peers]
    summaries = [r.summary(prompt) for r in all_rows]
    by = {(s["name"], s["dtype"], s["streams"]): s for s in summaries}
    runc = by.get(("run.c", "fp32", 1))
    runq = by.get(("runq.c", "int8", 1))
    for s in summaries:
        s["vs_runc"] = s["decode_tokens_per_s"] / runc["decode_tokens_per_s"] if runc else None
        s["vs_runq"] = s["decode_tokens_per_s"] / runq["decode_tokens_per_s"] if runq else None
    machine = {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "anetrain": __version__,
        "native": features if ok else None,
        "read_bandwidth_gbs": read_bandwidth_gbs(threads, bc.bandwidth_mib),
    }
    return {
        "machine": machine,
        "config": {
            "model": described,
            "shape": cfg.to_dict(),
            "steps": steps,
            "prompt": prompt,
            "repeat": bc.repeat,
            "dtypes": list(dtypes),
            "streams": list(bc.streams),
            "backend": bc.backend,
            "peer_runc": bc.peer_runc,
            "peer_runq": bc.peer_runq,
            "bandwidth_mib": bc.bandwidth_mib,
        },
        "rows": summaries,
        "targets": targets(by),
    }


def targets(by: dict[tuple[str, str, int], dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets as ratios measured in this run (only those whose rows ran)."""

    def rate(name: str, dtype: str, n: int) -> float | None:
        s = by.get((name, dtype, n))
        return s["decode_tokens_per_s"] if s else None

    out = []
    checks = [
        ("fp32 >= run.c", rate("anetrain", "fp32", 1), rate("run.c", "fp32", 1), 1.0),
        ("bf16 >= 1.5x run.c", rate("anetrain", "bf16", 1), rate("run.c", "fp32", 1), 1.5),
        ("int8 >= runq.c", rate("anetrain", "int8", 1), rate("runq.c", "int8", 1), 1.0),
        ("int8 >= 2x run.c", rate("anetrain", "int8", 1), rate("run.c", "fp32", 1), 2.0),
        ("fp32 8 streams >= 4x 1 stream", rate("anetrain", "fp32", 8), rate("anetrain", "fp32", 1), 4.0),
    ]
    for name, a, b, want in checks:
        if a is not None and b:
            out.append({"target": name, "ratio": a / b, "needed": want, "met": a / b >= want})
    return out


def format_generation_table(result: dict[str, Any]) -> str:
    head = ["row", "dtype", "streams", "prefill ms", "prefill tok/s", "decode tok/s", "per stream",
            "MB/step", "GB/s", "vs run.c", "vs runq.c"]  # fmt: skip
    lines = ["  ".join(f"{h:>13}" for h in head)]

    def f(v: float | None, spec: str, suffix: str = "") -> str:
        return "-" if v is None else f"{v:{spec}}{suffix}"

    for r in result["rows"]:
        cells = [
            r["name"],
            r["dtype"],
            str(r["streams"]),
            f(r["prefill_ms"], ".1f"),
            f(r["prefill_tokens_per_s"], ",.0f"),
            f(r["decode_tokens_per_s"], ",.1f"),
            f(r["decode_tokens_per_s_per_stream"], ",.1f"),
            f(r["weight_bytes_per_step"] and r["weight_bytes_per_step"] / 1e6, ".1f"),
            f(r["weight_gb_per_s"], ".1f"),
            f(r["vs_runc"], ".2f", "x"),
            f(r["vs_runq"], ".2f", "x"),
        ]
        lines.append("  ".join(f"{c:>13}" for c in cells))
    m = result["machine"]
    lines.append(
        f"memory read bandwidth (torch sum of {result['config']['bandwidth_mib']} MiB, "
        f"{m['threads']} threads): "
        f"{m['read_bandwidth_gbs']:.1f} GB/s"
    )
    for t in result["targets"]:
        verdict = "met" if t["met"] else "NOT met"
        lines.append(f"target {t['target']}: {t['ratio']:.2f}x (needs {t['needed']:g}x): {verdict}")
    return "\n".join(lines)
