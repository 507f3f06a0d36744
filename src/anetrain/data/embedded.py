"""The embedded default data: a generated story corpus, a tokenizer trained on it, and its token files.

``anetrain train`` with no ``--data`` calls :func:`prepare_embedded`, so a new user gets a complete,
meaningful run offline: the corpus generator (``data/stories.py``) is deterministic, the tokenizer is a
512-token sentencepiece BPE trained on the corpus (as llama2.c's tok512), and the token files are made by
``prepare`` (BOS before each story). Everything is cached (``~/.cache/anetrain/embedded-...``), so only
the first run pays for it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from .prepare import prepare
from .stories import write_corpus

N_STORIES = 24000
SEED = 0
VOCAB = 512

# Training settings for the embedded run (applied where the user gave none): a stories260K-sized model,
# about three minutes on 2 CPU cores (the first run also makes the corpus and tokenizer), a sample at the end.
EMBEDDED_DEFAULTS = {
    "model": "stories260K",
    "batch": 8,
    "seq": 256,
    "steps": 3000,
    "lr": 2e-3,
    "warmup": 50,
    "eval_every": 500,
    "eval_batches": 10,
    "log_every": 100,
    "sample_tokens": 200,
}


def cache_dir(n_stories: int = N_STORIES, seed: int = SEED, vocab_size: int = VOCAB) -> Path:
    """Where the embedded corpus, its tokenizer and its tokens are kept between runs."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "anetrain" / f"embedded-v1-seed{seed}-n{n_stories}-vocab{vocab_size}"


def prepare_embedded(
    directory: str | Path | None = None,
    *,
    n_stories: int = N_STORIES,
    seed: int = SEED,
    vocab_size: int = VOCAB,
    log: Callable[[str], None] = print,
) -> tuple[Path, Path]:
    """(token file, tokenizer.bin) for the embedded corpus, generated into ``directory`` (default: a cache
    shared by every run, :func:`cache_dir`) unless already there. Every file is written atomically, so an
    interrupted preparation is simply redone."""
    from ..tokenizer import train_tokenizer

    d = Path(directory) if directory is not None else cache_dir(n_stories, seed, vocab_size)
    d.mkdir(parents=True, exist_ok=True)
    corpus, tokens = d / "stories.txt", d / "stories.bin"
    prefix = d / f"tok{vocab_size}"
    tok_bin = prefix.with_suffix(".bin")
    if not corpus.exists():
        log(f"generating the embedded story corpus ({n_stories:,} stories, seed {seed}) into {corpus}")
        write_corpus(corpus, n_stories, seed)
    if not tok_bin.exists():
        log(f"training a {vocab_size}-token BPE tokenizer on it: {tok_bin}")
        train_tokenizer([corpus], vocab_size, str(prefix))
    if not tokens.exists():
        side = prepare([str(corpus)], str(prefix.with_suffix(".model")), tokens)
        log(f"tokenized: {side['n_tokens']:,} tokens in {tokens}")
    return tokens, tok_bin
