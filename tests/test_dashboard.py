"""The textual dashboard, driven headless with textual's pilot on fixture run directories."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from anetrain.commands import dashboard as dashboard_command
from anetrain.errors import InputError
from anetrain.ui.dashboard import DashboardApp, Panel, run_dashboard, screenshot
from helpers.data import REPO, shared_file
from helpers.run_dir import SAMPLE_TEXT, RunWriter, best_train, make_run

PANEL_TITLES = ("Loss", "Training stats", "Step phases (ms)", "System", "Generated text", "Log")


def panel(app: DashboardApp, name: str) -> str:
    return app.query_one(f"#{name}", Panel).text()


def run_app(app: DashboardApp, body, size: tuple[int, int] = (120, 40)):
    """Run ``body(app, pilot)`` inside a headless session of ``app``."""

    async def go():
        async with app.run_test(size=size) as pilot:
            await pilot.pause(0.1)
            return await body(app, pilot)

    return asyncio.run(go())


async def wait_for(pilot, condition, timeout: float = 20.0) -> None:
    """Let the app run until ``condition()`` holds (fails the test after ``timeout`` seconds)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "timed out waiting for the dashboard"
        await pilot.pause(0.05)


def fast_app(run_dir: Path, **kw) -> DashboardApp:
    return DashboardApp(run_dir, poll_s=0.05, system_s=0.2, power=False, **kw)


# ---- what is shown ------------------------------------------------------------------------------------


def test_dashboard_shows_the_runs_numbers(tmp_path: Path) -> None:
    make_run(tmp_path / "run", steps_done=120, total=1000, ms=50.0)

    async def body(app, pilot):
        header, stats, phases = panel(app, "header"), panel(app, "stats"), panel(app, "phases")
        assert "stories15M" in header and "15.2M params" in header and "optimized on cpu, bf16" in header
        assert "batch 8 × seq 256 × accum 1" in header and "lr 5.00e-04" in header
        assert "dim 288 hidden 768 layers 6 heads 6" in header
        assert "■ not running" in header
        assert "120/1000 (12.0%)" in stats
        best, best_step = best_train(120)
        assert f"best {best:.4f} @{best_step}" in stats
        assert "tokens/s 41.0k" in stats  # 2048 tokens / 50 ms
        assert "ms/step  50.0 " in stats and "steps/s 20.00" in stats
        assert "ETA 44.0s" in stats  # 880 steps left at 50 ms
        assert "compile  2.5s" in stats
        assert "util 19.0% of 20 peak" in stats
        lines = {line.split()[0]: line for line in phases.splitlines()}
        assert set(lines) == {"forward", "backward_dx", "dw", "optimizer", "io", "wait"}
        assert "█" in lines["backward_dx"] and lines["backward_dx"].rstrip().endswith("%")
        loss = panel(app, "loss")
        assert "●" in loss  # the best loss is marked
        assert "best val" in str(app.query_one("#loss", Panel).border_subtitle)
        assert panel(app, "sample") == SAMPLE_TEXT
        assert app.query_one("#sample", Panel).border_title == "Generated text (step 100)"
        log = app.query_one("#log")
        assert log.lines and log.lines[-1].text.startswith("step 120 loss=")
        system = panel(app, "system")
        assert "trainer not running" in system and "(from metrics)" in system and "(off)" in system

    run_app(fast_app(tmp_path / "run"), body)


def test_dashboard_follows_a_growing_metrics_file_and_log(tmp_path: Path) -> None:
    w = make_run(tmp_path / "run", steps_done=120, total=1000, eval_every=None)

    async def body(app, pilot):
        assert "120/1000" in panel(app, "stats")
        assert "no eval yet" in panel(app, "stats")
        for s in range(121, 151):
            w.step(s)
        w.eval(150, 1.2345)
        w.sample(150, "The cat sat on the mat.")
        await wait_for(pilot, lambda: "1.2345 @150" in panel(app, "stats"))  # the eval came after step 150
        assert "150/1000" in panel(app, "stats")
        await wait_for(pilot, lambda: panel(app, "sample") == "The cat sat on the mat.")
        assert "step 150" in app.query_one("#sample", Panel).border_title
        await wait_for(pilot, lambda: app.query_one("#log").lines[-1].text.startswith("eval step 150"))

    run_app(fast_app(tmp_path / "run"), body)


def test_dashboard_waits_on_a_truncated_last_line(tmp_path: Path) -> None:
    w = make_run(tmp_path / "run", steps_done=10, total=100)
    line = json.dumps({"type": "step", "step": 11, "loss": 0.5, "ms": 10.0})
    with open(w.metrics, "a") as f:
        f.write(line[:25])

    async def body(app, pilot):
        assert "10/100" in panel(app, "stats")
        await pilot.pause(0.3)
        assert "10/100" in panel(app, "stats")  # the half line is not read
        with open(w.metrics, "a") as f:
            f.write(line[25:] + "\n")
        await wait_for(pilot, lambda: "11/100" in panel(app, "stats"))
        assert "best 0.5000 @11" in panel(app, "stats")

    run_app(fast_app(tmp_path / "run"), body)


def test_dashboard_on_an_empty_run_waits_for_metrics(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()

    async def body(app, pilot):
        assert "waiting for" in panel(app, "loss")
        assert "no steps yet" in panel(app, "stats")
        assert "waiting for metrics" in panel(app, "header")
        assert "no phase timings yet" in panel(app, "phases")
        (tmp_path / "run" / "metrics.jsonl").write_text("")
        await pilot.pause(0.2)
        assert "waiting for the first step" in panel(app, "loss")
        w = RunWriter(tmp_path / "run")
        w.run(steps=50)
        w.step(1)
        await wait_for(pilot, lambda: "1/50" in panel(app, "stats"))

    run_app(fast_app(tmp_path / "run"), body)


@pytest.mark.parametrize("size", [(60, 20), (40, 12), (200, 60)])
def test_dashboard_fits_any_terminal_size(tmp_path: Path, size: tuple[int, int]) -> None:
    make_run(tmp_path / "run", steps_done=120, total=1000)

    async def body(app, pilot):
        narrow = size[0] < 100
        assert app.screen.has_class("narrow") == narrow
        top = app.query_one("#top")
        assert (top.children[0].id == "stats") == narrow  # stats come first when stacked
        assert "120/1000" in panel(app, "stats")
        await pilot.resize_terminal(130, 40)
        await pilot.pause(0.1)
        assert not app.screen.has_class("narrow") and top.children[0].id == "loss"
        log = app.query_one("#log")
        await pilot.press("p")  # auto-scroll off, so the log stays where the arrows put it
        assert log.auto_scroll is False
        log.scroll_end(animate=False)
        await pilot.pause()
        bottom = log.scroll_y
        assert bottom == log.max_scroll_y > 0
        await pilot.press("up", "up", "up")
        assert log.scroll_y == bottom - 3
        await pilot.press("pagedown")
        assert log.scroll_y == bottom

    run_app(fast_app(tmp_path / "run"), body, size=size)


# ---- keys ---------------------------------------------------------------------------------------------


def tiny_checkpoint(run_dir: Path, tokenizer: Path) -> None:
    """A finished run with one small complete checkpoint (random weights) and a real tokenizer."""
    from safetensors.torch import save_file

    from anetrain.config import make_config
    from anetrain.params import init_params

    cfg = make_config(dim=16, hidden_dim=32, n_layers=1, n_heads=2, vocab_size=512, seq_len=32, name="tiny")
    params = init_params(cfg, seed=3)
    ckpt = run_dir / "checkpoints" / "step_00000040"
    ckpt.mkdir(parents=True)
    model = ckpt / "model.safetensors"
    save_file({k: v.contiguous().clone() for k, v in params.named()}, str(model))
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    files = {model.name: {"bytes": model.stat().st_size, "sha256": digest}}
    manifest = {"format": "anetrain-checkpoint", "version": 1, "model": cfg.to_dict(), "step": 40}
    manifest["files"] = files
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    (run_dir / "checkpoints" / "latest").write_text("step_00000040\n")
    RunWriter(run_dir).config(tokenizer=str(tokenizer), model=cfg.to_dict())


def test_g_on_a_finished_run_generates_from_the_newest_checkpoint(tmp_path: Path) -> None:
    tokenizer = shared_file("tok512.model")
    make_run(tmp_path / "run", steps_done=40, total=40, finished=True)
    tiny_checkpoint(tmp_path / "run", tokenizer)

    async def body(app, pilot):
        assert "■ finished" in panel(app, "header")
        await pilot.press("g")
        await wait_for(pilot, lambda: not app.generating, timeout=60)
        title = app.query_one("#sample", Panel).border_title
        text = panel(app, "sample")
        assert re.fullmatch(r"Generated text \(checkpoint step_00000040, step 40, \d+ tok/s\)", title), text
        assert len(text.strip()) > 0 and "cannot generate" not in text

    run_app(fast_app(tmp_path / "run"), body)


def test_an_interrupted_run_shows_as_stopped(tmp_path: Path) -> None:
    w = make_run(tmp_path / "run", steps_done=30, total=100)
    w.checkpoint(30, "interrupt")
    w.report(30, None, 2.0)

    async def body(app, pilot):
        assert "■ stopped at step 30 (resumable)" in panel(app, "header")
        assert "ETA stopped" in panel(app, "stats")
        assert "ckpt     step 30           interrupt" in panel(app, "stats")

    run_app(fast_app(tmp_path / "run"), body)


def test_g_without_a_checkpoint_explains_why(tmp_path: Path) -> None:
    make_run(tmp_path / "run", steps_done=10, total=10, finished=True)

    async def body(app, pilot):
        await pilot.press("g")
        await wait_for(pilot, lambda: not app.generating, timeout=60)
        text = panel(app, "sample")
        assert text.startswith("cannot generate: ")
        assert "no complete checkpoint" in text or "not available" in text

    run_app(fast_app(tmp_path / "run"), body)


def test_g_on_a_live_run_asks_the_trainer(tmp_path: Path) -> None:
    make_run(tmp_path / "run", steps_done=30, total=100)
    (tmp_path / "run" / "trainer.pid").write_text(f"{os.getpid()}\n")

    async def body(app, pilot):
        assert f"● live (pid {os.getpid()})" in panel(app, "header")
        await wait_for(pilot, lambda: "trainer pid" in panel(app, "system"))
        assert "CPU " in panel(app, "system") and "trainer not running" not in panel(app, "system")
        await pilot.press("g")
        assert (tmp_path / "run" / "control" / "generate").is_file()
        assert "waiting for the trainer" in panel(app, "sample")

    run_app(fast_app(tmp_path / "run"), body)


CHILD = r"""
import json, os, signal, sys, time
run = sys.argv[1]
stop = False
def on_int(signum, frame):
    global stop
    stop = True
signal.signal(signal.SIGINT, on_int)
def rec(r):
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(r) + "\n")
os.makedirs(run, exist_ok=True)
with open(os.path.join(run, "trainer.pid"), "w") as f:
    f.write(str(os.getpid()))
rec({"type": "run", "steps": 100000, "model_name": "dummy", "start_step": 0})
step = 0
while not stop:
    step += 1
    rec({"type": "step", "step": step, "loss": 5.0 / step, "ms": 20.0, "elapsed_s": step * 0.02})
    time.sleep(0.02)
rec({"type": "checkpoint", "step": step, "path": "checkpoints/step", "kind": "interrupt"})
os.remove(os.path.join(run, "trainer.pid"))
sys.exit(0)
"""


def test_q_stops_a_launched_child_with_a_checkpoint(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    run_dir = tmp_path / "run"
    log = open(tmp_path / "child.log", "w")  # noqa: SIM115 (closed below)
    child = subprocess.Popen([sys.executable, str(script), str(run_dir)], stdout=log, stderr=log)
    try:
        app = fast_app(run_dir, child=child, stop_timeout_s=30)

        async def body(app, pilot):
            await wait_for(pilot, lambda: app.state.step >= 5)
            assert "● live" in panel(app, "header")
            await pilot.press("q")
            await wait_for(pilot, lambda: child.poll() is not None, timeout=30)
            await pilot.pause(0.2)

        run_app(app, body)
        assert app.return_value == 0
        assert child.returncode == 0
        assert (run_dir / "control" / "stop").is_file()
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert records[-1]["type"] == "checkpoint" and records[-1]["kind"] == "interrupt"
        assert not (run_dir / "trainer.pid").exists()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        log.close()


def test_dashboard_command_writes_a_screenshot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_run(tmp_path / "run", steps_done=50, total=100)
    parser = argparse.ArgumentParser()
    dashboard_command.register(parser.add_subparsers())
    out = tmp_path / "shot.svg"
    args = parser.parse_args(
        ["dashboard", str(tmp_path / "run"), "--screenshot", str(out), "--size", "90x30"]
    )
    assert args.func(args) == 0
    assert "50/100" in svg_text(out.read_text(encoding="utf-8"))
    assert capsys.readouterr().out.strip() == str(out)


def test_run_dashboard_refuses_a_missing_run_dir(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such run directory"):
        run_dashboard(tmp_path / "nope")


def test_dashboard_command_missing_run_dir_is_a_one_line_error(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "anetrain", "dashboard", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"anetrain: error: {tmp_path / 'nope'}: no such run directory"
    ]


# ---- screenshot ----------------------------------------------------------------------------------------


def doc_run(path: Path) -> Path:
    """A realistic fixture run: 420 of 1000 steps, evals, a sample, a log."""
    make_run(path, steps_done=420, total=1000)
    return path


def svg_text(svg: str) -> str:
    root = ET.fromstring(svg)
    return "".join(root.itertext()).replace("\xa0", " ")


def test_screenshot_is_valid_svg_with_every_panel(tmp_path: Path) -> None:
    svg = screenshot(doc_run(tmp_path / "stories15M-run"), size=(120, 40))
    text = svg_text(svg)
    for title in PANEL_TITLES:
        assert title in text, title
    assert "420/1000" in text and "stories15M" in text


def test_readme_picture_is_a_screenshot_of_the_real_run_its_caption_names() -> None:
    """docs/dashboard.svg is `anetrain dashboard RUN --screenshot` of a real training run (README's caption
    says which), not of the fixture runs above."""
    text = svg_text((REPO / "docs" / "dashboard.svg").read_text(encoding="utf-8"))
    for title in PANEL_TITLES:
        assert title in text, title
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    caption = readme[readme.index("![dashboard](docs/dashboard.svg)") :].split("\n\n")[1]
    assert "stories260K" in text and "stories260K" in caption and "--screenshot" in caption
    assert "stories15M" not in text  # the fixture's model
