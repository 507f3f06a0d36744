"""``anetrain bench --finetune``: fine-tuning a pretrained-sized model, anetrain against transformers + peft.

The model is a Qwen3-0.6B-sized one by default (the ``qwen3-0.6b`` preset: the real architecture, QK-norm
included, with random weights: nothing is downloaded). Rows (``--rows``):

* ``hf-lora``: the usual way: transformers' ``Qwen3ForCausalLM`` (``LlamaForCausalLM`` for a model without
  QK-norm) with bf16 weights, peft's LoRA on every projection (q/k/v/o/gate/up/down), autograd under
  ``torch.autocast(bf16)``, ``torch.optim.AdamW(fused=True)`` on the adapters.
* ``lora``: anetrain's optimized pipeline, the base frozen in bf16, the same adapters (same initial A, B = 0).
* ``hf-full``: transformers with float32 master weights, autocast bf16, fused AdamW on every weight (what
  HF's Trainer does with ``bf16=True``).
* ``full``: anetrain's optimized pipeline, full fine-tuning (fp32 master, bf16 compute).

Every row starts from the same weights (anetrain's init, converted to HF's layout for the transformers rows)
and trains on the same random token windows, one optimizer step per micro-batch, with global-norm clipping.
**Each row runs in a fresh process**, so its peak resident memory is its own (not inherited from the rows
before it): ``peak MB`` is the highest RSS sampled during its steps, ``max MB`` the process's lifetime peak
(getrusage), which includes building the model. ``ms/step`` is the median of the timed steps (pooled over
``repeat`` rounds), ``min ms`` the fastest one: on a machine shared with other work, the least disturbed.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .config import ModelConfig
from .errors import AnetrainError

ROWS = ("hf-lora", "lora", "hf-full", "full")
#: which transformers row each anetrain row is compared with
PAIRS = {"lora": "hf-lora", "full": "hf-full"}


@dataclass
class FinetuneConfig:
    cfg: ModelConfig
    batch: int = 1
    seq: int = 512
    steps: int = 5  # timed steps
    warmup: int = 2
    rank: int = 16
    alpha: float = 32.0
    rows: tuple[str, ...] = ROWS
    seed: int = 1337
    lr: float = 1e-4
    clip: float = 1.0
    threads: int | None = None
    repeat: int = 1  # rounds over the rows, round-robin, each row a fresh process every round; steps pooled


@dataclass
class FinetuneRow:
    name: str
    ms_per_step: float
    step_ms: list[float]
    losses: list[float]
    peak_rss_mb: float
    max_rss_mb: float
    build_s: float
    trainable: int
    extra: dict[str, Any] = field(default_factory=dict)


def _windows(fc: FinetuneConfig) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(fc.seed)
    n = fc.warmup + fc.steps
    return [torch.randint(0, fc.cfg.vocab_size, (fc.batch, fc.seq + 1), generator=g) for _ in range(n)]


def _lora_config(fc: FinetuneConfig) -> Any:
    from .lora import TARGETS, LoraConfig

    return LoraConfig(fc.rank, fc.alpha, TARGETS)


def _timed(fc: FinetuneConfig, step: Any) -> tuple[list[float], list[float], float]:
    """Run warm-up and timed steps under the RSS sampler: (step ms, losses, peak RSS bytes)."""
    from .bench import _RssSampler

    windows = _windows(fc)
    ms, losses = [], []
    with _RssSampler() as rss:
        for i, w in enumerate(windows):
            t0 = time.perf_counter()
            losses.append(step(w))
            if i >= fc.warmup:
                ms.append((time.perf_counter() - t0) * 1e3)
    return ms, losses, float(rss.peak)


# ---- anetrain rows -------------------------------------------------------------------------------------
def _row_anetrain(fc: FinetuneConfig, lora: bool) -> FinetuneRow:
    from .lora import init_lora
    from .optim import AdamW, OptimizerConfig, clip_divisor, global_grad_norm
    from .params import init_params
    from .pipeline_factory import PipelineChoice, make_pipeline

    t0 = time.perf_counter()
    adapters = init_lora(fc.cfg, _lora_config(fc), fc.seed) if lora else None
    choice = PipelineChoice(pipeline="optimized", backend="cpu", dtype="bf16")
    pipe = make_pipeline(init_params(fc.cfg, "llama2c", fc.seed), choice, lora=adapters)
    gc.collect()
    opt = AdamW(pipe.params, OptimizerConfig.for_kind("adamw", lr=fc.lr, warmup=0, total_steps=10**9))
    build_s = time.perf_counter() - t0

    def step(w: torch.Tensor) -> float:
        pipe.zero_grad()
        loss = pipe.forward_backward(w)
        norm = global_grad_norm(pipe.grads)
        opt.step(pipe.grads, fc.lr, clip_divisor(norm, fc.clip))
        pipe.after_update()
        return loss

    ms, losses, peak = _timed(fc, step)
    phases = {k: v / len(losses) for k, v in pipe.times.reset().items()}
    pipe.close()
    return FinetuneRow(
        "lora" if lora else "full",
        statistics.median(ms),
        ms,
        losses,
        peak / 2**20,
        _max_rss_mb(),
        build_s,
        pipe.params.numel(),
        {"phases_ms_per_step": phases},
    )


# ---- transformers rows ---------------------------------------------------------------------------------
def _hf_model(fc: FinetuneConfig, dtype: torch.dtype) -> Any:
    """transformers' model of the config with anetrain's initial weights (HF layout), in ``dtype``."""
    import transformers

    from .formats.hf import hf_config, hf_name, to_hf_layout
    from .params import init_params

    cfg = fc.cfg
    conf = hf_config(cfg)
    conf.pop("architectures")
    kind = conf.pop("model_type")
    conf.pop("torch_dtype", None)
    conf.pop("rope_scaling", None)
    conf.pop("rope_theta", None)
    conf_cls = transformers.Qwen3Config if kind == "qwen3" else transformers.LlamaConfig
    model_cls = transformers.Qwen3ForCausalLM if kind == "qwen3" else transformers.LlamaForCausalLM
    with torch.device("meta"):
        model = model_cls(conf_cls(**conf))
    params = init_params(cfg, "llama2c", fc.seed)
    state = {hf_name(n): to_hf_layout(n, t, cfg).to(dtype) for n, t in params.named()}
    del params
    if cfg.tied_classifier:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, assign=True, strict=True)
    if cfg.tied_classifier:
        model.tie_weights()
    # the buffers made on the meta device (RoPE's inverse frequencies): a rotary embedding made on the CPU
    model.model.rotary_emb = type(model.model.rotary_emb)(model.config)
    del state
    gc.collect()
    return model


def _row_hf(fc: FinetuneConfig, lora: bool) -> FinetuneRow:
    t0 = time.perf_counter()
    model = _hf_model(fc, torch.bfloat16 if lora else torch.float32)
    if lora:
        import peft

        from .formats.peft import HF_MODULES
        from .lora import adapter_name, init_lora

        lc = _lora_config(fc)
        pc = peft.LoraConfig(
            r=lc.rank,
            lora_alpha=lc.alpha,
            lora_dropout=0.0,
            target_modules=[HF_MODULES[t].split(".")[1] for t in lc.targets],
            bias="none",
            task_type="CAUSAL_LM",
        )
        model = peft.get_peft_model(model, pc)  # adapters in float32 (peft's autocast_adapter_dtype)
        ours = init_lora(fc.cfg, lc, fc.seed)  # the same initial A as the anetrain row (B = 0 in both)
        with torch.no_grad():
            for layer in range(fc.cfg.n_layers):
                for t in lc.targets:
                    mod = model.get_submodule(f"base_model.model.model.layers.{layer}.{HF_MODULES[t]}")
                    mod.lora_A["default"].weight.copy_(ours[adapter_name(layer, t, "A")])
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=fc.lr, betas=(0.9, 0.95), fused=True)
    model.train()
    build_s = time.perf_counter() - t0

    def step(w: torch.Tensor) -> float:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=w[:, :-1], labels=None)
            logits = out.logits
            loss = torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1)
            )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, fc.clip)
        opt.step()
        return float(loss.detach())

    ms, losses, peak = _timed(fc, step)
    n = sum(p.numel() for p in trainable)
    return FinetuneRow(
        "hf-lora" if lora else "hf-full",
        statistics.median(ms),
        ms,
        losses,
        peak / 2**20,
        _max_rss_mb(),
        build_s,
        n,
    )


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_row(fc: FinetuneConfig, name: str) -> FinetuneRow:
    """One row, in this process."""
    if fc.threads:
        torch.set_num_threads(fc.threads)
    if name in ("lora", "full"):
        return _row_anetrain(fc, name == "lora")
    if name in ("hf-lora", "hf-full"):
        return _row_hf(fc, name == "hf-lora")
    raise AnetrainError(f"unknown fine-tuning bench row {name!r} (known: {', '.join(ROWS)})")


def _child(fc: FinetuneConfig, name: str, conn: Any) -> None:
    try:
        conn.send(("ok", asdict(run_row(fc, name))))
    except BaseException as e:  # reported by the parent as one line
        conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


def run_finetune_bench(fc: FinetuneConfig, log: Any = print) -> dict[str, Any]:
    """Every row in a fresh process, one after another; the results with their ratios."""
    for r in fc.rows:
        if r not in ROWS:
            raise AnetrainError(f"unknown fine-tuning bench row {r!r} (known: {', '.join(ROWS)})")
    if any(r.startswith("hf-") for r in fc.rows):
        for mod, extra in (("transformers", "hf"), ("peft", "test")):
            if mod == "peft" and "hf-lora" not in fc.rows:
                continue
            try:
                __import__(mod)
            except ImportError:
                raise AnetrainError(
                    f"the {mod} row needs {mod} (pip install anetrain[{extra}]); or leave it out with --rows"
                ) from None
    ctx = mp.get_context("spawn")
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in fc.rows}
    for round_ in range(fc.repeat):
        for name in fc.rows:
            tag = f" (round {round_ + 1}/{fc.repeat})" if fc.repeat > 1 else ""
            log(f"running {name} in a fresh process ({fc.warmup} warm-up + {fc.steps} timed steps){tag}...")
            parent, child = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_child, args=(fc, name, child))
            proc.start()
            child.close()
            try:
                status, payload = parent.recv()
            except EOFError:
                status, payload = "error", f"the process ended with status {proc.exitcode} (out of memory?)"
            proc.join()
            if status != "ok":
                raise AnetrainError(f"bench row {name}: {payload}")
            runs[name].append(payload)
    rows = {name: _pool(rs) for name, rs in runs.items()}
    from .telemetry.flops import training_flops_per_sequence

    out_rows = []
    for name, r in rows.items():
        lora = _lora_config(fc) if name in ("lora", "hf-lora") else None
        flops = training_flops_per_sequence(fc.cfg, fc.seq, None, lora) * fc.batch
        other = rows.get(PAIRS.get(name, ""))
        out_rows.append(
            {
                **{k: v for k, v in r.items() if k not in ("step_ms",)},
                "min_ms": min(r["step_ms"]),
                "min_ratio_vs_hf": min(other["step_ms"]) / min(r["step_ms"]) if other else None,
                "tokens_per_s": fc.batch * fc.seq / (r["ms_per_step"] / 1e3),
                "tflops": flops / (r["ms_per_step"] / 1e3) / 1e12,
                "speedup_vs_hf": other["ms_per_step"] / r["ms_per_step"] if other else None,
                "memory_vs_hf": r["peak_rss_mb"] / other["peak_rss_mb"] if other else None,
                "step_ms": r["step_ms"],
            }
        )
    check = None
    if "lora" in rows and "hf-lora" in rows:
        a, b = rows["hf-lora"]["losses"], rows["lora"]["losses"]
        worst = max(abs(x - y) / abs(x) for x, y in zip(a, b, strict=True))
        check = {"max_rel_diff": worst, "tolerance": 3e-2, "ok": worst <= 3e-2}
    return {
        "config": {
            "model": fc.cfg.to_dict(),
            "batch": fc.batch,
            "seq": fc.seq,
            "steps": fc.steps,
            "warmup": fc.warmup,
            "lora_rank": fc.rank,
            "lora_alpha": fc.alpha,
            "seed": fc.seed,
            "lr": fc.lr,
            "threads": fc.threads or torch.get_num_threads(),
            "repeat": fc.repeat,
            "python": sys.version.split()[0],
            "torch": torch.__version__,
        },
        "rows": out_rows,
        "loss_check": check,
    }


def _pool(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from its rounds: the median over all their timed steps, the highest memory; losses, build
    time and phases from the first round (the losses are the same every round)."""
    first = dict(runs[0])
    first["step_ms"] = [ms for r in runs for ms in r["step_ms"]]
    first["ms_per_step"] = statistics.median(first["step_ms"])
    first["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    first["max_rss_mb"] = max(r["max_rss_mb"] for r in runs)
    return first


def format_finetune_table(result: dict[str, Any]) -> str:
    head = [
        "row",
        "ms/step",
        "min ms",
        "tok/s",
        "TFLOPS",
        "trainable",
        "peak MB",
        "max MB",
        "vs hf",
        "mem vs hf",
    ]
    lines = ["  ".join(f"{h:>10}" for h in head)]
    for r in result["rows"]:
        sp = f"{r['speedup_vs_hf']:.2f}x" if r["speedup_vs_hf"] is not None else "-"
        mem = f"{r['memory_vs_hf']:.2f}" if r["memory_vs_hf"] is not None else "-"
        cells = [
            r["name"],
            f"{r['ms_per_step']:.0f}",
            f"{r['min_ms']:.0f}",
            f"{r['tokens_per_s']:,.0f}",
            f"{r['tflops']:.3f}",
            f"{r['trainable'] / 1e6:.2f}M",
            f"{r['peak_rss_mb']:,.0f}",
            f"{r['max_rss_mb']:,.0f}",
            sp,
            mem,
        ]
        lines.append("  ".join(f"{c:>10}" for c in cells))
    mins = [f"{r['name']} {r['min_ratio_vs_hf']:.2f}x" for r in result["rows"] if r["min_ratio_vs_hf"]]
    if mins:
        lines.append(
            "ms/step is the median of the timed steps; on a machine shared with other work the fastest step "
            f"(min ms) is the least disturbed one; ratio of the fastest steps: {', '.join(mins)}"
        )
    lc = result.get("loss_check")
    if lc:
        verdict = "OK" if lc["ok"] else "MISMATCH"
        lines.append(
            f"loss trajectory, lora vs hf-lora: max relative difference {lc['max_rel_diff']:.2e} "
            f"(tolerance {lc['tolerance']:.0e}): {verdict}"
        )
    return "\n".join(lines)
