"""Model file formats: readers and writers, each validating its input before trusting it.

``load_model(path)`` detects the format and returns a :class:`LoadedModel`; ``save_model`` writes one
atomically. Formats: llama2.c v0/v1/v2 (``llama2c.py``, Q8_0 in ``q80.py``), the original trainer's BLZT
checkpoints (``blzt.py``), Hugging Face safetensors directories (``hf.py``: Llama and Qwen3) and, for writing
LoRA adapters, peft adapter directories (``peft.py``). Reading also takes anetrain's own checkpoint
directories (``anetrain.checkpoint``), so trained runs can be inspected and exported (a LoRA run's with its
adapters merged into its base, and the adapters beside), and Hugging Face Hub ids (``hub.py``).

Detection: a run directory (``checkpoints/``, ``metrics.jsonl`` or a run's ``config.json``), its
``checkpoints/`` directory or a pointer file in it (``checkpoints/latest``, ``checkpoints/best``) is read as
the run's newest verified checkpoint (or the best one); a directory (or a file inside one) with
``config.json`` is HF; one with ``manifest.json`` is an anetrain checkpoint. A
file starting with the BLZT magic is BLZT; with the llama2.c magic "ak42" it is llama2.c v1/v2; anything
else is llama2.c v0 only if its size matches the size its 28-byte header implies (v0 has no magic).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, InputError
from ..optim import AdamState
from ..params import ModelParams
from . import blzt, hf, llama2c
from .common import FORMATS, LoadedModel, map_file
from .hub import local_path
from .llama2c import read_llama2c

CHECKPOINT_MANIFEST = "manifest.json"  # anetrain.checkpoint.MANIFEST (imported lazily: it imports much more)

__all__ = [
    "FORMATS",
    "LoadedModel",
    "detect_format",
    "load_model",
    "read_llama2c",
    "save_model",
]


def detect_format(path: str | os.PathLike[str]) -> str:
    """The format of ``path``: "hf", "anetrain-checkpoint", "anetrain-run", "blzt", "llama2c-v1",
    "llama2c-v2", "llama2c-v0", or "unknown" (a file matching none; "llama2c" for an unknown version).

    Raises :class:`InputError` when ``path`` is none of them, saying what was checked.
    """
    from ..checkpoint import run_of

    p = Path(path)
    if run_of(p) is not None:
        return "anetrain-run"
    if p.is_dir():
        # a run directory has a config.json of its own (the run's options): checked before HF's
        if (p / "checkpoints").is_dir() and not (p / hf.WEIGHTS).exists():
            return "anetrain-run"
        if (p / hf.CONFIG).is_file():
            return "hf"
        if (p / CHECKPOINT_MANIFEST).is_file():
            return "anetrain-checkpoint"
        raise InputError(
            p,
            f"is a directory without {hf.CONFIG} (Hugging Face model) or {CHECKPOINT_MANIFEST} "
            "(anetrain checkpoint)",
        )
    if not p.exists():
        raise InputError(p, "does not exist")
    if p.suffix == ".safetensors" and (p.parent / hf.CONFIG).is_file():
        return "hf"
    raw = map_file(p)
    head = raw[:8].tobytes()
    if len(head) >= 4 and int.from_bytes(head[:4], "little") == blzt.MAGIC:
        return "blzt"
    if len(head) >= 4 and int.from_bytes(head[:4], "little") == llama2c.MAGIC:
        version = int.from_bytes(head[4:8], "little", signed=True) if len(head) == 8 else None
        return f"llama2c-v{version}" if version in (1, 2) else "llama2c"
    if llama2c.looks_like_v0(raw):
        return "llama2c-v0"
    return "unknown"


def load_model(path: str | os.PathLike[str], hf_dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Read any supported model file or directory (format detected, see the module docstring); a Hugging
    Face Hub id is fetched (or taken from the cache) first. ``hf_dtype``: the dtype a Hugging Face model is
    read into (float32; a frozen LoRA base may be read straight into 16 bits)."""
    path = local_path(path)
    fmt = detect_format(path)
    if fmt == "hf":
        return hf.read_hf(path, hf_dtype)
    if fmt == "blzt":
        return blzt.read_blzt(path)
    if fmt.startswith("anetrain-"):
        return read_anetrain_checkpoint(path, run_dir=fmt == "anetrain-run")
    if fmt.startswith("llama2c"):
        return read_llama2c(path)
    # No magic: the only candidate left is v0, whose reader says precisely what does not fit.
    try:
        return read_llama2c(path)
    except InputError as e:
        raise InputError(
            path,
            f"not a recognized model file: no BLZT or llama2.c v1/v2 magic, and as llama2.c v0: {e.problem}",
        ) from None


def read_anetrain_checkpoint(path: str | os.PathLike[str], run_dir: bool = False) -> LoadedModel:
    """An anetrain checkpoint directory (or a run directory's newest verified one) as a LoadedModel."""
    from .. import checkpoint

    p = Path(path)
    if run_dir:
        run, pointer = checkpoint.run_of(p) or (p, "latest")
        latest = checkpoint.load_latest(run, pointer)
        if latest is None:
            raise InputError(p, "is a run directory without a complete checkpoint")
        c = latest
    else:
        c = checkpoint.load_checkpoint(p)
    extras: dict[str, Any] = {"checkpoint": str(c.path)}
    extras.update(
        (k, v)
        for k, v in c.manifest.items()
        if k not in ("format", "version") and isinstance(v, int | float | str) and not isinstance(v, bool)
    )
    source = c.manifest.get("hf_source")
    if c.lora is not None:  # the adapters merged into their base; the adapters themselves beside
        from ..lora import merge

        base = checkpoint.load_base(c.manifest, c.path)
        extras["lora"] = f"rank {c.lora.rank}, alpha {c.lora.alpha:g}, targets {','.join(c.lora.targets)}"
        extras["base_model"] = c.manifest["base"]["model"]
        assert isinstance(c.params, checkpoint.LoraParams)
        return LoadedModel(
            cfg=c.cfg,
            params=merge(base, c.params),
            format="anetrain-checkpoint",
            extras=extras,
            source=source,
            adapters=c.params,
        )
    assert isinstance(c.params, ModelParams)
    return LoadedModel(
        cfg=c.cfg,
        params=c.params,
        format="anetrain-checkpoint",
        optimizer=c.optimizer,
        extras=extras,
        source=source,
    )


def save_model(
    path: str | os.PathLike[str],
    params: ModelParams,
    fmt: str,
    optimizer: AdamState | None = None,
    extras: dict[str, Any] | None = None,
    source: dict[str, Any] | None = None,
    adapters: Any = None,
    tokenizer: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Write ``params`` as ``fmt`` (one of :data:`FORMATS`) atomically; returns notes for the user.

    ``optimizer`` and ``extras`` (step, loss, lr, ...) are stored only by BLZT; the other formats ignore
    them. ``source`` (a :class:`LoadedModel`'s): the Hugging Face model it came from, whose token ids and
    tokenizer files an hf (or peft) export keeps; otherwise ``tokenizer`` (the run's) goes into an HF
    directory (:mod:`.hf_tokenizer`). ``peft`` writes ``adapters`` (a LoRA run's), referring to
    ``extras["base_model"]``. Raises :class:`ConfigError` when the format cannot express the model (nothing
    is written then).
    """
    if fmt.startswith("llama2c-v") and fmt in FORMATS:
        return llama2c.write_llama2c(path, params, int(fmt[-1]))
    if fmt == "hf":
        extra_files = None
        if tokenizer is not None:
            from .hf_tokenizer import write_hf_tokenizer

            def extra_files(directory: Path) -> dict[str, Any]:
                return write_hf_tokenizer(directory, tokenizer, params.cfg.seq_len)

        return hf.write_hf(path, params, source, extra_files)
    if fmt == "peft":
        from .peft import write_peft

        return write_peft(path, adapters, (extras or {}).get("base_model"), source)
    if fmt in ("blzt-v2", "blzt-v4"):
        return blzt.write_blzt(path, params, int(fmt[-1]), optimizer=optimizer, extras=extras)
    raise ConfigError(f"unknown model format {fmt!r} (known: {', '.join(FORMATS)})")
