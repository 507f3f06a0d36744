"""Model file formats: readers and writers, each validating its input before trusting it.

``load_model(path)`` detects the format and returns a :class:`LoadedModel`; ``save_model`` writes one
atomically. Formats: llama2.c v0/v1/v2 (``llama2c.py``), the original trainer's BLZT checkpoints
(``blzt.py``) and Hugging Face safetensors directories (``hf.py``).
"""

from __future__ import annotations

from .common import LoadedModel
from .llama2c import read_llama2c

__all__ = ["LoadedModel", "load_model", "read_llama2c"]


def load_model(path: str) -> LoadedModel:
    """Read any supported model file (format detected from its header)."""
    return read_llama2c(path)
