"""Text -> token file, exactly like llama2.c's pretokenizer: for every document, BOS (1) then its ids; no EOS.

Inputs are read by :func:`anetrain.tokenizer.corpus.read_documents` (the reader the tokenizer trainer uses):
.txt documents separated by empty lines (``separator="blank"``) or ``<|endoftext|>`` markers
(``"endoftext"``), .jsonl with a ``text`` (or ``story``, or ``text_field``) field per line, and TinyStories
JSON shards (lists of objects with a ``story`` field).

Each document is stripped and skipped when empty, as tinystories.py does. Large inputs are encoded in
parallel (one tokenizer per worker process) with a progress bar. The output is flat little-endian uint16,
written atomically, with a sidecar ``OUT.json`` recording the tokenizer, its fingerprint, the vocabulary size
and the counts, so training can refuse a token file made with another tokenizer. The output never replaces
one of the inputs (or the tokenizer); worker processes end with their parent, however it ends, and the
temporary file a killed run leaves is removed by the next one.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np

from .. import __version__
from ..errors import InputError
from ..fsutil import atomic_write, atomic_write_text, refuse_overwriting_input
from .tokens import sidecar_path

UINT16_LIMIT = 65536


# ---- parallel encoding ---------------------------------------------------------------------------
_worker_tokenizer: Any = None


def _init_worker(tokenizer_path: str, worker: bool = False) -> None:
    global _worker_tokenizer
    from ..tokenizer import load_tokenizer

    if worker:
        exit_with_parent(os.getppid())
    _worker_tokenizer = load_tokenizer(tokenizer_path)


def exit_with_parent(parent: int) -> None:
    """A worker process ends when ``parent`` does, however it ends (``kill -9`` included): a daemon thread
    watches for the worker's parent to change (the orphan is re-parented) and exits at once."""
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _encode_chunk(docs: list[str]) -> np.ndarray:
    tok = _worker_tokenizer
    ids: list[int] = []
    for d in docs:
        ids.extend(tok.encode(d, bos=True, eos=False))
    return np.asarray(ids, dtype=np.int64)


def _chunks(docs: list[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(docs), size):
        yield docs[i : i + size]


def prepare(
    inputs: list[str],
    tokenizer_path: str,
    out: str | os.PathLike[str],
    *,
    separator: str = "blank",
    text_field: str | None = None,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Encode ``inputs`` into the token file ``out``; returns the sidecar dict it wrote next to it."""
    from ..tokenizer import load_tokenizer
    from ..tokenizer.corpus import read_documents

    refuse_overwriting_input(out, [*inputs, tokenizer_path])
    refuse_overwriting_input(sidecar_path(out), [*inputs, tokenizer_path])
    tok = load_tokenizer(tokenizer_path)
    if tok.vocab_size > UINT16_LIMIT:
        raise InputError(
            tokenizer_path,
            f"has {tok.vocab_size} tokens: ids >= 65536 do not fit a uint16 token file; "
            "this tokenizer needs a wider dtype, which llama2.c's format does not have",
        )
    docs: list[str] = []
    for path in inputs:
        docs.extend(read_documents(path, separator, text_field))  # the tokenizer trainer's reader
    if not docs:
        raise InputError(inputs[0] if len(inputs) == 1 else ", ".join(inputs), "no documents found")
    total_chars = sum(len(d) for d in docs)
    n_workers = (
        workers if workers is not None else (min(os.cpu_count() or 1, 8) if total_chars > 2_000_000 else 1)
    )
    chunk = max(64, len(docs) // (n_workers * 16) or 1)
    pieces: list[np.ndarray] = []
    done = 0
    if n_workers <= 1:
        _init_worker(tokenizer_path)
        for c in _chunks(docs, chunk):
            pieces.append(_encode_chunk(c))
            done += len(c)
            if progress:
                progress(done, len(docs))
    else:
        with ProcessPoolExecutor(
            n_workers, initializer=_init_worker, initargs=(tokenizer_path, True)
        ) as pool:
            for c, arr in zip(
                _chunks(docs, chunk), pool.map(_encode_chunk, _chunks(docs, chunk)), strict=True
            ):
                pieces.append(arr)
                done += len(c)
                if progress:
                    progress(done, len(docs))
    ids = np.concatenate(pieces)
    if ids.size and int(ids.max()) >= UINT16_LIMIT:
        raise InputError(
            tokenizer_path, f"produced token id {int(ids.max())} >= 65536; it needs a wider dtype"
        )
    with atomic_write(out) as f:
        f.write(ids.astype("<u2").tobytes())
    sidecar = {
        "format": "uint16 token ids, BOS=1 before each document, no EOS (llama2.c pretokenized)",
        "tokenizer": os.path.abspath(tokenizer_path),
        "tokenizer_fingerprint": tok.fingerprint(),
        "vocab_size": tok.vocab_size,
        "n_tokens": int(ids.size),
        "n_documents": len(docs),
        "inputs": [{"path": os.path.abspath(p), "bytes": os.path.getsize(p)} for p in inputs],
        "separator": separator,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "anetrain_version": __version__,
    }
    atomic_write_text(sidecar_path(out), json.dumps(sidecar, indent=1))
    return sidecar
