"""Reading documents from text corpora, for tokenizer training and for ``anetrain prepare``.

Formats, chosen by extension:

- ``.jsonl``: one JSON object per line; the document is its ``"text"`` field (or ``"story"``).
- ``.json``: a list of such objects (TinyStories' ``dataNN.json`` shards use ``"story"``).
- anything else: UTF-8 text, split into documents by ``separator``: ``"blank"`` (an empty line, i.e. exactly
  ``"\n\n"``, as llama2.c-style pretokenized data is split), ``"endoftext"`` (the marker ``<|endoftext|>``,
  as in GPT-style dumps of TinyStories) or ``"line"``.

``text_field`` names the one JSON field to read instead. Every document is stripped of surrounding whitespace;
empty ones are skipped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import InputError

SEPARATORS = ("blank", "endoftext", "line")
ENDOFTEXT = "<|endoftext|>"
_TEXT_FIELDS = ("text", "story")


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise InputError(path, f"cannot read ({e.strerror or e})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(path, f"not UTF-8 text (bad byte at offset {e.start})") from None


def _field(path: Path, obj: Any, where: str, text_field: str | None) -> str:
    fields = (text_field,) if text_field else _TEXT_FIELDS
    if isinstance(obj, dict):
        for key in fields:
            if isinstance(obj.get(key), str):
                return obj[key]
    wanted = " or ".join(f'"{k}"' for k in fields)
    raise InputError(path, f"{where}: expected an object with a string field {wanted}")


def split_documents(text: str, separator: str = "blank") -> list[str]:
    """Documents of a plain-text corpus (stripped, empty ones dropped)."""
    text = text.replace("\r\n", "\n")
    if separator == "blank":
        parts = text.split("\n\n")
    elif separator == "endoftext":
        parts = text.split(ENDOFTEXT)
    elif separator == "line":
        parts = text.split("\n")
    else:
        raise ValueError(f"unknown separator {separator!r} (known: {', '.join(SEPARATORS)})")
    return [d for d in (p.strip() for p in parts) if d]


def read_documents(
    path: str | os.PathLike[str], separator: str = "blank", text_field: str | None = None
) -> Iterator[str]:
    """Every document of one corpus file (see the module docstring for the formats)."""
    p = Path(path)
    if p.is_dir():
        raise InputError(p, "is a directory, expected a text, .jsonl or .json corpus file")
    suffix = p.suffix.lower()
    text = _read_text(p)
    if suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(p, f"line {n}: not valid JSON ({e.msg})") from None
            doc = _field(p, obj, f"line {n}", text_field).strip()
            if doc:
                yield doc
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(p, f"not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(data, list):
            raise InputError(p, 'expected a JSON list of objects with a "text" or "story" field')
        for n, obj in enumerate(data):
            doc = _field(p, obj, f"item {n}", text_field).strip()
            if doc:
                yield doc
    else:
        yield from split_documents(text, separator)
