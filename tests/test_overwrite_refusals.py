"""Nothing already on disk is destroyed (issue 15, case 5): no command writes its output over one of its
inputs; `train --out` refuses a file and a non-empty directory that is not a run directory; an HF export
replaces an existing model directory as a whole (a kill at any moment leaves the old model or the new one,
never a mixture), and refuses a directory that is not a model's."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import time

import torch

from anetrain.cli import main
from anetrain.config import make_config
from anetrain.formats import load_model, save_model
from anetrain.params import init_params
from helpers.data import shared_file
from helpers.train import TINY, error_line, run_cli, train_argv, valid_head_tokens, write_model


def _copy(name: str, directory) -> object:
    """A writable copy of a shared file (the originals are read-only)."""
    dest = directory / name
    shutil.copyfile(shared_file(name), dest)
    return dest


def test_prepare_refuses_to_write_over_its_input_or_its_tokenizer(tmp_path):
    text = _copy("tinystories_sample.txt", tmp_path)
    tok = _copy("tok512.model", tmp_path)
    before = {p: p.read_bytes() for p in (text, tok)}
    for out in (text, tok, tmp_path / "." / text.name):
        line = error_line(run_cli(["prepare", str(text), "--tokenizer", str(tok), "--out", str(out)]))
        assert "it would be overwritten" in line, line
    # nor may its sidecar, OUT.json
    sidecar_out = tmp_path / "sample"
    os.link(tok, tmp_path / "sample.json")
    line = error_line(run_cli(["prepare", str(text), "--tokenizer", str(tok), "--out", str(sidecar_out)]))
    assert "it would be overwritten" in line and not sidecar_out.exists()
    assert {p: p.read_bytes() for p in (text, tok)} == before


def test_tokenizer_export_refuses_to_write_over_the_model(tmp_path):
    tok = _copy("tok512.model", tmp_path)
    before = tok.read_bytes()
    line = error_line(run_cli(["tokenizer", "export", str(tok), "--out", str(tok)]))
    assert "it would be overwritten" in line
    assert tok.read_bytes() == before


def test_train_out_refuses_a_file_and_a_directory_that_is_not_a_run(tmp_path):
    tok = _copy("tok512.model", tmp_path)
    hf = tmp_path / "hf"
    save_model(hf, init_params(make_config(**TINY), "llama2c", 0), "hf")
    files = {p.name: p.read_bytes() for p in hf.iterdir()}
    model = write_model(tmp_path)
    line = error_line(run_cli(train_argv(model, valid_head_tokens(), tok)))
    assert "exists and is not a directory" in line
    line = error_line(run_cli(train_argv(model, valid_head_tokens(), hf)))
    assert "is a non-empty directory that is not a run directory" in line
    assert {p.name: p.read_bytes() for p in hf.iterdir()} == files  # the model's config.json is intact


def test_hf_export_refuses_a_directory_that_is_not_a_model_and_its_own_input(tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    line = error_line(run_cli(["export", str(shared_file("stories260K.bin")), str(notes), "--format", "hf"]))
    assert "not a Hugging Face model directory" in line
    assert (notes / "todo.txt").read_text() == "keep me"
    model = tmp_path / "m.bin"
    shutil.copyfile(shared_file("stories260K.bin"), model)
    line = error_line(run_cli(["export", str(model), str(model), "--format", "llama2c-v1"]))
    assert "it would be overwritten" in line


def killed_at_replace(k: int, argv: list[str]) -> int:
    """``anetrain ARGV`` in a forked child killed (SIGKILL: no cleanup of any kind) at its k-th os.replace;
    the child's wait status."""
    pid = os.fork()
    if pid == 0:  # the child
        try:
            torch.set_num_threads(1)  # the parent's OpenMP pool does not survive a fork
            count, real = [0], os.replace

            def replace(src, dst, *args, **kwargs):
                count[0] += 1
                if count[0] == k:
                    os.kill(os.getpid(), signal.SIGKILL)
                return real(src, dst, *args, **kwargs)

            os.replace = replace
            with contextlib.redirect_stdout(io.StringIO()):
                main(argv)
        finally:
            os._exit(0)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("the forked export hung")


def _same(params, other) -> bool:
    return params.cfg == other.cfg and torch.equal(params.flat, other.flat)


def test_hf_export_over_a_model_directory_is_atomic_as_a_whole(tmp_path):
    """Model B exported over model A's directory, killed at each rename the export makes: the directory is
    then A or B, complete (or, killed between the two renames of the swap, absent, with A put back by the
    next export); never B's weights with A's config.json."""
    a_src = shared_file("stories260K.bin")
    b_src = tmp_path / "b.bin"
    save_model(b_src, init_params(make_config(**TINY), "llama2c", 1), "llama2c-v0")
    a, b = load_model(a_src).params, load_model(b_src).params
    out = tmp_path / "out"
    for k in range(1, 10):
        shutil.rmtree(out, ignore_errors=True)
        assert run_cli(["export", str(a_src), str(out), "--format", "hf"]).rc == 0
        status = killed_at_replace(k, ["export", str(b_src), str(out), "--format", "hf"])
        if os.WIFEXITED(status):
            break  # the export makes fewer than k renames: every point has been tried
        assert os.WTERMSIG(status) == signal.SIGKILL
        if out.exists():
            found = load_model(out).params
            assert _same(found, a) or _same(found, b), f"killed at rename {k}: a mixture"
        else:  # between the swap's two renames: A is complete beside it
            (aside,) = tmp_path.glob(".out.old-*")
            assert _same(load_model(aside).params, a)
        # the next export puts right what the killed one left, and leaves nothing hidden behind
        assert run_cli(["export", str(b_src), str(out), "--format", "hf"]).rc == 0
        assert _same(load_model(out).params, b)
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []
    else:
        raise AssertionError("the export made more renames than expected")
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == TINY["n_layers"]
