"""``anetrain plot``: images of the expected size with real content; clear errors for unusable input."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from anetrain.commands import plot as plot_command
from anetrain.errors import InputError
from anetrain.ui.plot import plot_runs
from helpers.run_dir import RunWriter, make_run


def image_stats(path: Path) -> tuple[tuple[int, int], int, float]:
    """(width, height), distinct colours, and the fraction of pixels that are not white."""
    img = imread(path)[..., :3]
    pixels = (img * 255).round().astype(np.uint8).reshape(-1, 3)
    distinct = len(np.unique(pixels, axis=0))
    non_white = float((pixels < 250).any(axis=1).mean())
    return (img.shape[1], img.shape[0]), distinct, non_white


def test_plot_one_run_writes_a_png_of_the_requested_size(tmp_path: Path) -> None:
    make_run(tmp_path / "run_a", steps_done=150, total=300)
    out = plot_runs([tmp_path / "run_a"], tmp_path / "plot.png", size=(900, 600))
    assert out == tmp_path / "plot.png"
    size, distinct, non_white = image_stats(out)
    assert size == (900, 600)
    assert distinct > 200  # curves, stacked phases, text: many colours
    assert non_white > 0.05
    assert not list(tmp_path.glob(".plot.png.*"))  # no temporary file left behind


@pytest.mark.parametrize("x", ["tokens", "time"])
def test_plot_overlays_several_runs_on_each_x_axis(tmp_path: Path, x: str) -> None:
    make_run(tmp_path / "fast", steps_done=120, total=200, ms=40.0)
    make_run(tmp_path / "slow", steps_done=80, total=200, ms=90.0, eval_every=None)
    out = plot_runs([tmp_path / "fast", tmp_path / "slow"], tmp_path / f"cmp_{x}.png", x=x)
    size, distinct, non_white = image_stats(out)
    assert size == (1200, 800)
    assert distinct > 200 and non_white > 0.05


def test_plot_svg_names_the_runs(tmp_path: Path) -> None:
    make_run(tmp_path / "alpha_run", steps_done=60, total=100)
    make_run(tmp_path / "beta_run", steps_done=60, total=100)
    out = plot_runs([tmp_path / "alpha_run", tmp_path / "beta_run"], tmp_path / "p.svg")
    svg = out.read_text()
    assert svg.lstrip().startswith("<?xml") and "alpha_run" in svg and "beta_run" in svg


def test_plot_refuses_runs_without_metrics_or_steps(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"empty: has no metrics.jsonl"):
        plot_runs([tmp_path / "empty"], tmp_path / "x.png")
    w = RunWriter(tmp_path / "started")
    w.run()
    with pytest.raises(InputError, match=r"metrics.jsonl: holds no step records yet"):
        plot_runs([tmp_path / "started"], tmp_path / "x.png")
    with pytest.raises(InputError, match="no such run directory"):
        plot_runs([tmp_path / "missing"], tmp_path / "x.png")
    make_run(tmp_path / "ok", steps_done=5)
    with pytest.raises(InputError, match="unsupported image type"):
        plot_runs([tmp_path / "ok"], tmp_path / "x.gif")
    assert not (tmp_path / "x.png").exists()


def test_plot_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_run(tmp_path / "run", steps_done=40, total=100)
    parser = argparse.ArgumentParser()
    plot_command.register(parser.add_subparsers())
    args = parser.parse_args(
        ["plot", str(tmp_path / "run"), "--out", str(tmp_path / "o.png"), "--size", "640x480"]
    )
    assert args.func(args) == 0
    assert image_stats(tmp_path / "o.png")[0] == (640, 480)
    assert capsys.readouterr().out.strip() == str(tmp_path / "o.png")
    with pytest.raises(SystemExit):
        parser.parse_args(["plot", "r", "--out", "o.png", "--x", "epoch"])
