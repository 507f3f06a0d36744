"""Resumable checkpoints: safetensors for tensors, a JSON manifest for everything else, crash-safe.

Layout (see docs/run-directory.md)::

    RUN_DIR/checkpoints/step_00000100/   model.safetensors  optimizer.safetensors  manifest.json
    RUN_DIR/checkpoints/latest           text file: the name of the newest complete checkpoint
    RUN_DIR/checkpoints/best             text file: the name of the checkpoint with the best validation loss

A LoRA run's checkpoint holds its adapters (and their Adam moments); the manifest says so (``lora``) and names
the frozen base model (``base``: the --model it came from, its resolved path and a fingerprint of its
weights), which is read again, and checked, to resume or export.

A checkpoint is written into a hidden temporary directory; every file is fsynced, the manifest (with each
file's size and sha256) last; then the directory is renamed into place, the parent fsynced, and only then
the ``latest`` pointer replaced and old checkpoints pruned. A ``kill -9`` at any moment therefore leaves the
previous checkpoint intact and reachable; a full disk fails the write, removes the partial directory and keeps
the previous checkpoint. Loading verifies sizes and checksums, and falls back to the newest checkpoint that
verifies if the pointer is missing or names a damaged one (saying so: a warning for each damaged one).

A run directory is not trusted: a checkpoint is only ever a real directory directly inside its run's
``checkpoints/`` whose name is ``step_NNNNNNNN`` or ``best_step_NNNNNNNN`` (a pointer naming anything else,
``../..``, an absolute path or a symbolic link, is ignored with a warning), and its manifest must list every
file of the checkpoint (only ``model.safetensors`` and ``optimizer.safetensors``) with its size and sha256.
The tensors' names and shapes are checked against the manifest's model before anything is allocated.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import ModelConfig, make_config
from .errors import AnetrainError, ConfigError, InputError
from .fsutil import atomic_write_text, describe_os_error, file_sha256, fsync_dir, read_capped
from .lora import LoraConfig, LoraParams, fingerprint, lora_specs
from .optim import AdamState
from .params import FlatParams, ModelParams, param_specs, require_file_holds

FORMAT = "anetrain-checkpoint"
VERSION = 1
MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optimizer.safetensors"
MANIFEST = "manifest.json"
#: the files a checkpoint may hold besides its manifest (the manifest must list each one that is there)
CHECKPOINT_FILES = (MODEL_FILE, OPTIM_FILE)
#: what a checkpoint directory (and so a pointer's content) may be called
NAME_PATTERN = re.compile(r"(best_)?step_\d{8,}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
#: manifests are small JSON documents; anything larger is not one
MANIFEST_LIMIT = 16 << 20

Warn = Callable[[str], None]


def stderr_warning(line: str) -> None:
    """The default for ``warn``: one ``anetrain: warning: ...`` line on stderr."""
    print(f"anetrain: {line}", file=sys.stderr, flush=True)


@dataclass
class Checkpoint:
    path: Path
    cfg: ModelConfig
    params: FlatParams  # the model, or a LoRA run's adapters (LoraParams)
    optimizer: AdamState | None
    manifest: dict[str, Any]
    lora: LoraConfig | None = None

    @property
    def step(self) -> int:
        return int(self.manifest["step"])


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(
    run_dir: str | os.PathLike[str],
    name: str,
    params: FlatParams,
    optimizer: AdamState | None,
    manifest: dict[str, Any],
    *,
    pointers: tuple[str, ...] = ("latest",),
) -> Path:
    """Write ``RUN_DIR/checkpoints/<name>`` crash-safely and point ``pointers`` at it.

    Raises :class:`AnetrainError` if writing fails (nothing already on disk is changed in that case).
    """
    root = Path(run_dir) / "checkpoints"
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        files: dict[str, dict[str, Any]] = {}
        save_file(params.state_dict(), tmp / MODEL_FILE, metadata={"format": FORMAT})
        if optimizer is not None:
            tensors = {f"m.{n}": t for n, t in optimizer.m.named()} | {
                f"v.{n}": t for n, t in optimizer.v.named()
            }
            save_file(tensors, tmp / OPTIM_FILE, metadata={"format": FORMAT})
        for fname in (MODEL_FILE, OPTIM_FILE):
            f = tmp / fname
            if f.exists():
                _fsync_file(f)
                files[fname] = {"bytes": f.stat().st_size, "sha256": file_sha256(f)}
        full = {
            "format": FORMAT,
            "version": VERSION,
            "model": params.cfg.to_dict(),
            "files": files,
            "adam_t": optimizer.t if optimizer is not None else None,
            **({"lora": params.lora.to_dict()} if isinstance(params, LoraParams) else {}),
            **manifest,
        }
        with open(tmp / MANIFEST, "w", encoding="utf-8") as f:
            json.dump(full, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        if final.exists():  # re-saving the same step: move the old one aside first
            old = root / f".old-{name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(root)
    except (OSError, SafetensorError) as e:  # safetensors reports a full disk as its own error type
        shutil.rmtree(tmp, ignore_errors=True)
        kept = read_pointer(root, "latest")
        keep_msg = f"the previous checkpoint {kept} is kept" if kept else "no earlier checkpoint exists"
        problem = describe_write_error(e)
        raise AnetrainError(f"{final}: checkpoint write failed ({problem}); {keep_msg}") from e
    for pointer in pointers:
        # the checkpoint itself is complete; if a pointer cannot be written, loading falls back to scanning
        with contextlib.suppress(AnetrainError):
            atomic_write_text(root / pointer, name + "\n")
    return final


def describe_write_error(e: Exception) -> str:
    """A write error in a few words: the OS's reason, or the first line of safetensors' message (which
    wraps the OS error: "No space left on device (os error 28)")."""
    if isinstance(e, OSError):
        return describe_os_error(e)
    text = str(e)
    if "os error 28" in text or "StorageFull" in text:
        return "no space left on device"
    return text.splitlines()[0] if text else type(e).__name__


def read_pointer(root: Path, pointer: str, warn: Warn | None = None) -> str | None:
    """The checkpoint name a pointer file holds, if it is one a checkpoint can have (else None, with a
    warning through ``warn``)."""
    try:
        name = read_capped(root / pointer, 4096, "checkpoint pointer").decode("utf-8").strip()
    except (AnetrainError, UnicodeDecodeError):
        if warn is not None and (root / pointer).exists():
            warn(f"warning: {root / pointer} is unreadable; ignored")
        return None
    if not name:
        return None
    if not NAME_PATTERN.fullmatch(name):
        if warn is not None:
            warn(f"warning: {root / pointer} names {name[:80]!r}, not a checkpoint of this run; ignored")
        return None
    return name


def checkpoint_dirs(root: Path, prefix: str = "step_") -> list[Path]:
    """The checkpoint directories of ``root`` whose name starts with ``prefix``, oldest first: real
    directories (not symbolic links) with a checkpoint's name."""
    try:
        entries = list(root.iterdir())
    except OSError:
        return []
    return sorted(
        d
        for d in entries
        if d.name.startswith(prefix) and NAME_PATTERN.fullmatch(d.name) and d.is_dir() and not d.is_symlink()
    )


def prune_checkpoints(run_dir: str | os.PathLike[str], keep: int) -> None:
    """Delete all but the newest ``keep`` step checkpoints (never one a pointer names) and stale temps."""
    root = Path(run_dir) / "checkpoints"
    if not root.exists():
        return
    protected = {read_pointer(root, p) for p in ("latest", "best")}
    steps = checkpoint_dirs(root)
    for d in steps[: max(0, len(steps) - keep)]:
        if d.name not in protected:
            shutil.rmtree(d, ignore_errors=True)
    for d in root.iterdir():
        if d.name.startswith((".tmp-", ".old-")) and d.is_dir():
            pid = d.name.rsplit("-", 1)[-1]
            if not (pid.isdigit() and int(pid) == os.getpid()):
                shutil.rmtree(d, ignore_errors=True)
    best = read_pointer(root, "best")
    for d in checkpoint_dirs(root, "best_"):
        if d.name != best:
            shutil.rmtree(d, ignore_errors=True)


def read_manifest(path: Path) -> dict[str, Any]:
    """A checkpoint directory's manifest, checked for the fields every loader relies on (InputError
    otherwise); the files themselves are not read (:func:`verify_checkpoint` does that)."""
    if path.is_symlink() or not path.is_dir():
        raise InputError(path, "is not a checkpoint directory (a checkpoint is a directory, not a link)")
    mf = path / MANIFEST
    if not mf.exists():
        raise InputError(path, "incomplete checkpoint (no manifest.json)")
    try:
        manifest = json.loads(read_capped(mf, MANIFEST_LIMIT, "checkpoint manifest").decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(mf, f"unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InputError(mf, "not an anetrain checkpoint manifest")
    if manifest.get("version") != VERSION:
        raise InputError(mf, f"unknown checkpoint version {manifest.get('version')!r}")
    step = manifest.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise InputError(mf, f"step must be a non-negative integer, got {step!r}")
    if not isinstance(manifest.get("model"), dict):
        raise InputError(mf, "has no model config")
    files = manifest.get("files")
    if not isinstance(files, dict) or MODEL_FILE not in files:
        raise InputError(mf, f"does not list the checkpoint's files ({MODEL_FILE} at least)")
    for fname, info in files.items():
        if fname not in CHECKPOINT_FILES:
            raise InputError(mf, f"lists {str(fname)[:80]!r}, which is not a checkpoint file")
        if not (
            isinstance(info, dict)
            and isinstance(info.get("bytes"), int)
            and not isinstance(info.get("bytes"), bool)
            and isinstance(info.get("sha256"), str)
            and _SHA256.fullmatch(info["sha256"])
        ):
            raise InputError(mf, f"the entry of {fname} needs its size in bytes and its sha256")
    for fname in CHECKPOINT_FILES:
        if fname not in files and (path / fname).exists():
            raise InputError(path / fname, "is not listed in the manifest")
    return manifest


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """The manifest of a complete, undamaged checkpoint directory; raises InputError otherwise."""
    manifest = read_manifest(path)
    for fname, info in manifest["files"].items():
        f = path / fname
        if f.is_symlink() or not f.is_file():
            raise InputError(f, "missing from the checkpoint")
        if f.stat().st_size != info["bytes"]:
            raise InputError(f, f"size {f.stat().st_size} does not match the manifest ({info['bytes']})")
        if file_sha256(f) != info["sha256"]:
            raise InputError(f, "checksum does not match the manifest (damaged file)")
    return manifest


def _candidates(root: Path, pointer: str, warn: Warn | None) -> list[Path]:
    """The checkpoint a pointer names, then every step checkpoint, newest first (each once)."""
    named = read_pointer(root, pointer, warn)
    found = [root / named] if named else []
    return found + [d for d in reversed(checkpoint_dirs(root)) if d.name != named]


def _find_verified(
    run_dir: str | os.PathLike[str], pointer: str, warn: Warn | None = stderr_warning
) -> tuple[Path, dict[str, Any]] | None:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    for c in _candidates(root, pointer, warn):
        try:
            return c, verify_checkpoint(c)
        except InputError as e:
            if warn is not None and (c.exists() or c.is_symlink()):
                warn(f"warning: skipping the damaged checkpoint {c} ({e.problem}); trying an older one")
            continue
    return None


def find_checkpoint(
    run_dir: str | os.PathLike[str], pointer: str = "latest", warn: Warn | None = stderr_warning
) -> Path | None:
    """The checkpoint a pointer names if it verifies, else the newest step checkpoint that verifies."""
    found = _find_verified(run_dir, pointer, warn)
    return found[0] if found else None


def holds_checkpoint(run_dir: str | os.PathLike[str]) -> bool:
    """Whether a run directory has any complete checkpoint (its manifest written), without reading it."""
    root = Path(run_dir) / "checkpoints"
    return root.is_dir() and any(
        (d / MANIFEST).exists() for d in checkpoint_dirs(root) + checkpoint_dirs(root, "best_")
    )


def load_latest(
    run_dir: str | os.PathLike[str],
    pointer: str = "latest",
    *,
    with_optimizer: bool = True,
    warn: Warn | None = stderr_warning,
) -> Checkpoint | None:
    """:func:`find_checkpoint` and :func:`load_checkpoint` in one, verifying the files only once."""
    found = _find_verified(run_dir, pointer, warn)
    if found is None:
        return None
    return load_checkpoint(found[0], with_optimizer=with_optimizer, manifest=found[1])


def load_checkpoint(
    path: str | os.PathLike[str], *, with_optimizer: bool = True, manifest: dict[str, Any] | None = None
) -> Checkpoint:
    """Read a checkpoint directory, verifying its files first unless ``manifest`` is the one
    :func:`verify_checkpoint` just returned for it."""
    p = Path(path)
    if manifest is None:
        manifest = verify_checkpoint(p)
    try:
        cfg = make_config(**manifest["model"])
        lora = LoraConfig.from_dict(manifest["lora"]) if manifest.get("lora") else None
    except (ConfigError, KeyError, TypeError, ValueError) as e:
        raise InputError(p / MANIFEST, f"bad model config ({e})") from None
    if lora is not None and not isinstance(manifest.get("base"), dict):
        raise InputError(p / MANIFEST, "a LoRA checkpoint without its base model's description")

    def build(tensors: dict[str, torch.Tensor]) -> FlatParams:
        if lora is not None:
            return LoraParams.from_tensors(cfg, lora, tensors)
        return ModelParams.from_tensors(cfg, tensors)

    with_optimizer = with_optimizer and (p / OPTIM_FILE).exists()
    try:
        # what the files hold must be what the manifest's model needs, before anything is allocated
        if lora is None:  # (a LoRA checkpoint holds only the adapters: its header's shapes are checked below)
            require_file_holds(p / MODEL_FILE, cfg, (p / MODEL_FILE).stat().st_size, per_param=4)
        specs = param_specs(cfg) if lora is None else lora_specs(cfg, lora)
        expected = {s.name: s.shape for s in specs}
        _require_tensors(p / MODEL_FILE, expected)
        if with_optimizer:
            _require_tensors(
                p / OPTIM_FILE,
                {f"{k}.{n}": shape for k in ("m", "v") for n, shape in expected.items()},
            )
        with safe_open(p / MODEL_FILE, "pt") as f:
            params = build({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
        optimizer = None
        if with_optimizer:
            with safe_open(p / OPTIM_FILE, "pt") as f:
                names = list(f.keys())
                m = build({k[2:]: f.get_tensor(k) for k in names if k.startswith("m.")})
                v = build({k[2:]: f.get_tensor(k) for k in names if k.startswith("v.")})
            adam_t = manifest.get("adam_t") or 0
            if isinstance(adam_t, bool) or not isinstance(adam_t, int) or adam_t < 0:
                raise InputError(p / MANIFEST, f"adam_t must be a non-negative integer, got {adam_t!r}")
            optimizer = AdamState(m, v, adam_t)
    except (SafetensorError, ConfigError, OSError) as e:
        raise InputError(p, f"unreadable checkpoint tensors ({e})") from None
    return Checkpoint(p, cfg, params, optimizer, manifest, lora)


def base_reference(spec: str, path: str | os.PathLike[str] | None, base: ModelParams) -> dict[str, Any]:
    """What a LoRA run's manifests record about its frozen base model."""
    return {
        "model": spec,
        "path": os.path.abspath(path) if path is not None else None,
        "fingerprint": fingerprint(base),
    }


def load_base(
    manifest: dict[str, Any], where: str | os.PathLike[str], hf_dtype: torch.dtype = torch.float32
) -> ModelParams:
    """The frozen base model a LoRA checkpoint names (its recorded path, else the --model it came from),
    checked against the recorded fingerprint."""
    from .formats import load_model

    ref = manifest["base"]
    spec = ref.get("path") if ref.get("path") and Path(ref["path"]).exists() else ref.get("model")
    if not spec:
        raise InputError(where, "the LoRA checkpoint does not say where its base model is")
    base = load_model(spec, hf_dtype=hf_dtype)
    cfg = make_config(**manifest["model"])
    if config_difference(base.cfg, cfg):
        raise InputError(
            spec, f"is not the base model of the LoRA run in {where} ({config_difference(base.cfg, cfg)})"
        )
    if ref.get("fingerprint") and fingerprint(base.params) != ref["fingerprint"]:
        raise InputError(
            spec,
            f"has other weights than the base model the LoRA adapters in {where} were trained on "
            "(fingerprints differ)",
        )
    assert isinstance(base.params, ModelParams)
    return ModelParams(cfg, base.params.flat)


def _require_tensors(path: Path, expected: dict[str, tuple[int, ...]]) -> None:
    """The safetensors file holds exactly the ``expected`` tensor names and shapes (read from its header
    only)."""
    with safe_open(path, "pt") as f:
        names = set(f.keys())
        missing = sorted(set(expected) - names)
        if missing:
            raise InputError(path, f"is missing tensor {missing[0]} of the manifest's model")
        extra = sorted(names - set(expected))
        if extra:
            raise InputError(path, f"has tensor {extra[0]}, which the manifest's model does not")
        for name, shape in expected.items():
            found = tuple(f.get_slice(name).get_shape())
            if found != shape:
                raise InputError(path, f"tensor {name} has shape {found}, the manifest's model needs {shape}")


# ------------------------------------------------------------------------------------------------
# Run directories as model paths (what `generate`, `info` and `export` accept)

POINTERS = ("latest", "best")
RUN_CONFIG = "config.json"


def is_run_dir(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is an anetrain run directory: a ``config.json`` that is a run's (with its training
    options, not a Hugging Face model's), or a ``checkpoints/`` directory with anetrain's pointers or
    checkpoints in it."""
    p = Path(path)
    if not p.is_dir():
        return False
    root = p / "checkpoints"
    if root.is_dir() and (any((root / name).is_file() for name in POINTERS) or checkpoint_dirs(root)):
        return True
    return run_config(p) is not None


def run_config(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """A run directory's config.json, if it is a run's (a JSON object with the training options)."""
    try:
        raw = read_capped(Path(run_dir) / RUN_CONFIG, MANIFEST_LIMIT, "run config")
        doc = json.loads(raw.decode("utf-8"))
    except (AnetrainError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("train"), dict) else None


def run_of(path: str | os.PathLike[str]) -> tuple[Path, str] | None:
    """(RUN_DIR, pointer) when ``path`` names a run's model: the run directory itself, its ``checkpoints/``
    directory, or a pointer file in it (``checkpoints/latest``, ``checkpoints/best``); else None."""
    p = Path(path)
    if p.is_dir() and p.name == "checkpoints" and is_run_dir(p.parent):
        return p.parent, "latest"
    if p.is_dir() and ((p / "checkpoints").is_dir() or is_run_dir(p)):
        return p, "latest"
    if p.is_file() and p.name in POINTERS and p.parent.name == "checkpoints":
        return p.parent.parent, p.name
    return None


def run_tokenizer(path: str | os.PathLike[str]) -> Path | None:
    """The tokenizer the run that ``path`` names (a run directory, or a checkpoint or pointer inside one)
    was trained with, if its config.json names one that exists."""
    p = Path(path)
    found = run_of(p)
    if found is None and (p / MANIFEST).is_file() and p.parent.name == "checkpoints":
        found = p.parent.parent, "latest"  # a checkpoint directory of a run
    if found is None:
        return None
    run_dir = found[0]
    name = (run_config(run_dir) or {}).get("tokenizer")
    if not isinstance(name, str) or not name:
        return None
    for candidate in (Path(name), run_dir / name):
        if candidate.is_file():
            return candidate
    return None


def config_difference(a: ModelConfig, b: ModelConfig) -> str | None:
    """A one-line description of the first field in which two model configs differ, or None."""
    for field, va in a.to_dict().items():
        if field == "name":
            continue
        vb = b.to_dict()[field]
        if va != vb:
            return f"{field} is {vb!r} in the checkpoint but {va!r} here"
    return None
