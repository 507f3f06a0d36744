"""Writing a kernel set to a directory, as a macOS runtime (or a person) will read it.

Layout of ``DIR``::

    <program>.mil                      the MIL text, one per program
    <program>/weights/<name>.bin       its weight blobs (the BLOBFILE path minus "@model_path/")
    manifest.json                      written last: model, chip, convention, and per program its inputs,
                                       outputs, binding order, allocation sizes, operand placements, padding

Every file is written atomically; the manifest's presence marks a complete set.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..fsutil import atomic_write_bytes, atomic_write_text
from .mil import BLOB_PREFIX
from .programs import KernelSet

MANIFEST_FORMAT = "anetrain-ane-kernels"
MANIFEST_VERSION = 1


def kernel_set_manifest(ks: KernelSet) -> dict[str, Any]:
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "model": ks.cfg.to_dict(),
        "chip": ks.dialect.chip,
        "program_version": ks.dialect.program_version,
        "opset": ks.dialect.opset,
        "surface_align": ks.dialect.surface_align,
        "inputs": ks.convention,
        "seq": ks.dims.seq,
        "padding": ks.dims.padding(),
        "programs": [p.manifest() for p in ks],
    }


def emit_kernel_set(ks: KernelSet, out_dir: str | Path) -> list[Path]:
    """Write every program of ``ks`` under ``out_dir``; returns the files written (manifest last)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(out, f"cannot create the output directory ({e.strerror or e})") from None
    written: list[Path] = []
    for p in ks:
        mil = out / f"{p.name}.mil"
        atomic_write_text(mil, p.mil_text)
        written.append(mil)
        for blob_path, data in p.weights.items():
            dest = out / p.name / "weights" / blob_path.removeprefix(BLOB_PREFIX)
            atomic_write_bytes(dest, data)
            written.append(dest)
    manifest = out / "manifest.json"
    atomic_write_text(manifest, json.dumps(kernel_set_manifest(ks), indent=2) + "\n")
    written.append(manifest)
    return written
