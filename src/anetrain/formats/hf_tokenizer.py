"""The tokenizer files of an exported Hugging Face model, so that ``AutoTokenizer.from_pretrained`` loads it.

A sentencepiece ``.model`` is copied as ``tokenizer.model`` with a ``tokenizer_config.json`` naming
``LlamaTokenizer`` and the model's special pieces (BOS added, no EOS: how anetrain and llama2.c encode), and a
``special_tokens_map.json``. A llama2.c ``tokenizer.bin`` carries no normalization rules, so it can be
exported only through the sentencepiece model it was made from: ``NAME.model`` next to ``NAME.bin`` (as
``anetrain tokenizer train`` and the embedded default leave them).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..fsutil import TOKENIZER_LIMIT, atomic_write_bytes, atomic_write_text, read_capped

SPM_FILE = "tokenizer.model"


def sentencepiece_source(tokenizer: str | os.PathLike[str]) -> Path | None:
    """The sentencepiece model behind a tokenizer file: itself (``.model``) or ``NAME.model`` next to a
    ``NAME.bin``; None when there is none."""
    p = Path(tokenizer)
    candidates = [p] if p.suffix.lower() != ".bin" else [p.with_suffix(".model")]
    return next((c for c in candidates if c.is_file()), None)


def write_hf_tokenizer(directory: Path, tokenizer: str | os.PathLike[str], max_length: int) -> dict[str, Any]:
    """Write the tokenizer files into an HF model directory; returns notes for the user."""
    from ..tokenizer.spm import load_processor

    source = sentencepiece_source(tokenizer)
    if source is None:
        return {
            "tokenizer_not_written": f"{tokenizer} is a llama2.c tokenizer.bin without its sentencepiece "
            ".model next to it; AutoTokenizer needs the .model (give it with --tokenizer)"
        }
    data = read_capped(source, TOKENIZER_LIMIT, "sentencepiece model")
    sp = load_processor(source)  # refuses a file that is not a sentencepiece model
    if sp.bos_id() < 0 or sp.eos_id() < 0:
        raise InputError(source, "has no BOS or EOS piece; a Llama tokenizer needs both")
    special = {
        "bos_token": sp.id_to_piece(sp.bos_id()),
        "eos_token": sp.id_to_piece(sp.eos_id()),
        "unk_token": sp.id_to_piece(sp.unk_id()) if sp.unk_id() >= 0 else None,
    }
    config = {
        "tokenizer_class": "LlamaTokenizer",
        **special,
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": True,
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
    }
    atomic_write_bytes(directory / SPM_FILE, data)
    atomic_write_text(directory / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
    atomic_write_text(directory / "special_tokens_map.json", json.dumps(special, indent=2) + "\n")
    return {"tokenizer": f"{source} as {SPM_FILE} (AutoTokenizer loads it)"}
