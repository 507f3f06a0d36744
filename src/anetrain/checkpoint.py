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
verifies if the pointer is missing or names a damaged one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import ModelConfig, make_config
from .errors import AnetrainError, ConfigError, InputError
from .fsutil import atomic_write_text, describe_os_error, file_sha256, fsync_dir
from .lora import LoraConfig, LoraParams, fingerprint
from .optim import AdamState
from .params import FlatParams, ModelParams

FORMAT = "anetrain-checkpoint"
VERSION = 1
MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optimizer.safetensors"
MANIFEST = "manifest.json"


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
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
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
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = read_pointer(root, "latest")
        keep_msg = f"the previous checkpoint {kept} is kept" if kept else "no earlier checkpoint exists"
        raise AnetrainError(f"{final}: checkpoint write failed ({describe_os_error(e)}); {keep_msg}") from e
    for pointer in pointers:
        # the checkpoint itself is complete; if a pointer cannot be written, loading falls back to scanning
        with contextlib.suppress(AnetrainError):
            atomic_write_text(root / pointer, name + "\n")
    return final


def read_pointer(root: Path, pointer: str) -> str | None:
    with contextlib.suppress(OSError, UnicodeDecodeError):
        name = (root / pointer).read_text("utf-8").strip()
        return name or None
    return None


def prune_checkpoints(run_dir: str | os.PathLike[str], keep: int) -> None:
    """Delete all but the newest ``keep`` step checkpoints (never one a pointer names) and stale temps."""
    root = Path(run_dir) / "checkpoints"
    if not root.exists():
        return
    protected = {read_pointer(root, p) for p in ("latest", "best")}
    steps = sorted(d for d in root.iterdir() if d.is_dir() and d.name.startswith("step_"))
    for d in steps[: max(0, len(steps) - keep)]:
        if d.name not in protected:
            shutil.rmtree(d, ignore_errors=True)
    for d in root.iterdir():
        if d.name.startswith((".tmp-", ".old-")) and d.is_dir():
            pid = d.name.rsplit("-", 1)[-1]
            if not (pid.isdigit() and int(pid) == os.getpid()):
                shutil.rmtree(d, ignore_errors=True)
    best = read_pointer(root, "best")
    for d in root.iterdir():
        if d.is_dir() and d.name.startswith("best_") and d.name != best:
            shutil.rmtree(d, ignore_errors=True)


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """The manifest of a complete, undamaged checkpoint directory; raises InputError otherwise."""
    mf = path / MANIFEST
    try:
        manifest = json.loads(mf.read_text("utf-8"))
    except FileNotFoundError:
        raise InputError(path, "incomplete checkpoint (no manifest.json)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(mf, f"unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InputError(mf, "not an anetrain checkpoint manifest")
    if manifest.get("version") != VERSION:
        raise InputError(mf, f"unknown checkpoint version {manifest.get('version')!r}")
    for fname, info in manifest.get("files", {}).items():
        f = path / fname
        if not f.exists():
            raise InputError(f, "missing from the checkpoint")
        if f.stat().st_size != info["bytes"]:
            raise InputError(f, f"size {f.stat().st_size} does not match the manifest ({info['bytes']})")
        if file_sha256(f) != info["sha256"]:
            raise InputError(f, "checksum does not match the manifest (damaged file)")
    return manifest


def _candidates(root: Path, pointer: str) -> list[Path]:
    """The checkpoint a pointer names, then every step checkpoint, newest first."""
    named = read_pointer(root, pointer)
    found = [root / named] if named else []
    return found + sorted(
        (d for d in root.iterdir() if d.is_dir() and d.name.startswith("step_")), reverse=True
    )


def _find_verified(run_dir: str | os.PathLike[str], pointer: str) -> tuple[Path, dict[str, Any]] | None:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    for c in _candidates(root, pointer):
        try:
            return c, verify_checkpoint(c)
        except InputError:
            continue
    return None


def find_checkpoint(run_dir: str | os.PathLike[str], pointer: str = "latest") -> Path | None:
    """The checkpoint a pointer names if it verifies, else the newest step checkpoint that verifies."""
    found = _find_verified(run_dir, pointer)
    return found[0] if found else None


def holds_checkpoint(run_dir: str | os.PathLike[str]) -> bool:
    """Whether a run directory has any complete checkpoint (its manifest written), without reading it."""
    root = Path(run_dir) / "checkpoints"
    return root.is_dir() and any((d / MANIFEST).exists() for d in root.iterdir() if d.is_dir())


def load_latest(
    run_dir: str | os.PathLike[str], pointer: str = "latest", *, with_optimizer: bool = True
) -> Checkpoint | None:
    """:func:`find_checkpoint` and :func:`load_checkpoint` in one, verifying the files only once."""
    found = _find_verified(run_dir, pointer)
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

    try:
        with safe_open(p / MODEL_FILE, "pt") as f:
            params = build({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
        optimizer = None
        if with_optimizer and (p / OPTIM_FILE).exists():
            with safe_open(p / OPTIM_FILE, "pt") as f:
                names = list(f.keys())
                m = build({k[2:]: f.get_tensor(k) for k in names if k.startswith("m.")})
                v = build({k[2:]: f.get_tensor(k) for k in names if k.startswith("v.")})
            optimizer = AdamState(m, v, int(manifest.get("adam_t") or 0))
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


def config_difference(a: ModelConfig, b: ModelConfig) -> str | None:
    """A one-line description of the first field in which two model configs differ, or None."""
    for field, va in a.to_dict().items():
        if field == "name":
            continue
        vb = b.to_dict()[field]
        if va != vb:
            return f"{field} is {vb!r} in the checkpoint but {va!r} here"
    return None
