"""Token files and samplers, black-box: bad data is refused by `anetrain train` with one line and exit 2,
files are memory-mapped, the held-out tail is never sampled, and drand48 reproduces the original's order."""

from __future__ import annotations

import numpy as np
import pytest

from anetrain.data.sampler import Drand48Sampler, RandomSampler
from anetrain.data.tokens import open_tokens
from anetrain.rng import Drand48
from anetrain.tokenizer import load_tokenizer
from helpers.data import shared_file
from helpers.train import (
    SEQ,
    drand48_positions,
    error_line,
    record_windows,
    resume_argv,
    run_cli,
    scalar_drand48,
    train_argv,
    training_positions,
    valid_head_tokens,
    write_model,
    write_tokens,
)


def _good_ids(n: int = 2000) -> np.ndarray:
    return np.arange(n) % 500


# ---- refused data ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("empty.bin", b"", "empty"),
        ("odd.bin", b"\x01\x00\x02\x00\x03", "odd byte length 5"),
        ("short.bin", np.arange(1, 21, dtype="<u2").tobytes(), "fewer than one window of seq+1 = 33 tokens"),
        (
            "big_ids.bin",
            np.r_[_good_ids(), [600, 700, 511]].astype("<u2").tobytes(),
            "2 token ids are >= the model's vocabulary size 512",
        ),
    ],
)
def test_bad_token_file_is_refused_with_one_line(tmp_path, name, content, problem):
    data = tmp_path / name
    data.write_bytes(content)
    res = run_cli(train_argv(write_model(tmp_path), data, tmp_path / "run"))
    line = error_line(res)
    assert str(data) in line
    assert problem in line


def test_missing_token_file_is_refused(tmp_path):
    missing = tmp_path / "nope.bin"
    line = error_line(run_cli(train_argv(write_model(tmp_path), missing, tmp_path / "run")))
    assert f"{missing}: no such token file" in line


def test_missing_validation_file_is_refused(tmp_path):
    data = write_tokens(tmp_path / "t.bin", _good_ids())
    missing = tmp_path / "val.bin"
    argv = [*train_argv(write_model(tmp_path), data, tmp_path / "run"), "--val-data", str(missing)]
    assert f"{missing}: no such token file" in error_line(run_cli(argv))


def test_too_short_validation_file_is_refused(tmp_path):
    data = write_tokens(tmp_path / "t.bin", _good_ids())
    val = write_tokens(tmp_path / "val.bin", _good_ids(20))
    argv = [*train_argv(write_model(tmp_path), data, tmp_path / "run"), "--val-data", str(val)]
    line = error_line(run_cli(argv))
    assert f"{val}: validation data has 20 tokens" in line


def test_debug_shows_the_traceback(tmp_path):
    res = run_cli(["--debug", *train_argv(write_model(tmp_path), tmp_path / "nope.bin", tmp_path / "r")])
    assert res.rc == 2
    assert "Traceback" in res.err
    assert res.err.strip().splitlines()[-1].startswith("anetrain: error: ")


def test_sidecar_with_a_larger_vocabulary_is_refused(tmp_path):
    data = write_tokens(tmp_path / "t.bin", _good_ids(), sidecar={"vocab_size": 32000, "n_tokens": 2000})
    line = error_line(run_cli(train_argv(write_model(tmp_path), data, tmp_path / "run")))
    assert f"{data}.json" in line
    assert "32000" in line and "512" in line


def test_sidecar_with_a_smaller_vocabulary_is_accepted(tmp_path):
    """A model whose vocabulary is larger than the tokenizer's is legitimate (the original trains its
    Qwen3-shaped 151,936-token model on Llama-2 tokens), so only a larger tokenizer is refused."""
    data = write_tokens(tmp_path / "t.bin", _good_ids() % 256, sidecar={"vocab_size": 256, "n_tokens": 2000})
    assert run_cli(train_argv(write_model(tmp_path), data, tmp_path / "run")).rc == 0


def test_sidecar_token_count_mismatch_is_refused(tmp_path):
    data = write_tokens(tmp_path / "t.bin", _good_ids(), sidecar={"vocab_size": 512, "n_tokens": 1999})
    line = error_line(run_cli(train_argv(write_model(tmp_path), data, tmp_path / "run")))
    assert "1999" in line and "2000" in line


def test_sidecar_of_another_tokenizer_is_refused_and_the_right_one_accepted(tmp_path):
    tok = shared_file("tok512.model")
    fingerprint = load_tokenizer(tok).fingerprint()
    model = write_model(tmp_path)
    other = write_tokens(
        tmp_path / "other.bin",
        _good_ids(),
        sidecar={
            "vocab_size": 512,
            "n_tokens": 2000,
            "tokenizer_fingerprint": "0" * 64,
            "tokenizer": "x.model",
        },
    )
    res = run_cli([*train_argv(model, other, tmp_path / "r1", steps=1), "--tokenizer", str(tok)])
    line = error_line(res)
    assert f"{other}.json" in line and "fingerprint" in line
    same = write_tokens(
        tmp_path / "same.bin",
        _good_ids(),
        sidecar={"vocab_size": 512, "n_tokens": 2000, "tokenizer_fingerprint": fingerprint},
    )
    res = run_cli([*train_argv(model, same, tmp_path / "r2", steps=1), "--tokenizer", str(tok)])
    assert res.rc == 0, res.err


def test_held_out_tail_shorter_than_a_window_is_refused(tmp_path):
    data = write_tokens(tmp_path / "t.bin", _good_ids(300))
    res = run_cli(train_argv(write_model(tmp_path), data, tmp_path / "run", val_fraction=0.05))
    line = error_line(res)
    assert "validation" in line and "15 tokens" in line


# ---- memory mapping ----------------------------------------------------------------------------------------


def test_token_file_is_memory_mapped(tmp_path):
    ids = _good_ids(1000)
    tf = open_tokens(write_tokens(tmp_path / "t.bin", ids))
    assert isinstance(tf.tokens, np.memmap)
    assert tf.tokens.dtype == np.dtype("<u2")
    np.testing.assert_array_equal(np.asarray(tf.tokens), ids)


def test_trainer_samples_from_a_memmap(tmp_path, monkeypatch):
    windows = record_windows(monkeypatch)
    res = run_cli(train_argv(write_model(tmp_path), valid_head_tokens(), tmp_path / "run", steps=2))
    assert res.rc == 0, res.err
    train = [w for w in windows if w.caller == "next_batch"]
    assert len(train) == 2
    assert all(issubclass(w.tokens_type, np.memmap) for w in windows)


# ---- the held-out tail -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["random", "drand48"])
def test_sampler_never_touches_the_held_out_tail(tmp_path, kind):
    n, n_train, seq, batch = 1000, 900, 32, 64
    tokens = open_tokens(write_tokens(tmp_path / "t.bin", np.arange(n))).tokens  # token value = position
    s = (
        RandomSampler(tokens, n_train, seq, batch, seed=3)
        if kind == "random"
        else Drand48Sampler(tokens, n_train, seq, batch)
    )
    starts = []
    for _ in range(300):
        w = s.next_batch()
        assert tuple(w.shape) == (batch, seq + 1)
        starts.append(w[:, 0].numpy())
    starts = np.concatenate(starts)
    assert starts.min() >= 0
    # The last token of every window lies before the tail, and 19,200 draws cover the range to its end.
    assert starts.max() + seq < n_train
    assert starts.max() >= n_train - seq - 3


def test_training_windows_avoid_the_validation_tail_in_a_run(tmp_path, monkeypatch):
    data = write_tokens(tmp_path / "t.bin", np.arange(4000) % 500)
    windows = record_windows(monkeypatch)
    argv = train_argv(write_model(tmp_path), data, tmp_path / "run", steps=40, val_fraction=0.25, batch=8)
    assert run_cli(argv).rc == 0
    n_train = 4000 - 1000
    train = training_positions(windows)
    assert train.size == 40 * 8
    assert train.max() + SEQ + 1 <= n_train
    val = np.concatenate([w.positions for w in windows if w.caller != "next_batch"])
    assert val.min() >= n_train and val.max() + SEQ + 1 <= 4000


# ---- drand48 -----------------------------------------------------------------------------------------------


def test_rng_matches_the_scalar_drand48_reference():
    assert list(Drand48(42).random(1000)) == scalar_drand48(42, 1000)
    assert list(Drand48(2**32 + 7).random(10)) == scalar_drand48(7, 10)  # srand48 takes a 32-bit seed


def test_drand48_sampler_reproduces_the_originals_positions(tmp_path):
    n, seq, batch = 30000, 32, 4
    tokens = open_tokens(write_tokens(tmp_path / "t.bin", np.arange(n))).tokens  # token value = position
    s = Drand48Sampler(tokens, n, seq, batch)
    got = []
    for _ in range(50):
        w = s.next_batch().numpy()
        got += [int(row[0]) for row in w]
        assert (np.diff(w, axis=1) == 1).all()  # contiguous windows of seq + 1 tokens
    assert got == drand48_positions(42, 200, n, seq)


def test_drand48_sampler_reseeds_with_42_plus_start(tmp_path):
    tokens = open_tokens(write_tokens(tmp_path / "t.bin", np.arange(5000))).tokens
    s = Drand48Sampler(tokens, 5000, SEQ, 2)
    s.restore({"name": "drand48", "drawn": 10})
    got = [int(x) for _ in range(3) for x in s.next_batch()[:, 0]]
    assert got == drand48_positions(52, 6, 5000, SEQ)
    assert s.state()["drawn"] == 16


def test_trainer_drand48_order_and_its_reseed_on_resume(tmp_path, monkeypatch):
    """A --sampler drand48 run draws floor(drand48()*(n_train-S-1)) after srand48(42); a resume reseeds
    srand48(42 + windows drawn so far), as the original does."""
    data = valid_head_tokens()
    n = data.stat().st_size // 2
    n_train = n - int(n * 0.1)
    windows = record_windows(monkeypatch)
    run = tmp_path / "run"
    argv = train_argv(write_model(tmp_path), data, run, sampler="drand48", accum=2, steps=4, stop_at=2)
    assert run_cli(argv).rc == 0
    first = training_positions(windows).tolist()
    assert first == drand48_positions(42, 2 * 2 * 2, n_train, SEQ)
    windows.clear()
    assert run_cli(resume_argv(run, stop_at=4)).rc == 0
    assert training_positions(windows).tolist() == drand48_positions(42 + 8, 8, n_train, SEQ)


def test_trainer_drand48_without_a_held_out_tail_spans_the_whole_file(tmp_path, monkeypatch):
    """--val-fraction 0 (as the original, which holds nothing out): n is the file's token count."""
    data = valid_head_tokens()
    n = data.stat().st_size // 2
    windows = record_windows(monkeypatch)
    argv = train_argv(write_model(tmp_path), data, tmp_path / "r", sampler="drand48", steps=3, val_fraction=0)
    assert run_cli(argv).rc == 0
    assert training_positions(windows).tolist() == drand48_positions(42, 6, n, SEQ)
