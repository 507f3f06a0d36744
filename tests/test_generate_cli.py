"""``anetrain generate``: run.c's stdout byte for byte, statistics on stderr, run directories, several
samples, refusals with exit code 2; the dashboard's generation from a run directory."""

from __future__ import annotations

import json
import re

import pytest

from anetrain.checkpoint import save_checkpoint
from anetrain.cli import main
from anetrain.commands.generate import printable
from anetrain.formats import load_model
from anetrain.generate import stream_seed
from anetrain.ui.rundir import RunDir
from anetrain.ui.sampling import generate_from_checkpoint
from conftest import shared_file
from test_generate import EXPECTED

STATS = (
    rb"achieved tok/s: \d+\.\d{6}\n(.*; )?prefill: \d+ tokens in [0-9.]+ ms; "
    rb"decode: \d+ tokens in .* tok/s.*\n"
)


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
    assert re.fullmatch(STATS, err)
    assert b"dtype fp32" in err and b"native kernels" in err


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


def _run_dir(tmp_path, tokenizer: str | None = "tok512.bin", best: bool = False):
    """A run directory holding stories260K as its checkpoint at step 10 (and as best_ when asked)."""
    run = tmp_path / "run"
    params = load_model(str(shared_file("stories260K.bin"))).params
    save_checkpoint(run, "step_00000010", params, None, {"step": 10})
    if best:
        save_checkpoint(run, "best_step_00000010", params, None, {"step": 10}, pointers=("best",))
    doc = {"tokenizer": str(shared_file(tokenizer)) if tokenizer else None}
    (run / "config.json").write_text(json.dumps(doc))
    return run


def test_a_run_directory_gives_its_checkpoint_and_tokenizer(tmp_path, capsysbinary) -> None:
    run = _run_dir(tmp_path)
    assert main(["generate", str(run), "--temperature", "0", "--steps", "200"]) == 0
    out, err = capsysbinary.readouterr()
    assert out == EXPECTED + b"\n"
    assert b"checkpoint step_00000010" in err
    assert main(["generate", str(run), "--best"]) == 2
    assert b"has no best checkpoint" in capsysbinary.readouterr().err
    run_best = _run_dir(tmp_path / "b", best=True)
    assert main(["generate", str(run_best), "--best", "--temperature", "0", "--steps", "200"]) == 0
    out, err = capsysbinary.readouterr()
    assert out == EXPECTED + b"\n" and b"checkpoint best_step_00000010" in err


def test_a_run_without_tokenizer_needs_one(tmp_path, capsysbinary) -> None:
    run = _run_dir(tmp_path, tokenizer=None)
    assert main(["generate", str(run), "--steps", "5"]) == 2
    err = capsysbinary.readouterr().err
    assert b"names no tokenizer" in err and err.count(b"\n") == 1
    tok = str(shared_file("tok512.bin"))
    assert main(["generate", str(run), "--tokenizer", tok, "--temperature", "0", "--steps", "200"]) == 0
    assert capsysbinary.readouterr().out == EXPECTED + b"\n"


def test_prompt_file(tmp_path, capsysbinary) -> None:
    f = tmp_path / "prompt.txt"
    f.write_text("Once upon a time\n", encoding="utf-8")
    assert main(_args("--prompt-file", str(f), "--temperature", "0", "--steps", "40")) == 0
    from_file = capsysbinary.readouterr().out
    assert main(_args("--prompt", "Once upon a time", "--temperature", "0", "--steps", "40")) == 0
    assert capsysbinary.readouterr().out == from_file and from_file.startswith(b"Once upon a time,")
    assert main(_args("--prompt-file", str(f), "--prompt", "x")) == 2
    assert b"not both" in capsysbinary.readouterr().err
    assert main(_args("--prompt-file", str(tmp_path / "missing.txt"))) == 2
    assert b"missing.txt: cannot read" in capsysbinary.readouterr().err


def test_several_samples_as_json_and_as_text(capsysbinary) -> None:
    base = ("--prompt", "Once upon a time", "--steps", "40", "--seed", "42", "--top-k", "20")
    assert main(_args(*base, "--json")) == 0
    single = json.loads(capsysbinary.readouterr().out)
    assert main(_args(*base, "--num-samples", "3", "--json")) == 0
    out, err = capsysbinary.readouterr()
    samples = [json.loads(line) for line in out.splitlines()]
    assert [s["sample"] for s in samples] == [0, 1, 2]
    assert samples[0]["text"] == single["text"] and samples[0]["tokens"] == single["tokens"]
    assert [s["seed"] for s in samples] == [stream_seed(42, i) for i in range(3)]
    assert len({s["text"] for s in samples}) == 3 and all(
        s["text"].startswith("Once upon a time") for s in samples
    )
    assert b"(3 streams, " in err and b"tok/s per stream" in err
    assert main(_args(*base, "--num-samples", "2")) == 0
    text = capsysbinary.readouterr().out
    first = single["text"].encode()
    assert text.startswith(first + b"\n\n") and text.count(b"Once upon a time") == 2 and text.endswith(b"\n")


@pytest.mark.parametrize("dtype", ["bf16", "int8", "float64"])
def test_dtypes(dtype: str, capsysbinary) -> None:
    steps = "20" if dtype == "float64" else "50"  # float64 runs the (slower) torch path
    assert main(_args("--dtype", dtype, "--temperature", "0", "--steps", steps)) == 0
    out, err = capsysbinary.readouterr()
    assert len(out) > 60 and EXPECTED.startswith(out[:-1])  # these first tokens are float32's
    name = {"float64": "fp64"}.get(dtype, dtype)
    assert f"dtype {name}".encode() in err
    assert (b"torch operators" if dtype == "float64" else b"native kernels") in err


def test_model_twice_is_refused(capsysbinary) -> None:
    assert main([*_args(), str(shared_file("stories260K.bin"))]) == 2
    assert b"not both" in capsysbinary.readouterr().err
    assert main(["generate", "--tokenizer", str(shared_file("tok512.bin"))]) == 2
    assert b"no model" in capsysbinary.readouterr().err


def test_dashboard_generates_from_a_stopped_run(tmp_path) -> None:
    run = _run_dir(tmp_path)
    sample = generate_from_checkpoint(RunDir(run), steps=60, seed=5)
    assert sample.step == 10 and sample.checkpoint.name == "step_00000010"
    assert len(sample.text) > 100 and sample.tokens_per_s > 0
