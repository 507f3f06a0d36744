"""Tokenizers: llama2.c ``tokenizer.bin``, sentencepiece ``.model`` and Hugging Face ``tokenizer.json`` files
behind one interface.

``load_tokenizer(path, vocab_size=None)`` picks the reader by extension (``.model``, ``.bin``, ``.json``; a
directory or a Hugging Face Hub id means its ``tokenizer.json``) or, for other names, by content, and returns
a :class:`Tokenizer`: ``vocab_size``, ``bos_id`` (1), ``eos_id`` (2),
``encode(text, bos=True, eos=False)``, ``decode(ids)``, ``decode_piece(prev_id, id)`` (``run.c``'s bytes,
for streaming), ``name``, ``path`` and ``fingerprint()`` (the file's sha256, to check that a token file was
made with the same tokenizer).

``train_tokenizer`` trains a new BPE vocabulary as llama2.c does; ``export_tokenizer_bin`` converts a
``.model`` into a ``tokenizer.bin``.
"""

from __future__ import annotations

import os

from ..errors import InputError
from .base import BOS_ID, EOS_ID, Tokenizer
from .hf import HFTokenizer
from .llama2c import BinTokenizer, read_tokenizer_bin, write_tokenizer_bin
from .spm import SentencePieceTokenizer, export_tokenizer_bin
from .train import TokenizerPaths, train_tokenizer

__all__ = [
    "BOS_ID",
    "EOS_ID",
    "BinTokenizer",
    "HFTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "TokenizerPaths",
    "export_tokenizer_bin",
    "load_tokenizer",
    "read_tokenizer_bin",
    "train_tokenizer",
    "write_tokenizer_bin",
]


def load_tokenizer(path: str | os.PathLike[str], vocab_size: int | None = None) -> Tokenizer:
    """Open a tokenizer file; with ``vocab_size`` (the model's), one with fewer entries is refused.

    For a ``tokenizer.bin`` exactly ``vocab_size`` entries are read (as ``run.c`` does); without it, all.
    """
    from ..formats.hub import local_path

    p = local_path(path)
    if p.is_dir():
        if not (p / "tokenizer.json").is_file():
            raise InputError(
                p,
                "is a directory without a tokenizer.json (expected tokenizer.bin, .model or tokenizer.json)",
            )
        p = p / "tokenizer.json"
    if not p.exists():
        raise InputError(p, "tokenizer file does not exist")
    suffix = p.suffix.lower()
    tok: Tokenizer
    if suffix == ".json":
        tok = HFTokenizer(p)
    elif suffix == ".model":
        tok = SentencePieceTokenizer.load(p)
    elif suffix == ".bin":
        tok = BinTokenizer.load(p, vocab_size)
    else:  # by content: a tokenizer.bin, else a sentencepiece model
        try:
            tok = BinTokenizer.load(p, vocab_size)
        except InputError as bin_error:
            try:
                tok = SentencePieceTokenizer.load(p)
            except InputError:
                raise InputError(
                    p, f"neither a llama2.c tokenizer.bin ({bin_error.problem}) nor a sentencepiece model"
                ) from None
    if vocab_size is not None:
        tok.check_covers(vocab_size)
    return tok
