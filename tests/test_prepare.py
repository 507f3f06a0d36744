"""`anetrain prepare`: text -> uint16 token files byte-identical to llama2.c's pretokenizer, from .txt,
.jsonl and TinyStories .json inputs, with a sidecar that training checks."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

from anetrain.tokenizer import load_tokenizer
from helpers.data import shared_file
from helpers.train import error_line, run_cli, train_argv, write_model


def _stories() -> list[str]:
    """The 5 stories of tinystories_sample.txt, split as tinystories.py does."""
    text = shared_file("tinystories_sample.txt").read_text("utf-8")
    return [s.strip() for s in re.split(r"<\|endoftext\|>", text) if s.strip()]


def _prepare(inputs, out, *extra):
    tok = shared_file("tok512.model")
    return run_cli(["prepare", *map(str, inputs), "--tokenizer", str(tok), "--out", str(out), *extra])


def test_endoftext_separated_text_equals_the_reference_bytes(tmp_path):
    out = tmp_path / "sample.bin"
    res = _prepare([shared_file("tinystories_sample.txt")], out, "--separator", "endoftext")
    assert res.rc == 0, res.err
    assert out.read_bytes() == shared_file("derived/tinystories_sample.tok512.bin").read_bytes()
    assert "1,809 tokens from 5 documents" in res.err


def test_blank_line_separated_text_equals_the_reference_bytes(tmp_path):
    out = tmp_path / "valid.bin"
    res = _prepare([shared_file("tinystories_valid_head.txt")], out)
    assert res.rc == 0, res.err
    assert out.read_bytes() == shared_file("derived/tinystories_valid_head.tok512.bin").read_bytes()


def test_jsonl_text_field_gives_the_same_tokens(tmp_path):
    src = tmp_path / "stories.jsonl"
    src.write_text(
        "".join(json.dumps({"text": s, "id": i}) + "\n" for i, s in enumerate(_stories())), "utf-8"
    )
    out = tmp_path / "out.bin"
    assert _prepare([src], out).rc == 0
    assert out.read_bytes() == shared_file("derived/tinystories_sample.tok512.bin").read_bytes()


def test_jsonl_with_another_text_field(tmp_path):
    src = tmp_path / "stories.jsonl"
    src.write_text("".join(json.dumps({"body": s}) + "\n" for s in _stories()), "utf-8")
    out = tmp_path / "out.bin"
    assert _prepare([src], out, "--text-field", "body").rc == 0
    assert out.read_bytes() == shared_file("derived/tinystories_sample.tok512.bin").read_bytes()


def test_tinystories_json_shard_gives_the_same_tokens(tmp_path):
    src = tmp_path / "data00.json"
    src.write_text(json.dumps([{"story": s, "summary": "x", "source": "GPT-4"} for s in _stories()]), "utf-8")
    out = tmp_path / "out.bin"
    assert _prepare([src], out).rc == 0
    assert out.read_bytes() == shared_file("derived/tinystories_sample.tok512.bin").read_bytes()


def test_several_inputs_are_concatenated_in_order(tmp_path):
    stories = _stories()
    a, b = tmp_path / "a.jsonl", tmp_path / "b.json"
    a.write_text("".join(json.dumps({"text": s}) + "\n" for s in stories[:2]), "utf-8")
    b.write_text(json.dumps([{"story": s} for s in stories[2:]]), "utf-8")
    out = tmp_path / "out.bin"
    assert _prepare([a, b], out).rc == 0
    assert out.read_bytes() == shared_file("derived/tinystories_sample.tok512.bin").read_bytes()


def test_sidecar_records_the_tokenizer_and_counts(tmp_path):
    out = tmp_path / "sample.bin"
    assert _prepare([shared_file("tinystories_sample.txt")], out, "--separator", "endoftext").rc == 0
    side = json.loads((tmp_path / "sample.bin.json").read_text("utf-8"))
    tokens = np.fromfile(out, dtype="<u2")
    assert side["vocab_size"] == 512
    assert side["n_tokens"] == tokens.size == 1809
    assert side["n_documents"] == 5 == int(np.count_nonzero(tokens == 1))
    assert side["tokenizer_fingerprint"] == load_tokenizer(shared_file("tok512.model")).fingerprint()


@pytest.mark.parametrize("tokenizer", ["tok512.model", "tok512.bin"])
def test_prepared_file_trains_with_its_tokenizer_in_either_format(tmp_path, tokenizer):
    out = tmp_path / "sample.bin"
    assert _prepare([shared_file("tinystories_sample.txt")], out, "--separator", "endoftext").rc == 0
    argv = train_argv(write_model(tmp_path), out, tmp_path / "r", steps=1)
    res = run_cli([*argv, "--tokenizer", str(shared_file(tokenizer))])
    assert res.rc == 0, res.err


def test_missing_input_is_one_error_line(tmp_path):
    missing = tmp_path / "nope.txt"
    line = error_line(_prepare([missing], tmp_path / "out.bin"))
    assert str(missing) in line
    assert not (tmp_path / "out.bin").exists()


def test_bad_jsonl_line_is_one_error_line(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"text": "Once upon a time."}\n{not json\n', "utf-8")
    line = error_line(_prepare([src], tmp_path / "out.bin"))
    assert str(src) in line and "line 2" in line


def test_json_that_is_not_a_shard_is_one_error_line(tmp_path):
    src = tmp_path / "bad.json"
    src.write_text('{"story": "Once upon a time."}', "utf-8")
    line = error_line(_prepare([src], tmp_path / "out.bin"))
    assert str(src) in line


# ---- a killed prepare (issue 15, case 8) ---------------------------------------------------------------


def test_workers_end_with_a_killed_prepare(tmp_path):
    """kill -9 of `prepare --workers 2` in the middle of encoding: its worker processes end too (they used to
    stay, waiting for work, for ever)."""
    big = tmp_path / "big.txt"
    big.write_bytes(shared_file("tinystories_valid_head.txt").read_bytes() * 6)  # 5 MB: seconds of work
    tok = shared_file("tok512.model")
    argv = [sys.executable, "-m", "anetrain", "prepare", str(big), "--tokenizer", str(tok)]
    proc = subprocess.Popen([*argv, "--out", str(tmp_path / "big.bin"), "--workers", "2"])
    workers: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 60
        while len(workers) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, "prepare ended before its workers"
            workers = psutil.Process(proc.pid).children()
            time.sleep(0.02)
        time.sleep(0.2)
        proc.kill()
        proc.wait(timeout=30)
        _, alive = psutil.wait_procs(workers, timeout=10)
        assert alive == [], f"{len(alive)} workers outlived their parent"
    finally:
        for w in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                w.kill()
        if proc.poll() is None:
            proc.kill()
    assert not (tmp_path / "big.bin").exists()


def test_a_temporary_file_left_by_a_killed_prepare_is_removed_by_the_next(tmp_path):
    out = tmp_path / "out.bin"
    stale = tmp_path / ".out.bin.999999999.k2j4h5g6.tmp"  # what a prepare killed while writing leaves
    stale.write_bytes(b"\0" * 1000)
    live = tmp_path / f".out.bin.{os.getpid()}.a1b2c3d4.tmp"  # a writer that is still running: kept
    live.write_bytes(b"\0" * 10)
    assert _prepare([shared_file("tinystories_sample.txt")], out, "--separator", "endoftext").rc == 0
    assert not stale.exists() and live.exists()
    assert out.stat().st_size == shared_file("derived/tinystories_sample.tok512.bin").stat().st_size
