"""The embedded default data: real children's stories shipped with anetrain, a tokenizer trained on them,
and their token files.

``anetrain train`` with no ``--data`` calls :func:`prepare_embedded`, so a new user gets a complete,
meaningful run offline. The text is an excerpt of TinyStories (Eldan and Li, 2023; the first 4,300
paragraphs of the Hugging Face ``roneneldan/TinyStories`` validation split, 792 KB, shipped compressed as
``tinystories_excerpt.txt.bz2``: 163 KB), redistributed under its license, CDLA-Sharing-1.0 (see
``TINYSTORIES-NOTICE.md`` next to this module). Real text has what a generated corpus lacks: characters and
objects that stay the same through a story. The tokenizer is a 512-token sentencepiece BPE trained on the
excerpt (as llama2.c's tok512 is on TinyStories), and the token files are made by ``prepare`` (BOS before
each paragraph: the excerpt's story boundaries are not recoverable). Everything is cached
(``~/.cache/anetrain/embedded-...``), so only the first run pays for it.
"""

from __future__ import annotations

import bz2
import os
import re
from collections.abc import Callable
from pathlib import Path

from ..fsutil import atomic_write_bytes
from .prepare import prepare

EXCERPT = Path(__file__).with_name("tinystories_excerpt.txt.bz2")
VOCAB = 512

# Training settings for the embedded run (applied where the user gave none): a stories260K-sized model, a few
# minutes on 2 CPU cores (README, "Two commands": the measured time), a sample at the end.
EMBEDDED_DEFAULTS = {
    "model": "stories260K",
    "batch": 8,
    "seq": 256,
    "steps": 1500,
    "lr": 2e-3,
    "warmup": 50,
    "eval_every": 250,
    "eval_batches": 10,
    "log_every": 100,
    "sample_tokens": 200,
}

# The excerpt's text is the source's with its mojibake undone (UTF-8 quotes and dashes that were decoded as
# cp1252 and encoded again; the closing quote's last byte was lost) and with ASCII punctuation, so that a
# 512-token vocabulary does not spend pieces on five spellings of a quote.
_MOJIBAKE = (
    ("\u00e2\u20ac\u0153", '"'),  # “ as cp1252
    ("\u00e2\u20ac\u2122", "'"),  # ’
    ("\u00e2\u20ac\u02dc", "'"),  # ‘
    ("\u00e2\u20ac\u201c", "-"),  # –
    ("\u00e2\u20ac\u201d", "-"),  # —
    ("\u00e2\u20ac\u0160", " "),  # hair space
    ("\u00e2\u20ac", '"'),  # ” (its third byte lost)
    ("\u201c", '"'),
    ("\u201d", '"'),
)


def clean_tinystories(text: str) -> str:
    """The excerpt from the source text (tinystories_valid_head.txt of the shared test data): mojibake and
    typographic punctuation to ASCII, runs of spaces to one, paragraphs stripped, one blank line apart."""
    for bad, good in _MOJIBAKE:
        text = text.replace(bad, good)
    paragraphs = (re.sub(r"[ \t]+", " ", p).strip() for p in text.split("\n\n"))
    return "\n\n".join(p for p in paragraphs if p) + "\n"


def cache_dir() -> Path:
    """Where the embedded text, its tokenizer and its tokens are kept between runs."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "anetrain" / f"embedded-v2-tinystories-vocab{VOCAB}"


def prepare_embedded(
    directory: str | Path | None = None,
    *,
    vocab_size: int = VOCAB,
    log: Callable[[str], None] = print,
) -> tuple[Path, Path]:
    """(token file, tokenizer.bin) for the embedded text, made in ``directory`` (default: a cache shared by
    every run, :func:`cache_dir`) unless already there. Every file is written atomically, so an interrupted
    preparation is simply redone."""
    from ..tokenizer import train_tokenizer

    d = Path(directory) if directory is not None else cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    corpus, tokens = d / "stories.txt", d / "stories.bin"
    prefix = d / f"tok{vocab_size}"
    tok_bin = prefix.with_suffix(".bin")
    if not corpus.exists():
        log(f"unpacking the embedded TinyStories excerpt (CDLA-Sharing-1.0) into {corpus}")
        atomic_write_bytes(corpus, bz2.decompress(EXCERPT.read_bytes()))
    if not tok_bin.exists():
        log(f"training a {vocab_size}-token BPE tokenizer on it: {tok_bin}")
        train_tokenizer([corpus], vocab_size, str(prefix))
    if not tokens.exists():
        side = prepare([str(corpus)], str(prefix.with_suffix(".model")), tokens)
        log(f"tokenized: {side['n_tokens']:,} tokens in {tokens}")
    return tokens, tok_bin
