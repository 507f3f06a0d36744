"""The steps after a run, as a new user takes them (issue 15, case 9): the run's result on stdout ending
with where the run is and what to do next; `info`, `generate` (without --tokenizer: the run knows it) and
`export` on the run directory and on checkpoints/latest; an HF export that AutoTokenizer loads; a grouped
`train --help` that says the defaults of the bare `anetrain train`; a failed command that leaves no run
directory; a text file given as --data pointed to `anetrain prepare`. (SIGHUP: test_checkpoint_kill.py.)"""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import sentencepiece as spm

from anetrain.cli import main
from anetrain.formats import load_model
from helpers.data import shared_file
from helpers.train import error_line, run_cli, train_argv, valid_head_tokens, write_model


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run with the run's tokenizer (tok512.bin; tok512.model lies next to it) and its
    CLI result."""
    root = tmp_path_factory.mktemp("after")
    run = root / "run"
    argv = train_argv(
        write_model(root),
        valid_head_tokens(),
        run,
        steps=4,
        eval_every=0,
        tokenizer=shared_file("tok512.bin"),
    )
    res = run_cli(argv)
    assert res.rc == 0, res.err
    return run, res


def test_the_result_goes_to_stdout_and_ends_with_where_the_run_is_and_what_next(finished):
    run, res = finished
    assert "=== Efficiency Report ===" in res.out and "=== Efficiency Report ===" not in res.err
    assert "sample at step 4:" in res.out
    assert "step 4/4" in res.err  # progress stays on stderr
    lines = res.out.strip().splitlines()
    tail = lines[lines.index(f"run directory: {run}") :]
    assert len(tail) == 4  # the run is finished: no "continue" line
    assert any(f"anetrain generate --model {run} --prompt" in line for line in tail), tail
    assert any(f"anetrain info {run}" in line for line in tail), tail
    assert any(f"anetrain export {run} " in line for line in tail), tail


@pytest.mark.parametrize("where", ["run", "run/checkpoints/latest", "run/checkpoints"])
def test_info_reads_a_run_directory_and_its_latest_pointer(finished, where):
    run, _ = finished
    res = run_cli(["info", "--json", str(run.parent / where)])
    assert res.rc == 0, res.err
    info = json.loads(res.out)
    assert info["format"] == "anetrain-checkpoint"
    assert info["extras"]["checkpoint"] == str(run / "checkpoints" / "step_00000004")


def test_generate_from_a_run_directory_needs_no_tokenizer(finished, capsysbinary):
    run, _ = finished
    common = ["--prompt", "Once upon a time", "--seed", "7", "--steps", "24"]
    assert main(["generate", "--model", str(run), *common]) == 0
    own = capsysbinary.readouterr().out
    tok = str(shared_file("tok512.bin"))
    assert (
        main(["generate", "--model", str(run / "checkpoints" / "latest"), "--tokenizer", tok, *common]) == 0
    )
    assert capsysbinary.readouterr().out == own and own.strip()
    assert main(["generate", "--model", str(shared_file("stories260K.bin")), *common]) == 2
    assert b"no tokenizer: pass --tokenizer" in capsysbinary.readouterr().err


def test_export_of_a_run_directory_in_every_kind_and_hf_with_its_tokenizer(finished, tmp_path):
    run, _ = finished
    trained = load_model(run).params
    res = run_cli(["export", str(run), str(tmp_path / "m.bin"), "--format", "llama2c-v0"])
    assert res.rc == 0, res.err
    assert load_model(tmp_path / "m.bin").params.flat.equal(trained.flat)
    hf = tmp_path / "hf"
    res = run_cli(["export", str(run / "checkpoints" / "latest"), str(hf), "--format", "hf"])
    assert res.rc == 0, res.err
    assert "note: tokenizer:" in res.out
    transformers = pytest.importorskip("transformers")  # the hf extra (installed by CI)
    tok = transformers.AutoTokenizer.from_pretrained(str(hf))
    sp = spm.SentencePieceProcessor(model_file=str(shared_file("tok512.model")))
    for text in ("Once upon a time, there was a little girl named Lily.", 'He said, "Hi!" 3 times.'):
        assert tok(text).input_ids == [1, *sp.encode(text)]


def test_train_help_groups_the_options_and_says_the_bare_commands_defaults():
    res_help = run_cli_help(["train", "--help"])
    for group in (
        "model and data:",
        "optimisation:",
        "run directory and checkpoints:",
        "hardware and precision:",
    ):
        assert f"\n{group}\n" in res_help, group
    text = " ".join(res_help.split())
    assert "(default: 1000; 1500 without --data)" in text  # --steps
    assert "(default: 0.0005; 0.002 without --data)" in text  # --lr


def run_cli_help(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(argv)
    return out.getvalue()


def test_a_failed_train_leaves_no_run_directory(tmp_path):
    for data in (tmp_path / "missing.bin", shared_file("stories260K.bin")):  # absent; not a token file
        res = run_cli(train_argv(write_model(tmp_path), data, tmp_path / "runs" / "r"))
        error_line(res, after_log=True)
        assert not (tmp_path / "runs").exists()  # nor the parent it made


def test_text_given_as_data_points_to_prepare(tmp_path):
    text = shared_file("tinystories_sample.txt")
    line = error_line(run_cli(train_argv(write_model(tmp_path), text, tmp_path / "r")))
    assert f"anetrain prepare {text} --tokenizer" in line
    plain = tmp_path / "stories"  # no suffix: recognized by its content
    plain.write_bytes(text.read_bytes())
    line = error_line(run_cli(train_argv(write_model(tmp_path), plain, tmp_path / "r")))
    assert "looks like text" in line and "anetrain prepare" in line
