"""Hugging Face ``tokenizer.json`` files (Qwen3, Llama 3, SmolLM2, TinyLlama, ...) through the ``tokenizers``
library, behind anetrain's :class:`~anetrain.tokenizer.base.Tokenizer` interface.

Conventions come from the tokenizer itself and from ``tokenizer_config.json`` beside it:

* **BOS**: the token its post-processor puts before a text (Llama's ``<s>``, Llama 3's
  ``<|begin_of_text|>``), if any. Qwen3 adds none.
* **End of document** (``eos_id``): ``<|endoftext|>`` where the vocabulary has it (Qwen, SmolLM2, GPT-style),
  else ``<|end_of_text|>`` (Llama 3), else the config's ``eos_token``, else ``</s>``.
* A document in a token file is ``[BOS] + ids + [end of document]`` (:meth:`HFTokenizer.encode_document`):
  Qwen3's pretraining layout is ``text <|endoftext|> text <|endoftext|>``.
* ``bos_id`` (what generation starts from, and what ``encode(text, bos=True)`` puts first) is the BOS where
  there is one, else the end-of-document token: a new document starts after it.
* The chat template is the config's ``chat_template`` (or ``chat_template.jinja``), rendered by transformers'
  sandboxed renderer (``apply_chat_template``), for ``anetrain prepare --format chat``.

Each id's bytes (for streaming generation) come from the token's string: byte-level BPE tokens through GPT-2's
byte-to-character table, sentencepiece-style ones with "▁" as a space and ``<0xHH>`` as the byte. Special
tokens print nothing. The fingerprint is the sha256 of the tokenizer.json file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AnetrainError, InputError
from .base import Tokenizer

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
#: end-of-document tokens, most specific first
_DOC_END = ("<|endoftext|>", "<|end_of_text|>")
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>\Z")


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character that stands for each byte, inverted."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    chars = list(printable)
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _token_content(tok: Any) -> str | None:
    """The text of a special-token entry in tokenizer_config.json (a string or {"content": ...})."""
    if isinstance(tok, str):
        return tok
    if isinstance(tok, dict) and isinstance(tok.get("content"), str):
        return tok["content"]
    return None


def find_tokenizer_file(path: str | os.PathLike[str]) -> Path:
    """The tokenizer.json of a path: the file itself, or the one in a (model) directory."""
    p = Path(path)
    if p.is_dir():
        if not (p / TOKENIZER_FILE).is_file():
            raise InputError(p, f"is a directory without a {TOKENIZER_FILE}")
        return p / TOKENIZER_FILE
    return p


class HFTokenizer(Tokenizer):
    """A ``tokenizer.json`` (see the module docstring for the conventions)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        path = Path(path)
        try:
            from tokenizers import Tokenizer as TkTokenizer
        except ImportError:
            raise AnetrainError(
                f"{path}: reading a tokenizer.json needs the tokenizers library (pip install anetrain[hf])"
            ) from None
        try:
            raw = path.read_bytes()
            self.tk = TkTokenizer.from_str(raw.decode("utf-8"))
        except OSError as e:
            raise InputError(path, f"cannot read tokenizer ({e.strerror or e})") from None
        except Exception as e:  # tokenizers raises plain Exceptions for bad files
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise InputError(path, f"not a Hugging Face tokenizer.json ({first})") from None
        self.config = self._read_config(path.parent / CONFIG_FILE)
        spec = json.loads(raw)
        vocab = self.tk.get_vocab(with_added_tokens=True)
        size = max(vocab.values()) + 1 if vocab else 0
        if size == 0:
            raise InputError(path, "tokenizer has an empty vocabulary")
        self.special_ids = {
            int(t["id"]) for t in spec.get("added_tokens", []) if isinstance(t, dict) and t.get("special")
        }
        pieces = self._pieces(spec, vocab, size)
        super().__init__(path, pieces, np.zeros(size, dtype=np.float32))
        self._file_sha = hashlib.sha256(raw).hexdigest()
        self.adds_bos, bos = self._bos()
        self.eos_id = self._doc_end(path, vocab)
        self.bos_id = bos if bos is not None else self.eos_id
        self.chat_template = self._chat_template(path.parent)

    # ---- construction helpers ----------------------------------------------------------------------
    @staticmethod
    def _read_config(p: Path) -> dict[str, Any]:
        if not p.is_file():
            return {}
        try:
            data = json.loads(p.read_text("utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(p, f"not valid JSON ({e})") from None
        return data if isinstance(data, dict) else {}

    def _pieces(self, spec: dict[str, Any], vocab: dict[str, int], size: int) -> list[bytes]:
        """The bytes each id stands for (special tokens: none)."""
        decoder = json.dumps(spec.get("decoder") or {})
        byte_level = '"ByteLevel"' in decoder
        table = _byte_decoder() if byte_level else {}
        pieces = [b""] * size
        for token, i in vocab.items():
            if i in self.special_ids:
                continue
            if byte_level:
                pieces[i] = bytes(table[c] for c in token if c in table)
                continue
            m = _BYTE_TOKEN.match(token)
            pieces[i] = bytes((int(m.group(1), 16),)) if m else token.replace("\u2581", " ").encode("utf-8")
        return pieces

    def _bos(self) -> tuple[bool, int | None]:
        """Whether the tokenizer puts a BOS before a text, and which."""
        plain = self.tk.encode("a", add_special_tokens=False).ids
        full = self.tk.encode("a", add_special_tokens=True).ids
        if len(full) > len(plain) and full[1 : 1 + len(plain)] == plain and full[0] in self.special_ids:
            return True, full[0]
        return False, None

    def _doc_end(self, path: Path, vocab: dict[str, int]) -> int:
        for name in _DOC_END:
            if name in vocab:
                return vocab[name]
        eos = _token_content(self.config.get("eos_token"))
        if eos is not None and eos in vocab:
            return vocab[eos]
        if "</s>" in vocab:
            return vocab["</s>"]
        raise InputError(path, "has no end-of-text token (<|endoftext|>, <|end_of_text|>, eos_token or </s>)")

    def _chat_template(self, d: Path) -> str | None:
        t = self.config.get("chat_template")
        if isinstance(t, list):  # [{"name": "default", "template": ...}, ...]
            named = {e.get("name"): e.get("template") for e in t if isinstance(e, dict)}
            t = named.get("default")
        if isinstance(t, str):
            return t
        jinja = d / "chat_template.jinja"
        return jinja.read_text("utf-8") if jinja.is_file() else None

    # ---- the interface ------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """The sha256 of the tokenizer.json file."""
        return self._file_sha

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """The ids of ``text`` (no special tokens added by the tokenizer); ``bos_id`` first and the
        end-of-document token last when asked for."""
        ids: list[int] = self.tk.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_document(self, text: str) -> list[int]:
        """A document as a token file holds it: [BOS if the tokenizer adds one] + ids + [end of document]."""
        ids: list[int] = self.tk.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if self.adds_bos else []) + ids + [self.eos_id]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of a text that may contain special tokens (a rendered chat), and each id's character span."""
        enc = self.tk.encode(text, add_special_tokens=False)
        return list(enc.ids), [tuple(o) for o in enc.offsets]  # type: ignore[misc]

    def decode_piece(self, prev_id: int, token_id: int) -> bytes:
        """The bytes of ``token_id`` (special tokens: none); after BOS a sentencepiece-style piece loses its
        leading space, as sentencepiece decodes."""
        piece = self.pieces[token_id] if 0 <= token_id < len(self.pieces) else b""
        if prev_id == self.bos_id and self.adds_bos and piece[:1] == b" ":
            piece = piece[1:]
        return piece

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids`` (special tokens and ids beyond the tokenizer, e.g. a model's padding rows,
        left out)."""
        n = self.vocab_size
        return str(self.tk.decode([int(i) for i in ids if 0 <= int(i) < n], skip_special_tokens=True))

    def check_covers(self, vocab_size: int, what: str = "the model") -> None:
        """Hugging Face models often have more embedding rows than their tokenizer has ids (Qwen3: 151,936
        rows, 151,669 ids; the rest is padding): only a tokenizer with ids the model lacks is refused."""
        if self.vocab_size > vocab_size:
            raise InputError(
                self.path,
                f"tokenizer has ids up to {self.vocab_size - 1}, beyond {what}'s vocabulary of {vocab_size}",
            )

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """The text of a conversation through the chat template (transformers' sandboxed renderer)."""
        if self.chat_template is None:
            raise AnetrainError(f"{self.path}: the tokenizer has no chat template")
        tok = self._transformers_tokenizer()
        return str(
            tok.apply_chat_template(
                messages,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                chat_template=self.chat_template,
            )
        )

    def _transformers_tokenizer(self) -> Any:
        cached = getattr(self, "_tf_tok", None)
        if cached is not None:
            return cached
        try:
            from transformers import PreTrainedTokenizerFast
        except ImportError:
            raise AnetrainError(
                f"{self.path}: rendering its chat template needs transformers (pip install anetrain[hf])"
            ) from None
        special = {
            k: _token_content(self.config.get(k))
            for k in ("bos_token", "eos_token", "unk_token", "pad_token")
            if _token_content(self.config.get(k)) is not None
        }
        self._tf_tok = PreTrainedTokenizerFast(tokenizer_object=self.tk, **special)
        return self._tf_tok
