"""llama2.c tokenizer.bin reading, run.c encoding/decoding, sentencepiece parity and export, bad files.

Parity notes: on the 4,300 TinyStories validation paragraphs, run.c-style
encoding with the Llama-2 tokenizer.bin gives exactly sentencepiece's ids (tokenizer.model). With tok512 it
differs on exactly the paragraphs that contain a run of spaces: tok512.model keeps sentencepiece's default
whitespace normalization (runs of spaces collapse to one), while run.c encodes every space. Collapsing the
runs first makes run.c and sentencepiece agree there too.
"""

from __future__ import annotations

import random
import re
import shutil
import struct

import numpy as np
import pytest

from anetrain.cli import main
from anetrain.errors import InputError
from anetrain.tokenizer import (
    BinTokenizer,
    SentencePieceTokenizer,
    export_tokenizer_bin,
    load_tokenizer,
    read_tokenizer_bin,
    write_tokenizer_bin,
)
from helpers.data import shared_file

# llama2.c test.c: (text, ids) with the Llama-2 tokenizer.bin, bos=1, eos=0.
# fmt: off
TEST_C_VECTORS = [
    ("", [1]),
    ("I believe the meaning of life is", [1, 306, 4658, 278, 6593, 310, 2834, 338]),
    (
        "Simply put, the theory of relativity states that ",
        [1, 3439, 17632, 1925, 29892, 278, 6368, 310, 14215, 537, 5922, 393, 29871],
    ),
    (
        "A brief message congratulating the team on the launch:\n\n        Hi everyone,\n\n        I just ",
        [1, 319, 11473, 2643, 378, 629, 271, 18099, 278, 3815, 373, 278, 6826, 29901, 13, 13, 4706, 6324,
         14332, 29892, 13, 13, 4706, 306, 925, 29871],
    ),
    (
        "Translate English to French:\n\n        sea otter => loutre de mer\n        peppermint => menthe "
        "poivrée\n        plush girafe => girafe peluche\n        cheese =>",
        [1, 4103, 9632, 4223, 304, 5176, 29901, 13, 13, 4706, 7205, 4932, 357, 1149, 301, 449, 276, 316,
         2778, 13, 4706, 1236, 407, 837, 524, 1149, 6042, 354, 772, 440, 29878, 1318, 13, 4706, 715, 1878,
         330, 3055, 1725, 1149, 330, 3055, 1725, 4639, 28754, 13, 4706, 923, 968, 1149],
    ),
]
# fmt: on


@pytest.fixture(scope="module")
def llama2_bin() -> BinTokenizer:
    return BinTokenizer.load(shared_file("tokenizer.bin"), 32000)


@pytest.fixture(scope="module")
def tok512_bin() -> BinTokenizer:
    return BinTokenizer.load(shared_file("tok512.bin"), 512)


@pytest.fixture(scope="module")
def paragraphs() -> list[str]:
    text = shared_file("tinystories_valid_head.txt").read_text(encoding="utf-8")
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def runc_encode_naive(tok: BinTokenizer, text: str) -> list[int]:
    """run.c's encode() transcribed literally (quadratic rescans), to check the heap-based merge."""
    ids = [1]
    if text:
        ids.append(tok.pieces.index(b" "))
    for ch in text:
        b = ch.encode("utf-8")
        ids += [tok.pieces.index(b)] if b in tok.pieces else [x + 3 for x in b]
    lookup = {p: i for i, p in reversed(list(enumerate(tok.pieces)))}
    while True:
        best, best_id, best_idx = np.float32(-1e10), -1, -1
        for i in range(len(ids) - 1):
            j = lookup.get(tok.pieces[ids[i]] + tok.pieces[ids[i + 1]], -1)
            if j != -1 and tok.scores[j] > best:
                best, best_id, best_idx = tok.scores[j], j, i
        if best_idx == -1:
            return ids
        ids[best_idx : best_idx + 2] = [best_id]


# ---- reading -------------------------------------------------------------------------------------


def test_reads_both_vocabularies_completely() -> None:
    for name, n, max_len, space_id in (("tokenizer.bin", 32000, 27, 29871), ("tok512.bin", 512, 7, 410)):
        got_max, pieces, scores = read_tokenizer_bin(shared_file(name))
        assert (len(pieces), got_max, max(len(p) for p in pieces)) == (n, max_len, max_len)
        assert pieces[:3] == [b"<unk>", b"\n<s>\n", b"\n</s>\n"]
        assert pieces[3] == b"<0x00>" and pieces[258] == b"<0xFF>"
        assert pieces.index(b" ") == space_id
        assert scores.dtype == np.float32 and scores.shape == (n,)


def test_vocab_size_reads_a_prefix_and_refuses_more_than_the_file_has(tmp_path) -> None:
    path = shared_file("tok512.bin")
    tok = load_tokenizer(path, vocab_size=300)
    assert tok.vocab_size == 300 and tok.pieces == read_tokenizer_bin(path)[1][:300]
    with pytest.raises(InputError, match=r"has 512 entries, fewer than the model's vocabulary of 600"):
        load_tokenizer(path, vocab_size=600)
    # Without a count in the file, a file cut at an entry boundary is a smaller tokenizer; only the
    # model's vocabulary size can tell.
    cut = tmp_path / "cut.bin"
    cut.write_bytes(path.read_bytes()[:100])
    assert load_tokenizer(cut).vocab_size == 7
    with pytest.raises(InputError, match=r"has 7 entries, fewer than the model's vocabulary of 512"):
        load_tokenizer(cut, vocab_size=512)


def test_fingerprint_identifies_the_vocabulary(tok512_bin: BinTokenizer, llama2_bin: BinTokenizer) -> None:
    """A .model and the tokenizer.bin exported from it share a fingerprint; other vocabularies do not."""
    assert tok512_bin.fingerprint() == load_tokenizer(shared_file("tok512.model")).fingerprint()
    assert llama2_bin.fingerprint() == load_tokenizer(shared_file("tokenizer.model")).fingerprint()
    assert llama2_bin.fingerprint() != tok512_bin.fingerprint()
    assert len(tok512_bin.fingerprint()) == 64


def test_load_tokenizer_picks_the_reader(tmp_path) -> None:
    assert isinstance(load_tokenizer(shared_file("tok512.bin")), BinTokenizer)
    assert isinstance(load_tokenizer(shared_file("tok512.model")), SentencePieceTokenizer)
    # By content when the extension says nothing.
    shutil.copy(shared_file("tok512.bin"), tmp_path / "a.tok")
    shutil.copy(shared_file("tok512.model"), tmp_path / "b.tok")
    assert isinstance(load_tokenizer(tmp_path / "a.tok"), BinTokenizer)
    sp = load_tokenizer(tmp_path / "b.tok")
    assert isinstance(sp, SentencePieceTokenizer) and sp.vocab_size == 512


# ---- bad files -----------------------------------------------------------------------------------


def _entries(path) -> bytes:
    return shared_file(path).read_bytes()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda good: b"", r"truncated: 0 bytes"),
        (lambda good: good[:101], r"truncated in the header of entry 7"),
        (lambda good: good[:-3], r"truncated in the bytes of entry 511"),
        (lambda good: struct.pack("<i", -5) + good[4:], r"max_token_length -5"),
        (lambda good: good[:4] + struct.pack("<fi", 0.0, 99) + good[12:], r"entry 0 has length 99"),
        (lambda good: good[:4] + struct.pack("<f", float("nan")) + good[8:], r"entry 0 has a NaN score"),
        (lambda good: bytes(random.Random(0).randrange(256) for _ in range(5000)), r"max_token_length|entry"),
    ],
    ids=["empty", "cut-header", "cut-piece", "negative-max", "long-piece", "nan-score", "garbage"],
)
def test_bad_tokenizer_bin_is_refused(tmp_path, make, message) -> None:
    bad = tmp_path / "bad.bin"
    bad.write_bytes(make(_entries("tok512.bin")))
    with pytest.raises(InputError, match=message) as e:
        load_tokenizer(bad)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)


def test_bad_model_files_are_refused(tmp_path) -> None:
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"\x0a\x05hello, not a sentencepiece model")
    with pytest.raises(InputError, match="not a sentencepiece model"):
        load_tokenizer(bad)
    with pytest.raises(InputError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.bin")
    with pytest.raises(InputError, match="is a directory"):
        load_tokenizer(tmp_path)
    other = tmp_path / "junk.tok"
    other.write_bytes(b"\xff" * 64)
    with pytest.raises(InputError, match=r"neither a llama2\.c tokenizer\.bin"):
        load_tokenizer(other)


def test_cli_reports_a_bad_tokenizer_in_one_line(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.bin"
    bad.write_bytes(_entries("tok512.bin")[:50])
    assert main(["tokenizer", "encode", "--tokenizer", str(bad), "hello"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("anetrain: error: ") and str(bad) in err and err.count("\n") == 1


# ---- run.c encoding and decoding -------------------------------------------------------------------


@pytest.mark.parametrize(("text", "ids"), TEST_C_VECTORS, ids=[f"test.c-{i}" for i in range(5)])
def test_llama2c_test_vectors(llama2_bin: BinTokenizer, text: str, ids: list[int]) -> None:
    assert llama2_bin.encode(text) == ids
    assert llama2_bin.encode(text.encode("utf-8")) == ids  # the raw-byte walk agrees
    assert llama2_bin.encode(text, bos=False, eos=True) == [*ids[1:], 2]
    assert llama2_bin.decode(ids) == text


def test_heap_merge_equals_runc_quadratic_loop(tok512_bin: BinTokenizer, paragraphs: list[str]) -> None:
    rng = random.Random(1)
    alphabet = sorted(set("".join(paragraphs[:200])) | {"é", "ü", "😀"})
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 60))) for _ in range(150)]
    texts += ["aaaaaaa", "   ", "the the the", "\n\n\n", "  two  spaces  ", *paragraphs[:20]]
    for text in texts:
        assert tok512_bin.encode(text) == runc_encode_naive(tok512_bin, text), text


def test_equal_scores_merge_leftmost_first(tmp_path) -> None:
    """A vocabulary full of equal scores, where only leftmost-first reproduces run.c's choices."""
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [b"<0x%02X>" % b for b in range(256)]
    extra = [
        b" ",
        b"a",
        b"b",
        b"aa",
        b"ab",
        b"ba",
        b"bb",
        b"aab",
        b"aba",
        b"abb",
        b"bab",
        b" a",
        b" aa",
        b"bbb",
    ]
    scores = [0.0] * 259 + [-1.0, -2.0, -2.0] + [-3.0] * 4 + [-3.0, -4.0, -4.0, -3.0, -5.0, -3.0, -1e10]
    write_tokenizer_bin(tmp_path / "t.bin", pieces + extra, scores)
    tok = load_tokenizer(tmp_path / "t.bin")
    assert tok.pieces == pieces + extra and tok.scores.tolist() == scores
    rng = random.Random(3)
    for _ in range(300):
        text = "".join(rng.choice("ab ") for _ in range(rng.randrange(1, 30)))
        assert tok.encode(text) == runc_encode_naive(tok, text), text
    bbb = len(pieces) + extra.index(b"bbb")
    assert bbb not in tok.encode("bbbbbb")  # a score of -1e10 never merges (run.c needs > -1e10)


def test_byte_fallback_and_raw_bytes(tok512_bin: BinTokenizer) -> None:
    # "😀" is not a tok512 piece: its 4 UTF-8 bytes become <0xF0> <0x9F> <0x98> <0x80>, ids byte + 3.
    ids = tok512_bin.encode("😀", bos=False)
    assert ids == [410, 0xF0 + 3, 0x9F + 3, 0x98 + 3, 0x80 + 3]
    assert tok512_bin.decode(ids) == "😀"
    # A stray continuation byte (invalid UTF-8) is encoded on its own, as run.c does.
    assert tok512_bin.encode(b"\x80", bos=False) == [410, 0x80 + 3]


def test_decode_piece_follows_runc(tok512_bin: BinTokenizer) -> None:
    once = tok512_bin.encode("Once", bos=False)[0]
    assert tok512_bin.pieces[once].startswith(b" ")
    assert tok512_bin.decode_piece(1, once) == tok512_bin.pieces[once][1:]  # space dropped after BOS
    assert tok512_bin.decode_piece(5, once) == tok512_bin.pieces[once]
    assert tok512_bin.decode_piece(5, 13) == b"\n"  # <0x0A>
    assert tok512_bin.decode_piece(5, 0x80 + 3) == b"\x80"
    assert tok512_bin.decode_piece(5, 1) == b"\n<s>\n"
    # decode() leaves BOS/EOS out and treats the start as following BOS.
    assert tok512_bin.decode([1, once, 2]) == "Once"
    assert tok512_bin.decode([once]) == "Once"


@pytest.mark.parametrize("name", ["tokenizer.bin", "tok512.bin"])
def test_tinystories_round_trip(name: str, paragraphs: list[str]) -> None:
    tok = BinTokenizer.load(shared_file(name))
    for p in paragraphs:
        assert tok.decode(tok.encode(p)) == p


def test_whole_file_round_trip_tok512(tok512_bin: BinTokenizer) -> None:
    """800 KB in one call: the heap merge keeps this to seconds (run.c's rescans would take hours)."""
    text = shared_file("tinystories_valid_head.txt").read_text(encoding="utf-8")
    ids = tok512_bin.encode(text)
    assert 350_000 < len(ids) < 420_000
    assert tok512_bin.decode(ids) == text


# ---- parity with sentencepiece -----------------------------------------------------------------------


def test_runc_encoding_equals_sentencepiece_for_llama2(llama2_bin: BinTokenizer, paragraphs) -> None:
    sp = load_tokenizer(shared_file("tokenizer.model"))
    mismatches = [p for p in paragraphs if llama2_bin.encode(p) != sp.encode(p)]
    assert len(paragraphs) == 4300 and mismatches == []


def test_runc_encoding_differs_from_sentencepiece_for_tok512_only_on_double_spaces(
    tok512_bin: BinTokenizer, paragraphs
) -> None:
    sp = load_tokenizer(shared_file("tok512.model"))
    mismatches = [p for p in paragraphs if tok512_bin.encode(p) != sp.encode(p)]
    assert len(mismatches) == 4
    assert all("  " in p for p in mismatches)
    for p in mismatches:
        collapsed = re.sub(" +", " ", p)
        assert tok512_bin.encode(collapsed) == sp.encode(p)


@pytest.mark.parametrize(("model", "golden"), [("tok512.model", "tok512"), ("tokenizer.model", "llama2")])
def test_sentencepiece_path_reproduces_the_pretokenized_goldens(model: str, golden: str, paragraphs) -> None:
    """derived/tinystories_valid_head.*.bin: BOS + sentencepiece ids per paragraph, uint16."""
    tok = load_tokenizer(shared_file(model))
    expected = np.fromfile(shared_file(f"derived/tinystories_valid_head.{golden}.bin"), dtype="<u2")
    got = np.concatenate([np.asarray(tok.encode(p, bos=True), dtype="<u2") for p in paragraphs])
    np.testing.assert_array_equal(got, expected)


def test_sentencepiece_tokenizer_streams_with_the_exported_pieces() -> None:
    sp = load_tokenizer(shared_file("tok512.model"))
    bin_tok = load_tokenizer(shared_file("tok512.bin"))
    assert sp.pieces == bin_tok.pieces
    np.testing.assert_array_equal(sp.scores, bin_tok.scores)
    ids = sp.encode('Once upon a time, Lily said: "hi!"')
    assert sp.decode(ids) == bin_tok.decode(ids) == 'Once upon a time, Lily said: "hi!"'
    assert (sp.bos_id, sp.eos_id) == (1, 2)


# ---- export ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tok512", "tokenizer"])
def test_export_is_byte_identical_to_llama2c(tmp_path, name: str) -> None:
    out = export_tokenizer_bin(shared_file(f"{name}.model"), tmp_path / f"{name}.bin")
    assert out.read_bytes() == shared_file(f"{name}.bin").read_bytes()


def test_cli_export_encode_decode_info(tmp_path, capsys) -> None:
    out = tmp_path / "t.bin"
    assert main(["tokenizer", "export", str(shared_file("tok512.model")), "--out", str(out)]) == 0
    assert out.read_bytes() == shared_file("tok512.bin").read_bytes()
    capsys.readouterr()
    tok = str(shared_file("tokenizer.bin"))
    assert main(["tokenizer", "encode", "--tokenizer", tok, TEST_C_VECTORS[1][0]]) == 0
    assert capsys.readouterr().out == " ".join(map(str, TEST_C_VECTORS[1][1])) + "\n"
    assert main(["tokenizer", "encode", "--tokenizer", tok, "--no-bos", "--eos", "I believe"]) == 0
    assert capsys.readouterr().out == "306 4658 2\n"
    assert main(["tokenizer", "decode", "--tokenizer", tok, *map(str, TEST_C_VECTORS[1][1])]) == 0
    assert capsys.readouterr().out == TEST_C_VECTORS[1][0] + "\n"
    assert main(["tokenizer", "decode", "--tokenizer", tok, "32000"]) == 2
    assert "outside the vocabulary" in capsys.readouterr().err
    assert main(["tokenizer", "info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "vocab_size: 512" in info and "fingerprint: sha256:ab1c02fa" in info
