"""``anetrain generate``: run.c's stdout byte for byte, statistics on stderr, refusals with exit code 2."""

from __future__ import annotations

import re

from anetrain.cli import main
from anetrain.commands.generate import printable
from conftest import shared_file
from test_generate import EXPECTED


def _args(*extra: str) -> list[str]:
    return [
        "generate",
        "--model",
        str(shared_file("stories260K.bin")),
        "--tokenizer",
        str(shared_file("tok512.bin")),
        *extra,
    ]


def test_golden_stdout_is_llama2c_test_all(capsysbinary) -> None:
    """test_all.py runs `run stories260K.bin -z tok512.bin -t 0.0 -n 200` and compares stdout[:-1]."""
    assert main(_args("--temperature", "0", "--steps", "200")) == 0
    out, err = capsysbinary.readouterr()
    assert out == EXPECTED + b"\n"
    assert re.fullmatch(rb"achieved tok/s: \d+\.\d{6}\n", err)


def test_sentencepiece_model_gives_the_same_text(capsysbinary) -> None:
    args = _args("--temperature", "0", "--steps", "200")
    args[args.index("--tokenizer") + 1] = str(shared_file("tok512.model"))
    assert main(args) == 0
    assert capsysbinary.readouterr().out == EXPECTED + b"\n"


def test_prompt_and_seeded_sampling(capsysbinary) -> None:
    args = _args("--prompt", "Once upon a time", "--steps", "40", "--seed", "7", "--top-k", "20")
    assert main(args) == 0
    first = capsysbinary.readouterr().out
    assert main(args) == 0
    assert capsysbinary.readouterr().out == first
    assert first.startswith(b"Once upon a time") and first.endswith(b"\n")


def test_refusals_exit_2_with_one_line(tmp_path, capsysbinary) -> None:
    small = tmp_path / "tok259.bin"
    raw = shared_file("tok512.bin").read_bytes()
    small.write_bytes(raw[: raw.index(b"<0xFF>") + len(b"<0xFF>")])  # the first 259 entries
    args = _args()
    args[args.index("--tokenizer") + 1] = str(small)
    assert main(args) == 2
    out, err = capsysbinary.readouterr()
    assert out == b"" and b"fewer than the model's vocabulary of 512" in err and err.count(b"\n") == 1
    assert main(_args("--steps", "-1")) == 2
    assert b"--steps must be >= 0" in capsysbinary.readouterr().err
    assert main(_args("--temperature", "-0.5")) == 2
    assert b"temperature must be >= 0" in capsysbinary.readouterr().err


def test_safe_printf_rule() -> None:
    assert printable(b"a") and printable(b" ") and printable(b"\n") and printable(b"\t")
    assert not printable(b"") and not printable(b"\x00") and not printable(b"\x1b") and not printable(b"\xe2")
    assert printable(b"\xe2\x80\x9c")  # multi-byte pieces are printed whole
