"""Text -> token file, exactly like llama2.c's pretokenizer: for every document, BOS (1) then its ids; no EOS.

Inputs, by extension:

    .txt     documents separated by blank lines (``separator="blank"``) or by lines that read
             ``<|endoftext|>`` (``separator="endoftext"``)
    .jsonl   one JSON object per line; the document is its ``text`` field (``text_field``)
    .json    a TinyStories shard: a JSON list of objects whose ``story`` field is the document

Each document is stripped and skipped when empty, as tinystories.py does. Large inputs are encoded in
parallel (one tokenizer per worker process) with a progress bar. The output is flat little-endian uint16,
written atomically, with a sidecar ``OUT.json`` recording the tokenizer, its fingerprint, the vocabulary size
and the counts, so training can refuse a token file made with another tokenizer.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..errors import AnetrainError, InputError
from ..fsutil import atomic_write, atomic_write_text
from .tokens import sidecar_path

SEPARATORS = ("blank", "endoftext")
_ENDOFTEXT = re.compile(r"^\s*<\|endoftext\|>\s*$", re.MULTILINE)
_BLANK = re.compile(r"\n\n")  # exactly as llama2.c-style splitting on "\n\n"
UINT16_LIMIT = 65536


def read_documents(
    path: str | os.PathLike[str], separator: str = "blank", text_field: str = "text"
) -> list[str]:
    """The stripped, non-empty documents of one input file."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise InputError(p, f"cannot read ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(p, f"not UTF-8 text (byte {e.start})") from None
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        docs = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(p, f"line {lineno} is not JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                raise InputError(p, f"line {lineno} has no string field {text_field!r}")
            docs.append(obj[text_field])
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(p, f"not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(data, list) or not all(isinstance(x, dict) for x in data):
            raise InputError(p, "expected a TinyStories shard: a JSON list of objects with a 'story' field")
        key = "story" if any("story" in x for x in data) else text_field
        docs = [x[key] for x in data if isinstance(x.get(key), str)]
    else:
        if separator not in SEPARATORS:
            raise AnetrainError(f"unknown separator {separator!r} (known: {', '.join(SEPARATORS)})")
        pattern = _ENDOFTEXT if separator == "endoftext" else _BLANK
        docs = pattern.split(text.replace("\r\n", "\n"))
    return [d.strip() for d in docs if d.strip()]


# ---- parallel encoding ---------------------------------------------------------------------------
_worker_tokenizer: Any = None


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    from ..tokenizer import load_tokenizer

    _worker_tokenizer = load_tokenizer(tokenizer_path)


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
    text_field: str = "text",
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Encode ``inputs`` into the token file ``out``; returns the sidecar dict it wrote next to it."""
    from ..tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    if tok.vocab_size > UINT16_LIMIT:
        raise InputError(
            tokenizer_path,
            f"has {tok.vocab_size} tokens: ids >= 65536 do not fit a uint16 token file; "
            "this tokenizer needs a wider dtype, which llama2.c's format does not have",
        )
    docs: list[str] = []
    for path in inputs:
        docs.extend(read_documents(path, separator, text_field))
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
        with ProcessPoolExecutor(n_workers, initializer=_init_worker, initargs=(tokenizer_path,)) as pool:
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
