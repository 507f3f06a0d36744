"""Training a new BPE tokenizer with sentencepiece, exactly as llama2.c's ``tinystories.py train_vocab``.

The corpus is written one stripped document per line to a temporary file, and sentencepiece trains on it
with llama2.c's settings (:data:`LLAMA2C_TRAINER_OPTIONS`): BPE, full character coverage, digits split,
whitespace-only pieces allowed, byte fallback, ``unk_surface`` " ⁇ " and the ``identity`` normalization
rule (whitespace collapsing stays at sentencepiece's default, as in llama2.c). The result is written
atomically as ``PREFIX.model`` and exported as ``PREFIX.bin`` (llama2.c ``tokenizer.bin``).
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import sentencepiece as spm

from ..errors import AnetrainError
from ..fsutil import atomic_write_bytes
from .corpus import read_documents
from .llama2c import write_tokenizer_bin
from .spm import export_pieces

# tinystories.py train_vocab's arguments to SentencePieceTrainer.train (unk_surface is the raw string
# " \342\201\207 " with literal backslashes, as there; sentencepiece unescapes it to " ⁇ ").
LLAMA2C_TRAINER_OPTIONS: dict[str, object] = {
    "model_type": "bpe",
    "self_test_sample_size": 0,
    "input_format": "text",
    "character_coverage": 1.0,
    "split_digits": True,
    "allow_whitespace_only_pieces": True,
    "byte_fallback": True,
    "unk_surface": r" \342\201\207 ",
    "normalization_rule_name": "identity",
}


class TokenizerPaths(NamedTuple):
    model: Path  # the sentencepiece model
    bin: Path  # its llama2.c export


def _documents(sources: Iterable[str | os.PathLike[str]], separator: str) -> Iterable[str]:
    """Documents from a mix of corpus files and texts (see :func:`train_tokenizer`)."""
    for src in sources:
        is_text = isinstance(src, str) and ("\n" in src or not os.path.isfile(src))
        if is_text:
            yield str(src).strip()
        else:
            yield from read_documents(src, separator)


def train_tokenizer(
    texts_or_files: Iterable[str | os.PathLike[str]],
    vocab_size: int,
    out_prefix: str | os.PathLike[str],
    *,
    separator: str = "blank",
    verbose: bool = False,
) -> TokenizerPaths:
    """Train a BPE tokenizer on documents and write ``PREFIX.model`` and ``PREFIX.bin``.

    Each item of ``texts_or_files`` is a corpus file (a ``Path`` or other ``os.PathLike``, or a ``str`` that
    names an existing file; formats in :mod:`anetrain.tokenizer.corpus`, ``separator`` applying to plain
    text) or else, as a ``str``, the text of one document.
    Raises :class:`AnetrainError` when the corpus is empty or sentencepiece refuses (e.g. a vocabulary
    smaller than the 259 byte and control pieces plus the corpus' characters).
    """
    if vocab_size <= 0:
        raise AnetrainError(f"vocabulary size must be positive, got {vocab_size}")
    prefix = os.fspath(out_prefix)
    paths = TokenizerPaths(Path(prefix + ".model"), Path(prefix + ".bin"))
    model = io.BytesIO()
    with tempfile.TemporaryDirectory(prefix="anetrain-tok-") as tmp:
        corpus = Path(tmp) / "corpus.txt"
        n_docs = 0
        with open(corpus, "w", encoding="utf-8") as f:
            for doc in _documents(texts_or_files, separator):
                if doc:
                    f.write(doc + "\n")
                    n_docs += 1
        if n_docs == 0:
            raise AnetrainError("the training corpus has no documents")
        try:
            spm.SentencePieceTrainer.train(
                input=str(corpus),
                model_writer=model,
                vocab_size=vocab_size,
                num_threads=os.cpu_count() or 1,
                minloglevel=0 if verbose else 2,
                **LLAMA2C_TRAINER_OPTIONS,
            )
        except RuntimeError as e:
            first = str(e).splitlines()[0] if str(e) else "unknown error"
            raise AnetrainError(
                f"sentencepiece could not train a {vocab_size}-token vocabulary: {first}"
            ) from None
    proto = model.getvalue()
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(proto)
    pieces, scores = export_pieces(sp)
    atomic_write_bytes(paths.model, proto)
    write_tokenizer_bin(paths.bin, pieces, [float(s) for s in scores])
    return paths
