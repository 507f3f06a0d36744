"""Hugging Face Hub ids (``Qwen/Qwen3-0.6B``) as model and tokenizer locations, through ``huggingface_hub``.

A name that is not an existing file or directory and has the form ``owner/name`` is looked up with
``huggingface_hub.snapshot_download``: only the files anetrain reads (config.json, safetensors weights and
their index, the tokenizer's files, generation_config.json) are fetched, into the usual Hugging Face cache.
Offline (``HF_HUB_OFFLINE=1``, or no network) the cached snapshot is used; with neither, one line says so.
``huggingface_hub`` is an optional dependency (``pip install anetrain[hf]``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import AnetrainError

#: what anetrain reads from a model repository (never pickled weights)
ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "adapter_config.json",
]
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def looks_like_repo_id(spec: str) -> bool:
    """``owner/name`` that is not a path on this machine."""
    return bool(_REPO_ID.fullmatch(spec)) and not Path(spec).exists() and ".." not in spec


def resolve_repo(repo_id: str) -> Path:
    """The local directory of a Hub repository's snapshot: downloaded (only the files anetrain reads) when
    online, else taken from the cache. Raises a one-line :class:`AnetrainError` when neither works."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise AnetrainError(
            f"{repo_id}: not a file or directory here; to fetch it from the Hugging Face Hub install "
            "huggingface_hub (pip install anetrain[hf])"
        ) from None
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    first_error: Exception | None = None
    if not offline:
        try:
            return Path(snapshot_download(repo_id, allow_patterns=ALLOW_PATTERNS))
        except Exception as e:  # network, auth, missing repo: try the cache before giving up
            first_error = e
    try:
        return Path(snapshot_download(repo_id, allow_patterns=ALLOW_PATTERNS, local_files_only=True))
    except Exception as e:
        why = first_error or e
        first = str(why).splitlines()[0] if str(why) else type(why).__name__
        where = "offline, and not in the local cache" if offline else first
        raise AnetrainError(
            f"{repo_id}: not a local path, and the Hugging Face Hub gave no snapshot ({where})"
        ) from None


def local_path(spec: str | os.PathLike[str]) -> Path:
    """``spec`` as a local path: itself when it exists (or is not a Hub id), else the Hub snapshot."""
    s = os.fspath(spec)
    if looks_like_repo_id(s):
        return resolve_repo(s)
    return Path(s)
