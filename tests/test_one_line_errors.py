"""One line where one line is promised (issue 15, case 6): output places that cannot be written, malformed
run-directory JSON, a damaged peak cache, an unreadable token file, a config with `dim = nan`, and training
options no machine can honour each end in one `anetrain: error:` line and exit 2 (or, for a damaged file
that has a good alternative, a warning and the alternative), never a traceback."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import anetrain.data.tokens as tokens_module
import anetrain.telemetry.peak as peak_module
from anetrain.checkpoint import MANIFEST
from helpers.data import shared_file
from helpers.train import error_line, resume_argv, run_cli, train_argv, valid_head_tokens, write_model


@pytest.fixture
def unwritable(tmp_path) -> Path:
    """A directory in which nothing can be created, for this user (root writes through permissions, so for
    root: /sys, where the kernel refuses)."""
    if os.geteuid() == 0:
        return Path("/sys")
    d = tmp_path / "read-only"
    d.mkdir()
    d.chmod(0o555)
    return d


@pytest.mark.parametrize("command", ["train", "export", "prepare", "tokenizer export"])
def test_an_output_place_that_cannot_be_written_is_one_line(tmp_path, unwritable, command):
    out = unwritable / "anetrain-out"
    argv = {
        "train": train_argv(write_model(tmp_path), valid_head_tokens(), out),
        "export": ["export", str(shared_file("stories260K.bin")), str(out), "--format", "llama2c-v0"],
        "prepare": [
            "prepare",
            str(shared_file("tinystories_sample.txt")),
            "--tokenizer",
            str(shared_file("tok512.model")),
            "--out",
            str(out),
        ],
        "tokenizer export": ["tokenizer", "export", str(shared_file("tok512.model")), "--out", str(out)],
    }[command]
    line = error_line(run_cli(argv))
    assert str(out) in line and ("ermission denied" in line or "not permitted" in line), line


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> Path:
    """A run stopped at step 2 of 4: one checkpoint."""
    root = tmp_path_factory.mktemp("stopped")
    run = root / "r"
    assert run_cli(train_argv(write_model(root), valid_head_tokens(), run, steps=4, stop_at=2)).rc == 0
    return run


@pytest.fixture
def run(stopped, tmp_path) -> Path:
    shutil.copytree(stopped, tmp_path / "r")
    return tmp_path / "r"


def _edit_json(path: Path, edit) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


CKPT = "checkpoints/step_00000002"


@pytest.mark.parametrize(
    ("where", "edit", "problem"),
    [
        (f"{CKPT}/{MANIFEST}", lambda d: d.update(files=[]), "no complete checkpoint to resume from"),
        (f"{CKPT}/{MANIFEST}", lambda d: d.update(counters=[1]), "unreadable run state"),
        (f"{CKPT}/{MANIFEST}", lambda d: d["counters"].update(tokens="many"), "unreadable run state"),
        (f"{CKPT}/{MANIFEST}", lambda d: d["sampler"].pop("bit_generator"), "unreadable run state"),
        ("config.json", lambda d: d.update(train=[]), "config.json: unreadable"),
        ("config.json", lambda d: d["train"].update(batch="eight"), "unreadable (batch is 'eight')"),
    ],
)
def test_malformed_run_directory_json_is_one_line(run, where, edit, problem):
    _edit_json(run / where, edit)
    line = error_line(run_cli(resume_argv(run)), after_log=True)
    assert problem in line, line


def test_a_latest_pointer_with_a_nul_byte_is_ignored_with_a_warning(run):
    (run / "checkpoints" / "latest").write_bytes(b"step_00000002\0")
    res = run_cli(resume_argv(run))
    assert res.rc == 0, res.err
    assert "checkpoints/latest names" in res.err and "ignored" in res.err


def test_a_damaged_peak_cache_is_measured_again_not_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cache = tmp_path / "anetrain" / "peak.json"
    cache.parent.mkdir()
    monkeypatch.setattr(peak_module, "probe_peak_tflops", lambda device, dtype: 3.5)
    for damaged in ("[1, 2]", '"text"', "{not json"):
        cache.write_text(damaged)
        assert peak_module.peak_tflops(torch.device("cpu"), torch.float32) == 3.5
        assert list(json.loads(cache.read_text()).values()) == [3.5]  # rewritten as a proper cache


def test_an_unreadable_token_file_is_one_line(tmp_path, monkeypatch):
    def refused(*args, **kwargs):  # reading without read permission (tests may run as root)
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(tokens_module.np, "memmap", refused)
    data = valid_head_tokens()
    line = error_line(run_cli(train_argv(write_model(tmp_path), data, tmp_path / "r")))
    assert f"{data}: cannot read the token file (Permission denied)" in line


def test_a_config_with_dim_nan_is_one_line(tmp_path):
    config = tmp_path / "nan.toml"
    config.write_text("dim = nan\nhidden_dim = 64\nn_layers = 2\nn_heads = 4\nvocab_size = 512\nseq_len = 8")
    line = error_line(run_cli(train_argv(config, valid_head_tokens(), tmp_path / "r")))
    assert str(config) in line and "dim must be an integer, got nan" in line


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"threads": -1}, "--threads must be positive"),
        ({"batch": 1_000_000_000}, "validation windows are more than"),
        ({"batch": 1_000_000_000, "eval_every": 0}, "not enough memory for micro-batches of --batch"),
        ({"eval_batches": 1_000_000_000}, "--eval-batches 1000000000 x --batch 2 validation windows"),
        ({"dw_device": "cuda:1"}, "--dw-device cuda:1"),
    ],
)
def test_options_no_machine_can_honour_are_one_line(tmp_path, options, problem):
    if "dw_device" in options and torch.cuda.device_count() > 1:
        pytest.skip("this machine has a cuda:1")
    res = run_cli(train_argv(write_model(tmp_path), valid_head_tokens(), tmp_path / "r", **options))
    line = error_line(res, after_log="memory" in problem)  # (found when the pipeline allocates)
    assert problem in line, line
