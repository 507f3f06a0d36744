"""What to generate from: a model file or a run directory, its weights in a precision, and its tokenizer.

A run directory (written by ``anetrain train``) gives its newest complete, verified checkpoint (``best``: the
one with the best validation loss) and the tokenizer its ``config.json`` records (absolute, or relative to
the working directory or the run directory). Any other path is a model file or checkpoint directory read by
:func:`anetrain.formats.load_model`, except that a llama2.c version 2 file is taken as it is stored when the
precision is int8 (``auto`` picks int8 for such files, fp32 for everything else).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint import find_checkpoint, load_checkpoint, read_pointer, run_of
from ..errors import InputError
from ..formats import detect_format, load_model
from .weights import DecodeWeights, dtype_name


@dataclass
class ModelSource:
    model: Path  # a model file or checkpoint directory
    tokenizer: Path | None  # from the run's config.json, when a run directory was given
    label: str  # what to call it in messages ("run R, checkpoint step_00000100")
    step: int | None = None  # the checkpoint's step, when a checkpoint


def is_run_dir(path: str | os.PathLike[str]) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "checkpoints").is_dir()


def run_tokenizer(run_dir: str | os.PathLike[str]) -> Path:
    """The tokenizer file ``RUN_DIR/config.json`` names (absolute, or relative to the cwd or the run dir)."""
    run = Path(run_dir)
    config = run / "config.json"
    try:
        doc = json.loads(config.read_text("utf-8"))
    except FileNotFoundError:
        raise InputError(config, "missing (it names the tokenizer; pass --tokenizer)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(config, f"unreadable ({e})") from None
    name = doc.get("tokenizer") if isinstance(doc, dict) else None
    if not isinstance(name, str) or not name:
        raise InputError(config, "names no tokenizer, so the run's text cannot be decoded (pass --tokenizer)")
    for candidate in (Path(name), run / name):
        if candidate.is_file():
            return candidate
    raise InputError(name, "tokenizer named by config.json not found")


def run_checkpoint(run_dir: str | os.PathLike[str], best: bool = False) -> Path:
    """The newest complete, verified checkpoint of a run (``best``: the one its ``best`` pointer names)."""
    root = Path(run_dir) / "checkpoints"
    if best:
        named = read_pointer(root, "best")
        if named is None:
            raise InputError(root, "has no best checkpoint (the run recorded no validation loss)")
        found = find_checkpoint(run_dir, "best")
        if found is None or found.name != named:
            raise InputError(root / named, "the best checkpoint is incomplete or damaged")
        return found
    found = find_checkpoint(run_dir)
    if found is None:
        raise InputError(root, "no complete checkpoint to generate from yet")
    return found


def resolve_source(path: str | os.PathLike[str], best: bool = False) -> ModelSource:
    """A run directory's checkpoint and tokenizer (also for RUN_DIR/checkpoints/latest or .../best), or a
    model path as it is."""
    p = Path(path)
    run = run_of(p)
    if run is not None:  # the run directory, its checkpoints/ or a pointer in it
        p, best = run[0], best or run[1] == "best"
    if is_run_dir(p):
        ckpt = run_checkpoint(p, best)
        step = checkpoint_step(ckpt)
        try:
            tok: Path | None = run_tokenizer(p)
        except InputError:
            tok = None  # the caller may have --tokenizer; it reports the problem otherwise
        return ModelSource(ckpt, tok, f"run {p}, checkpoint {ckpt.name}", step)
    if best:
        raise InputError(p, "--best needs a run directory")
    if not p.exists():
        raise InputError(p, "does not exist")
    return ModelSource(p, None, str(p))


def checkpoint_step(ckpt: Path) -> int | None:
    """The step a checkpoint's manifest records (None when unreadable)."""
    try:
        return int(json.loads((ckpt / "manifest.json").read_text("utf-8"))["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_weights(path: str | os.PathLike[str], dtype: str = "auto") -> DecodeWeights:
    """The weights of a model file or checkpoint directory in ``dtype`` (auto: int8 for a llama2.c v2 file,
    which is then used as stored; fp32 otherwise)."""
    fmt = detect_format(path)
    name = ("int8" if fmt == "llama2c-v2" else "fp32") if dtype == "auto" else dtype_name(dtype)
    if fmt == "llama2c-v2" and name == "int8":
        return DecodeWeights.from_llama2c_v2(path)
    if fmt == "anetrain-checkpoint":
        params = load_checkpoint(path, with_optimizer=False).params
    else:
        params = load_model(path).params
    return DecodeWeights.from_params(params, name)
