"""Text -> token file. With a llama2.c or sentencepiece tokenizer exactly like llama2.c's pretokenizer: for
every document, BOS (1) then its ids, no EOS. With a Hugging Face tokenizer.json, the model's own convention
(:meth:`anetrain.tokenizer.hf.HFTokenizer.encode_document`): Qwen3's ``text <|endoftext|>``, Llama's
``<s> text </s>``.

Inputs are read by :func:`anetrain.tokenizer.corpus.read_documents` (the reader the tokenizer trainer uses):
.txt documents separated by empty lines (``separator="blank"``) or ``<|endoftext|>`` markers
(``"endoftext"``), .jsonl with a ``text`` (or ``story``, or ``text_field``) field per line, and TinyStories
JSON shards (lists of objects with a ``story`` field).

Each document is stripped and skipped when empty, as tinystories.py does. Large inputs are encoded in
parallel (one tokenizer per worker process) with a progress bar. The output is flat little-endian uint16
(llama2.c's format), or uint32 when the vocabulary has ids above 65,535 (Qwen3's 151,936), written
atomically, with a sidecar ``OUT.json`` recording the dtype, the tokenizer, its fingerprint, the vocabulary
size and the counts, so training can refuse a token file made with another tokenizer. The output never
replaces one of the inputs (or the tokenizer); worker processes end with their parent, however it ends, and
the temporary file a killed run leaves is removed by the next one.

**Instruction data** (``fmt="chat"``, :func:`prepare_chat`): .jsonl records ``{"prompt": ..., "completion":
...}`` or ``{"messages": [{"role": ..., "content": ...}, ...]}``, rendered with the tokenizer's chat template
where it has one. Beside the tokens goes a loss mask, ``OUT.mask``: one byte per token, 1 where the token is
part of a completion or an assistant turn (training then scores only those predictions). A bad record (not
JSON, missing or mistyped fields, no assistant turn, longer than ``max_tokens``) is reported with its file and
line number, and nothing is written.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..errors import InputError
from ..fsutil import atomic_write, atomic_write_text, refuse_overwriting_input
from .tokens import mask_path, sidecar_path

UINT16_LIMIT = 65536
#: --format chat: the longest record accepted (tokens), unless told otherwise
DEFAULT_MAX_TOKENS = 4096


def token_dtype(vocab_size: int) -> str:
    """ "uint16" while every id fits, else "uint32"."""
    return "uint16" if vocab_size <= UINT16_LIMIT else "uint32"


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
    document = getattr(tok, "encode_document", None)  # a tokenizer.json: the model's own layout
    for d in docs:
        ids.extend(document(d) if document is not None else tok.encode(d, bos=True, eos=False))
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
    tokenizer_path = str(tok.path)  # a directory or Hub id: its tokenizer.json (the workers open it again)
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
    dtype = token_dtype(tok.vocab_size)
    if ids.size and int(ids.max()) >= tok.vocab_size:
        raise InputError(
            tokenizer_path, f"produced token id {int(ids.max())}, beyond its {tok.vocab_size} ids"
        )
    if hasattr(tok, "encode_document"):
        layout = _layout(tok)
    else:
        layout = "BOS=1 before each document, no EOS (llama2.c pretokenized)"
    sidecar = _sidecar(tok, tokenizer_path, ids.size, len(docs), inputs, dtype, layout)
    sidecar["separator"] = separator
    _write(out, ids, dtype, None, sidecar)
    return sidecar


def _layout(tok: Any) -> str:
    """How a tokenizer.json's documents are laid out, for the sidecar."""
    bos = f"BOS={tok.bos_id} " if tok.adds_bos else "no BOS, "
    return f"{bos}each document ends with {tok.eos_id} ({tok.tk.id_to_token(tok.eos_id)})"


def _sidecar(
    tok: Any,
    tokenizer_path: str,
    n_tokens: int,
    n_docs: int,
    inputs: list[str],
    dtype: str,
    layout: str,
) -> dict[str, Any]:
    return {
        "format": f"{dtype} token ids, {layout}",
        "dtype": dtype,
        "tokenizer": os.path.abspath(tokenizer_path),
        "tokenizer_fingerprint": tok.fingerprint(),
        "vocab_size": tok.vocab_size,
        "n_tokens": int(n_tokens),
        "n_documents": n_docs,
        "inputs": [{"path": os.path.abspath(p), "bytes": os.path.getsize(p)} for p in inputs],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "anetrain_version": __version__,
    }


def _write(
    out: str | os.PathLike[str], ids: np.ndarray, dtype: str, mask: np.ndarray | None, sidecar: dict[str, Any]
) -> None:
    """The token file, the mask (when given) and the sidecar, each atomically, the sidecar last (it names the
    others and their sizes, so a reader never pairs new tokens with an old mask)."""
    with atomic_write(out) as f:
        f.write(ids.astype("<u2" if dtype == "uint16" else "<u4").tobytes())
    if mask is not None:
        with atomic_write(mask_path(out)) as f:
            f.write(mask.astype(np.uint8).tobytes())
        sidecar["loss_mask"] = mask_path(out).name
    atomic_write_text(sidecar_path(out), json.dumps(sidecar, indent=1))


# ---- instruction data ----------------------------------------------------------------------------------
ROLES = ("system", "user", "assistant", "tool")


def _bad(path: str, line: int, problem: str) -> InputError:
    return InputError(path, f"line {line}: {problem}")


def _messages(path: str, n: int, obj: Any) -> tuple[list[dict[str, str]], bool]:
    """A record's conversation, and whether it came as prompt/completion."""
    if not isinstance(obj, dict):
        raise _bad(path, n, 'expected an object {"prompt": ..., "completion": ...} or {"messages": [...]}')
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise _bad(path, n, '"messages" must be a non-empty list')
        out = []
        for j, m in enumerate(msgs):
            if (
                not isinstance(m, dict)
                or not isinstance(m.get("role"), str)
                or not isinstance(m.get("content"), str)
            ):
                raise _bad(path, n, f'message {j} must be an object with string "role" and "content"')
            if m["role"] not in ROLES:
                raise _bad(path, n, f"message {j} has role {m['role']!r} (known: {', '.join(ROLES)})")
            out.append({"role": m["role"], "content": m["content"]})
        if not any(m["role"] == "assistant" and m["content"] for m in out):
            raise _bad(path, n, "no assistant message with content: nothing to learn from")
        return out, False
    for key in ("prompt", "completion"):
        if key not in obj:
            raise _bad(path, n, f'missing field "{key}" (or give "messages")')
        if not isinstance(obj[key], str):
            raise _bad(path, n, f'field "{key}" must be a string, got {type(obj[key]).__name__}')
    if not obj["completion"]:
        raise _bad(path, n, 'empty "completion": nothing to learn from')
    return [
        {"role": "user", "content": obj["prompt"]},
        {"role": "assistant", "content": obj["completion"]},
    ], True


def _encode_record(
    tok: Any, path: str, n: int, msgs: list[dict[str, str]], plain: bool
) -> tuple[list[int], list[int]]:
    """(ids, mask) of one record; mask 1 on the completion/assistant tokens."""
    template = getattr(tok, "chat_template", None)
    if template is None:
        if not plain:
            raise _bad(path, n, 'the tokenizer has no chat template: give {"prompt", "completion"} records')
        use_bos = getattr(tok, "adds_bos", True)  # llama2.c/sentencepiece tokenizers: BOS=1 as documents have
        prompt = tok.encode(msgs[0]["content"], bos=use_bos)
        completion = tok.encode(msgs[1]["content"], bos=False, eos=True)
        return prompt + completion, [0] * len(prompt) + [1] * len(completion)
    full = tok.render_chat(msgs)
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        pre = tok.render_chat(msgs[:i], add_generation_prompt=True)
        upto = tok.render_chat(msgs[: i + 1])
        if not (upto.startswith(pre) and full.startswith(upto)):
            raise _bad(
                path,
                n,
                "the chat template renders earlier turns differently once later ones follow, so the "
                "assistant's tokens cannot be told apart",
            )
        spans.append((len(pre), len(upto)))
    ids, offsets = tok.encode_with_offsets(full)
    mask = [1 if any(lo <= start < hi for lo, hi in spans) else 0 for start, _ in offsets]
    if tok.adds_bos and (not ids or ids[0] != tok.bos_id):
        ids, mask = [tok.bos_id, *ids], [0, *mask]
    ids, mask = [*ids, tok.eos_id], [*mask, 0]  # the record ends: the document separator
    return ids, mask


def prepare_chat(
    inputs: list[str],
    tokenizer_path: str,
    out: str | os.PathLike[str],
    *,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Instruction records (.jsonl) -> token file + loss mask + sidecar (see the module docstring)."""
    from ..tokenizer import load_tokenizer
    from ..tokenizer.corpus import _read_text

    for target in (out, sidecar_path(out), mask_path(out)):
        refuse_overwriting_input(target, [*inputs, tokenizer_path])
    tok = load_tokenizer(tokenizer_path)
    tokenizer_path = str(tok.path)
    records: list[tuple[str, int, list[dict[str, str]], bool]] = []
    for path in inputs:
        if not str(path).lower().endswith(".jsonl"):
            raise InputError(path, "--format chat reads .jsonl files (one record per line)")
        text = _read_text(Path(path))
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise _bad(path, n, f"not valid JSON ({e.msg})") from None
            msgs, plain = _messages(path, n, obj)
            records.append((path, n, msgs, plain))
    if not records:
        raise InputError(inputs[0] if len(inputs) == 1 else ", ".join(inputs), "no records found")
    all_ids: list[int] = []
    all_mask: list[int] = []
    n_completion = 0
    for k, (path, n, msgs, plain) in enumerate(records):
        ids, mask = _encode_record(tok, path, n, msgs, plain)
        if max_tokens is not None and len(ids) > max_tokens:
            raise _bad(path, n, f"the record has {len(ids)} tokens, more than --max-tokens {max_tokens}")
        if not any(mask):
            raise _bad(path, n, "no completion token survives tokenization: nothing to learn from")
        all_ids += ids
        all_mask += mask
        n_completion += sum(mask)
        if progress and (k % 256 == 0 or k == len(records) - 1):
            progress(k + 1, len(records))
    ids_arr = np.asarray(all_ids, dtype=np.int64)
    dtype = token_dtype(tok.vocab_size)
    layout = _layout(tok) if hasattr(tok, "encode_document") else "BOS=1 before each record, EOS=2 after it"
    template = (
        "the tokenizer's chat template" if getattr(tok, "chat_template", None) else "prompt + completion"
    )
    sidecar = _sidecar(tok, tokenizer_path, ids_arr.size, len(records), inputs, dtype, layout)
    sidecar.update(
        {
            "records": len(records),
            "chat_format": template,
            "loss_tokens": n_completion,
            "loss_note": "the loss covers only completion/assistant tokens (mask 1 in the .mask file)",
        }
    )
    _write(out, ids_arr, dtype, np.asarray(all_mask, dtype=np.uint8), sidecar)
    return sidecar
