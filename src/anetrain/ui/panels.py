"""The dashboard's panel contents as plain functions of the run state: text in, text out.

Kept apart from the textual app so each panel can be read, tested and reused (e.g. for a one-shot
``--screenshot``) without an event loop. Every function takes the available width (and height) in cells
and never fails on missing data: absent numbers show as n/a.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from rich.text import Text

from . import fmt
from .charts import ChartMark, ChartSeries, hbar, line_chart, spark
from .state import PHASES, RunState, number

TRAIN_STYLE = "bright_cyan"
VAL_STYLE = "bright_magenta"
BEST_STYLE = "bold bright_green"
HISTORY = 300  # samples kept per system chart (5 minutes at 1 Hz)


@dataclass
class SystemView:
    """What the system sampler has seen: recent CPU %, memory and power, and where each came from."""

    cpu: deque[float] = field(default_factory=lambda: deque(maxlen=HISTORY))
    rss_mb: deque[float] = field(default_factory=lambda: deque(maxlen=HISTORY))
    power_w: deque[float] = field(default_factory=lambda: deque(maxlen=HISTORY))
    power_detail: dict[str, float] = field(default_factory=dict)
    power_source: str = "n/a"
    process: str = ""  # e.g. "pid 1234"; empty when the trainer is not running


def header(state: RunState, run_name: str, status: Text) -> Text:
    """Two lines: the run, its status and what is trained; then the model's shape and how it is trained."""
    run = state.run or {}
    model = run.get("model") if isinstance(run.get("model"), dict) else {}
    t = Text()
    t.append("anetrain ", "bold")
    t.append(run_name, "bold bright_white")
    t.append("  ")
    t.append_text(status)
    if not run:
        t.append("\nwaiting for the run to start", "dim")
        return t
    t.append(f"  {run.get('model_name') or model.get('name') or 'model'}", "bold bright_cyan")
    params = number(run.get("params"))
    if params is not None:
        t.append(f" {fmt.si(params)} params", "bold")
    t.append(
        f"  {run.get('pipeline', '?')} on {run.get('backend', '?')}, {run.get('precision', '?')}", "bold"
    )
    t.append("\n")
    if model:
        kv = model.get("n_kv_heads")
        heads = f"{model.get('n_heads')}" + (f"/{kv}kv" if kv not in (None, model.get("n_heads")) else "")
        t.append(
            f"dim {model.get('dim')} hidden {model.get('hidden_dim')} layers {model.get('n_layers')} "
            f"heads {heads} vocab {model.get('vocab_size')} seq {model.get('seq_len')}  "
        )
    t.append(f"batch {run.get('batch')} × seq {run.get('seq')} × accum {run.get('accum')}")
    if (number(run.get("world_size")) or 1) > 1:
        t.append(f" × {run.get('world_size')} ranks")
    tps = number(run.get("tokens_per_step"))
    if tps is not None:
        t.append(f" ({fmt.si(tps)} tok/step)")
    lr = number(run.get("lr"))
    if lr is not None:
        t.append(f"  lr {lr:.2e}")
        min_lr = number(run.get("min_lr"))
        if min_lr is not None:
            t.append(f"→{min_lr:.1e}")
    if run.get("optimizer"):
        t.append(f" {run['optimizer']}")
    if run.get("compact_vocab"):
        t.append(f"  compact vocab {run['compact_vocab']}")
    return t


def _row(t: Text, label: str, value: str, extra: str = "", width: int = 80, style: str = "bold") -> None:
    t.append(f"{label:<9}", "dim")
    if width >= 44 and extra:
        t.append(f"{value:<17}", style)
        t.append(f" {extra}")
    else:
        t.append(value, style)
    t.append("\n")


def stats(state: RunState, width: int = 80) -> Text:
    """Step/total with ETA, losses, speed, FLOPs, learning rate, compile and elapsed time."""
    t = Text(no_wrap=True, overflow="ellipsis")
    step, total = state.step, state.total_steps
    if state.last_step is None:
        t.append("no steps yet\n", "dim")
    frac = f" ({step / total:.1%})" if total else ""
    eta = "done" if state.complete else "stopped" if state.finished else fmt.duration(state.eta_s())
    _row(t, "step", f"{step}/{total if total is not None else '?'}{frac}", f"ETA {eta}", width)
    best = state.best_train
    best_s = f"best {fmt.num(best.value)} @{best.step}" if best.value is not None else "best n/a"
    _row(t, "loss", fmt.num(state.latest("loss")), best_s, width)
    if state.last_eval is not None:
        bv = state.best_val
        _row(
            t,
            "val",
            f"{fmt.num(number(state.last_eval.get('val_loss')))} @{state.last_eval.get('step')}",
            f"best {fmt.num(bv.value)} @{bv.step}",
            width,
        )
    else:
        _row(t, "val", "n/a", "no eval yet", width, style="dim")
    ms = state.ms_per_step()
    sps = state.seconds_per_step()
    _row(t, "ms/step", fmt.num(ms, ".1f"), f"steps/s {fmt.num(1 / sps if sps else None, '.2f')}", width)
    tokens = state.latest("tokens")
    _row(t, "tokens/s", fmt.si(state.latest("tokens_per_s")), f"tokens {fmt.si(tokens)}", width)
    peak = number((state.run or {}).get("peak_tflops"))
    _row(
        t,
        "TFLOPS",
        fmt.num(state.latest("tflops"), ".3f"),
        f"util {fmt.percent(state.latest('utilization'))}" + (f" of {peak:.3g} peak" if peak else ""),
        width,
    )
    lr = state.latest("lr")
    _row(
        t,
        "lr",
        f"{lr:.3e}" if lr is not None else fmt.NA,
        f"grad norm {fmt.num(state.latest('grad_norm'), '.3f')}",
        width,
    )
    elapsed = state.train_loss.wall_s[-1] if len(state.train_loss) else None
    _row(
        t,
        "compile",
        fmt.duration(state.compile_s) if state.compile_s else fmt.NA,
        f"elapsed {fmt.duration(elapsed)}",
        width,
    )
    scale = state.latest("loss_scale")
    if scale is not None:
        _row(t, "scale", f"{scale:g}", "skipped" if (state.last_step or {}).get("skipped") else "", width)
    ckpt = state.last_checkpoint
    if ckpt is not None:
        _row(t, "ckpt", f"step {ckpt.get('step')}", str(ckpt.get("kind", "")), width, style="")
    t.rstrip()
    return t


def loss_chart(state: RunState, width: int, height: int) -> Text:
    """Training (per step) and validation loss, the best of each marked."""
    if not len(state.train_loss) and not len(state.val_loss):
        return Text("waiting for the first step…", style="dim")
    series = [ChartSeries(state.train_loss.step, state.train_loss.value, TRAIN_STYLE)]
    marks = []
    if len(state.val_loss):
        series.append(ChartSeries(state.val_loss.step, state.val_loss.value, VAL_STYLE))
    best = state.best_val if state.best_val.value is not None else state.best_train
    if best.value is not None and best.step is not None:
        marks.append(ChartMark(best.step, best.value, "●", BEST_STYLE))
    return line_chart(series, width, height, marks)


def loss_legend(state: RunState) -> Text:
    """The chart's key: train, val and where the best loss is."""
    t = Text()
    t.append("━ train ", TRAIN_STYLE)
    if len(state.val_loss):
        t.append("━ val ", VAL_STYLE)
    best, which = (state.best_val, "val") if state.best_val.value is not None else (state.best_train, "train")
    if best.value is not None:
        t.append(f"● best {which} {best.value:.4f} @{best.step}", BEST_STYLE)
    return t


def phases(state: RunState, width: int) -> Text:
    """One bar per phase: recent mean ms, scaled to the slowest phase, with its share of the step."""
    means = state.mean_phases()
    if not means:
        return Text("no phase timings yet", style="dim")
    total = sum(means.values())
    biggest = max(means.values())
    bar_w = max(4, width - 12 - 17)
    t = Text(no_wrap=True, overflow="ellipsis")
    for name in PHASES:
        if name not in means:
            continue
        ms = means[name]
        t.append(f"{name:<12}", "bold")
        t.append(hbar(ms, biggest, bar_w), "yellow")
        t.append(f" {ms:8.1f} ms {ms / total if total else 0:4.0%}\n")
    t.rstrip()
    return t


def system(view: SystemView, state: RunState, width: int) -> Text:
    """CPU %, memory and power, each with a sparkline of its recent history."""
    t = Text(no_wrap=True, overflow="ellipsis")
    chart_w = max(0, width - 24)
    if view.cpu:
        t.append(f"{'CPU':<7}{view.cpu[-1]:>7.0f}%  ", "bold")
        t.append(spark(list(view.cpu), chart_w, 0.0, max(100.0, max(view.cpu))), "green")
    else:
        t.append(f"{'CPU':<7}{fmt.NA:>8}  ", "bold")
        t.append("trainer not running", "dim")
    t.append("\n")
    mem = list(view.rss_mb) or list(state.rss_mb.value[-HISTORY:])
    if mem:
        t.append(f"{'RSS':<7}{mem[-1]:>6.0f} MB  ", "bold")
        note = "" if view.rss_mb else " (from metrics)"
        t.append(spark(mem, max(0, chart_w - len(note)), 0.0), "blue")
        t.append(note, "dim")
    else:
        t.append(f"{'RSS':<7}{fmt.NA:>8}", "bold")
    t.append("\n")
    if view.power_w:
        detail = " ".join(f"{k} {v:.1f}W" for k, v in view.power_detail.items())
        t.append(f"{'Power':<7}{view.power_w[-1]:>6.1f} W  ", "bold")
        t.append(spark(list(view.power_w), max(0, chart_w - len(detail) - 1), 0.0), "red")
        t.append(f" {detail}", "dim")
    else:
        t.append(f"{'Power':<7}{fmt.NA:>8}  ", "bold")
        t.append(f"({view.power_source})", "dim")
    if view.process:
        t.append(f"\n{view.process}", "dim")
    return t


def log_line_style(line: str) -> str:
    """Colour for a train.log line: errors red, steps yellow, evals/checkpoints cyan."""
    low = line.lower()
    if "error" in low or "traceback" in low or "fail" in low:
        return "red"
    if low.startswith("step") or " step " in low[:20]:
        return "yellow"
    if "eval" in low or "checkpoint" in low or "val_loss" in low:
        return "cyan"
    return ""
