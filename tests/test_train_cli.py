"""CLI conventions: every subcommand's --help exits 0 and shows each option with its default; bad input is
one 'anetrain: error:' line on stderr with exit status 2 and no traceback (unless --debug)."""

from __future__ import annotations

import argparse
import contextlib
import io
import subprocess
import sys
from dataclasses import fields

import pytest

from anetrain.cli import build_parser, main
from anetrain.train import TrainOptions
from helpers.train import error_line, run_cli, train_argv, valid_head_tokens, write_model


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


SUBCOMMANDS = sorted(_subparsers())


def _help_text(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    return " ".join(out.getvalue().split())  # undo line wrapping


def test_the_expected_subcommands_exist():
    assert {"train", "prepare"} <= set(SUBCOMMANDS)


def test_top_level_help_lists_the_subcommands():
    text = _help_text(["--help"])
    for name in SUBCOMMANDS:
        assert name in text


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_subcommand_help_exits_0_and_documents_every_option_with_its_default(name):
    text = _help_text([name, "--help"])
    for action in _subparsers()[name]._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        assert action.help and action.help != argparse.SUPPRESS, f"{name} {action.option_strings}: no help"
        assert any(s in text for s in action.option_strings)
        if action.default not in (None, argparse.SUPPRESS, False, ""):
            assert f"default: {action.default}" in text, f"{name} {action.option_strings[0]}"


def test_train_help_shows_every_training_option_and_its_default():
    text = _help_text(["train", "--help"])
    for f in fields(TrainOptions):
        flag = "--" + f.name.replace("_", "-")
        assert flag in text
        if f.default not in (None, False):
            assert f"default: {f.default}" in text, flag


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"steps": 0}, "--steps must be positive"),
        ({"batch": -1}, "--batch must be positive"),
        ({"val_fraction": 1.5}, "--val-fraction"),
        ({"lr": -1.0}, "--lr"),
        ({"stop_at": 0}, "--stop-at"),
        ({"residual_scale": "abc"}, "--residual-scale"),
        # the optimizer's (issue 15: --wd nan trained NaN weights into a checkpoint, the others were taken)
        ({"wd": "nan"}, "--wd must be a number >= 0, got nan"),
        ({"beta1": 2}, "--beta1 must be in [0, 1), got 2"),
        ({"beta2": 1}, "--beta2 must be in [0, 1), got 1"),
        ({"warmup": -5}, "--warmup must be 0 or positive, got -5"),
        ({"min_lr": -1}, "--min-lr must be between 0 and --lr (0.0005), got -1"),
        ({"eps": 0}, "--eps must be a positive number, got 0"),
        ({"clip": -1}, "--clip must be a number >= 0 (0 disables clipping), got -1"),
        ({"keep_checkpoints": -1}, "--keep-checkpoints must be at least 1, got -1"),
    ],
)
def test_bad_training_option_is_one_error_line(tmp_path, options, problem):
    res = run_cli(train_argv(write_model(tmp_path), valid_head_tokens(), tmp_path / "r", **options))
    assert problem in error_line(res)
    assert not (tmp_path / "r").exists()  # refused before anything was created


def test_unknown_model_is_one_error_line(tmp_path):
    line = error_line(run_cli(train_argv(tmp_path / "nope.bin", valid_head_tokens(), tmp_path / "r")))
    assert "nope.bin" in line


def test_bad_model_config_file_is_one_error_line(tmp_path):
    bad = write_model(tmp_path, "bad", n_heads=5)
    line = error_line(run_cli(train_argv(bad, valid_head_tokens(), tmp_path / "r")))
    assert str(bad) in line and "n_heads" in line


def test_usage_error_exits_2_without_a_traceback(tmp_path):
    err = io.StringIO()
    argv = train_argv(write_model(tmp_path), valid_head_tokens(), tmp_path / "r", sampler="bogus")
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "invalid choice: 'bogus'" in err.getvalue() and "Traceback" not in err.getvalue()


def test_a_real_process_exits_2_with_one_line(tmp_path):
    missing = tmp_path / "nope.bin"
    argv = train_argv(write_model(tmp_path), missing, tmp_path / "r")
    proc = subprocess.run(
        [sys.executable, "-m", "anetrain", *argv], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"anetrain: error: {missing}: no such token file"]
    assert proc.stdout == ""
