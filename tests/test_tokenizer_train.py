"""Training a BPE tokenizer as llama2.c's tinystories.py train_vocab, corpus reading, the train CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from anetrain.cli import main
from anetrain.errors import AnetrainError, InputError
from anetrain.tokenizer import export_tokenizer_bin, load_tokenizer, train_tokenizer
from anetrain.tokenizer.corpus import read_documents, split_documents
from helpers.data import shared_file


@pytest.fixture(scope="module")
def stories() -> list[str]:
    text = shared_file("tinystories_sample.txt").read_text(encoding="utf-8")
    return [s.strip() for s in text.split("<|endoftext|>") if s.strip()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, stories):
    out = tmp_path_factory.mktemp("tok")
    paths = train_tokenizer(
        [shared_file("tinystories_sample.txt")], 400, out / "tok400", separator="endoftext"
    )
    return out, paths


def test_writes_model_and_its_llama2c_export(trained, tmp_path) -> None:
    out, paths = trained
    assert paths.model == out / "tok400.model" and paths.bin == out / "tok400.bin"
    assert sorted(p.name for p in out.iterdir()) == ["tok400.bin", "tok400.model"]  # no temp files left
    again = export_tokenizer_bin(paths.model, tmp_path / "again.bin")
    assert again.read_bytes() == paths.bin.read_bytes()
    tok = load_tokenizer(paths.bin)
    assert tok.vocab_size == 400
    assert tok.pieces[:4] == [b"<unk>", b"\n<s>\n", b"\n</s>\n", b"<0x00>"] and tok.pieces[258] == b"<0xFF>"


def test_trainer_settings_are_llama2c_train_vocab(trained) -> None:
    m = model_pb2.ModelProto()
    m.ParseFromString(trained[1].model.read_bytes())
    t = m.trainer_spec
    assert t.model_type == model_pb2.TrainerSpec.BPE and t.vocab_size == 400
    assert t.character_coverage == 1.0 and t.split_digits and t.allow_whitespace_only_pieces
    assert t.byte_fallback and t.unk_surface == r" \342\201\207 "  # as tinystories.py passes it (raw)
    assert m.normalizer_spec.name == "identity"
    assert m.normalizer_spec.remove_extra_whitespaces  # left at the default, as in llama2.c


def test_same_vocabulary_as_sentencepiece_called_like_tinystories_py(trained, stories, tmp_path) -> None:
    """tinystories.py writes stripped stories one per line and calls the trainer with these arguments."""
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("".join(s + "\n" for s in stories), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(tiny),
        model_prefix=str(tmp_path / "ref"),
        model_type="bpe",
        vocab_size=400,
        self_test_sample_size=0,
        input_format="text",
        character_coverage=1.0,
        num_threads=os.cpu_count(),
        split_digits=True,
        allow_whitespace_only_pieces=True,
        byte_fallback=True,
        unk_surface=r" \342\201\207 ",
        normalization_rule_name="identity",
        minloglevel=2,
    )
    ref = export_tokenizer_bin(tmp_path / "ref.model", tmp_path / "ref.bin")
    assert ref.read_bytes() == trained[1].bin.read_bytes()


def test_trained_tokenizer_round_trips(trained, stories) -> None:
    bin_tok = load_tokenizer(trained[1].bin)
    sp_tok = load_tokenizer(trained[1].model)
    for story in stories:
        ids = bin_tok.encode(story)
        assert ids[0] == 1 and max(ids) < 400
        assert bin_tok.decode(ids) == story
        assert sp_tok.decode(sp_tok.encode(story)) == story
        assert sp_tok.encode(story) == ids  # no runs of spaces here, so run.c and sentencepiece agree
    # Characters never seen in training fall back to bytes and still round-trip.
    assert bin_tok.decode(bin_tok.encode("Zürich ✓ 42")) == "Zürich ✓ 42"


def test_string_items_are_documents_unless_they_name_a_file(tmp_path, stories) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(stories), encoding="utf-8")
    from_texts = train_tokenizer(stories, 350, tmp_path / "a")
    from_str_path = train_tokenizer([str(corpus)], 350, tmp_path / "b")  # blank-line separated file
    assert from_texts.bin.read_bytes() == from_str_path.bin.read_bytes()


def test_training_errors_are_reported(tmp_path) -> None:
    with pytest.raises(AnetrainError, match="smaller than required_chars"):
        train_tokenizer([shared_file("tinystories_sample.txt")], 280, tmp_path / "small")
    with pytest.raises(AnetrainError, match="no documents"):
        train_tokenizer(["", "   "], 300, tmp_path / "empty")
    assert not list(tmp_path.iterdir())


# ---- corpus reading --------------------------------------------------------------------------------


def test_split_documents() -> None:
    text = "  one\nstill one\n\n \n two \n\n\nthree\r\n\r\nfour"
    assert split_documents(text, "blank") == ["one\nstill one", "two", "three", "four"]
    assert split_documents("a\n<|endoftext|>\nb\n\nb2<|endoftext|>", "endoftext") == ["a", "b\n\nb2"]
    assert split_documents("a\n\nb\n", "line") == ["a", "b"]


def test_read_documents_formats(tmp_path) -> None:
    jl = tmp_path / "d.jsonl"
    jl.write_text('{"text": " first "}\n\n{"story": "second", "x": 1}\n', encoding="utf-8")
    assert list(read_documents(jl)) == ["first", "second"]
    js = tmp_path / "d.json"
    js.write_text(json.dumps([{"story": "a"}, {"text": "b"}]), encoding="utf-8")
    assert list(read_documents(js)) == ["a", "b"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.jsonl", b'{"text": "ok"}\n{oops\n', r"line 2: not valid JSON"),
        ("bad2.jsonl", b'{"title": "no text"}\n', r"line 1: expected an object with a string field"),
        ("bad.json", b'{"text": "not a list"}', r"expected a JSON list"),
        ("bad.txt", b"caf\xe9\n", r"not UTF-8 text \(bad byte at offset 3\)"),
    ],
)
def test_bad_corpus_files_are_refused(tmp_path, name: str, content: bytes, message: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputError, match=message) as e:
        list(read_documents(path))
    assert str(path) in str(e.value)


# ---- CLI ------------------------------------------------------------------------------------------------


def test_cli_train(tmp_path, stories, capsys) -> None:
    jl = tmp_path / "stories.jsonl"
    jl.write_text("".join(json.dumps({"text": s}) + "\n" for s in stories), encoding="utf-8")
    prefix = tmp_path / "out" / "tok"
    assert main(["tokenizer", "train", str(jl), "--vocab-size", "330", "--out", str(prefix)]) == 0
    assert capsys.readouterr().err == f"wrote {prefix}.model and {prefix}.bin\n"
    tok = load_tokenizer(Path(f"{prefix}.bin"))
    assert tok.vocab_size == 330 and tok.decode(tok.encode(stories[0])) == stories[0]
    assert main(["tokenizer", "train", str(jl), "--vocab-size", "100", "--out", str(prefix)]) == 2
    err = capsys.readouterr().err
    assert "could not train a 100-token vocabulary" in err and err.count("\n") == 1
