"""Token files: flat little-endian uint16 token ids, no header (llama2.c's pretokenized format), or uint32
when the sidecar says so (``"dtype": "uint32"``: vocabularies with ids above 65,535, e.g. Qwen3's).

A file is memory-mapped, never read whole. It is validated before use: not empty, a whole number of ids,
long enough for one training window, every id below the model's vocabulary, and (when a sidecar
``TOKENS.bin.json`` written by ``anetrain prepare`` is present) made with the tokenizer the run uses. A file
without a sidecar is uint16, as llama2.c's.

Instruction data has a loss mask beside it (``TOKENS.bin.mask``, named by the sidecar's ``loss_mask``): one
byte per token, 1 where predicting that token counts in the loss (a completion or assistant token).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..fsutil import CONFIG_LIMIT, read_capped

DTYPES = {"uint16": "<u2", "uint32": "<u4"}


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    """Where ``anetrain prepare`` records how a token file was made: ``TOKENS.bin.json``."""
    return Path(os.fspath(path) + ".json")


def mask_path(path: str | os.PathLike[str]) -> Path:
    """Where ``anetrain prepare --format chat`` writes the loss mask: ``TOKENS.bin.mask``."""
    return Path(os.fspath(path) + ".mask")


@dataclass
class TokenFile:
    path: Path
    tokens: np.ndarray  # memmap, uint16 or uint32 [n]
    sidecar: dict[str, Any] | None
    mask: np.ndarray | None = None  # memmap, uint8 [n]: 1 where the token counts as a target (chat data)

    @property
    def n(self) -> int:
        return int(self.tokens.shape[0])

    def max_id(self) -> int:
        return int(self.tokens.max()) if self.n else -1


def open_tokens(path: str | os.PathLike[str]) -> TokenFile:
    """Memory-map a token file after checking its size; reads its sidecar if there is one."""
    p = Path(path)
    if not p.exists():
        raise InputError(p, "no such token file")
    if p.is_dir():
        raise InputError(p, "is a directory, expected a flat uint16 token file")
    sidecar = None
    sp = sidecar_path(p)
    if sp.exists():
        try:
            sidecar = json.loads(read_capped(sp, CONFIG_LIMIT, "token file sidecar"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(sp, f"unreadable sidecar ({e})") from None
        if not isinstance(sidecar, dict):
            raise InputError(sp, "sidecar must be a JSON object")
    dtype = (sidecar or {}).get("dtype", "uint16")
    if dtype not in DTYPES:
        raise InputError(sp, f"dtype {dtype!r} is not a token dtype (uint16 or uint32)")
    width = np.dtype(DTYPES[dtype]).itemsize
    size = p.stat().st_size
    if size == 0:
        raise InputError(p, "token file is empty")
    if size % width:
        if width == 2:
            raise InputError(p, f"odd byte length {size}: not a uint16 token file")
        raise InputError(p, f"byte length {size} is not a multiple of 4: not a {dtype} token file")
    try:
        tokens = np.memmap(p, dtype=DTYPES[dtype], mode="r")
    except OSError as e:
        raise InputError(p, f"cannot read the token file ({e.strerror or e})") from None
    mask = None
    if sidecar is not None:
        if "n_tokens" in sidecar and sidecar["n_tokens"] != tokens.shape[0]:
            raise InputError(sp, f"says {sidecar['n_tokens']} tokens but {p} holds {tokens.shape[0]}")
        if sidecar.get("loss_mask"):
            mp = p.parent / str(sidecar["loss_mask"])
            if Path(str(sidecar["loss_mask"])).name != str(sidecar["loss_mask"]) or not mp.is_file():
                raise InputError(
                    sp, f"names a loss mask {sidecar['loss_mask']!r} that is not beside {p.name}"
                )
            if mp.stat().st_size != tokens.shape[0]:
                raise InputError(
                    mp, f"has {mp.stat().st_size} bytes for {tokens.shape[0]} tokens (one byte each)"
                )
            mask = np.memmap(mp, dtype=np.uint8, mode="r")
    return TokenFile(p, tokens, sidecar, mask)


def check_tokens(
    tf: TokenFile,
    *,
    vocab_size: int,
    window: int,
    tokenizer_fingerprint: str | None = None,
    region: tuple[int, int] | None = None,
    what: str = "training",
) -> None:
    """Refuse a token file the run cannot use, with a message naming the file and the problem."""
    lo, hi = region or (0, tf.n)
    if hi - lo < window:
        raise InputError(
            tf.path, f"{what} data has {hi - lo} tokens, fewer than one window of seq+1 = {window} tokens"
        )
    top = tf.max_id()
    if top >= vocab_size:
        bad = int(np.count_nonzero(np.asarray(tf.tokens) >= vocab_size))
        raise InputError(
            tf.path,
            f"{bad} token ids are >= the model's vocabulary size {vocab_size} (largest id {top}); "
            "was it made with a different tokenizer?",
        )
    if tf.sidecar is not None:
        sc_vocab = tf.sidecar.get("vocab_size")
        if isinstance(sc_vocab, int) and sc_vocab > vocab_size:
            raise InputError(
                sidecar_path(tf.path),
                f"made with a tokenizer of {sc_vocab} tokens, more than the model's vocabulary {vocab_size}",
            )
        fp = tf.sidecar.get("tokenizer_fingerprint")
        if tokenizer_fingerprint and fp and fp != tokenizer_fingerprint:
            raise InputError(
                sidecar_path(tf.path),
                f"made with tokenizer {tf.sidecar.get('tokenizer', '?')} which does not match the run's "
                "tokenizer (fingerprints differ)",
            )
