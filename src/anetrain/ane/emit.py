"""Writing a kernel set to a directory, as a macOS runtime (or a person) will read it.

Layout of ``DIR`` (the original's programs land exactly as ``../shared/data/ane_reference/`` holds them)::

    <stem>.mil                         the MIL text, one per program (the original's kernel names for its
                                       programs: sdpaFwd.mil, ...; anetrain's names for its own)
    weights/<name>.bin                 the weight blobs (the BLOBFILE path minus "@model_path/"), shared by
                                       the programs that use them; a blob whose content differs between
                                       programs goes to <stem>/weights/<name>.bin instead
    sizes.txt                          "<stem> in=<bytes> out=<bytes>" per program: its surface allocations
                                       (the sum over its surfaces when it has several)
    manifest.json                      written last: model, chip, program set, and per program its inputs,
                                       outputs, binding order, allocation sizes, operand placements, padding,
                                       and where its blobs are

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
MANIFEST_VERSION = 2


def blob_files(ks: KernelSet) -> dict[str, dict[str, str]]:
    """Per program, each BLOBFILE path -> the file (relative to the set's directory) holding it."""
    contents: dict[str, set[bytes]] = {}
    for p in ks:
        for path, data in p.weights.items():
            contents.setdefault(path, set()).add(data)
    out: dict[str, dict[str, str]] = {}
    for p in ks:
        out[p.stem] = {
            path: ("" if len(contents[path]) == 1 else f"{p.stem}/")
            + "weights/"
            + path.removeprefix(BLOB_PREFIX)
            for path in p.weights
        }
    return out


def sizes_text(ks: KernelSet) -> str:
    """One line per program: its input and output surface allocations in bytes."""
    return "".join(
        f"{p.stem} in={p.input_alloc_bytes * len(p.inputs)} out={p.output_alloc_bytes * len(p.outputs)}\n"
        for p in ks
    )


def kernel_set_manifest(ks: KernelSet) -> dict[str, Any]:
    files = blob_files(ks)
    programs = []
    for p in ks:
        m = p.manifest()
        m["blob_files"] = files[p.stem]
        programs.append(m)
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "model": ks.cfg.to_dict(),
        "chip": ks.dialect.chip,
        "program_version": ks.dialect.program_version,
        "opset": ks.dialect.opset,
        "surface_align": ks.dialect.surface_align,
        "programs_set": ks.program_set,
        "inputs": ks.convention,
        "seq": ks.dims.seq,
        "padding": ks.dims.padding(),
        "programs": programs,
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
    files = blob_files(ks)
    for p in ks:
        mil = out / f"{p.stem}.mil"
        atomic_write_text(mil, p.mil_text)
        written.append(mil)
        for blob_path, data in p.weights.items():
            dest = out / files[p.stem][blob_path]
            if dest not in written:
                atomic_write_bytes(dest, data)
                written.append(dest)
    sizes = out / "sizes.txt"
    atomic_write_text(sizes, sizes_text(ks))
    written.append(sizes)
    manifest = out / "manifest.json"
    atomic_write_text(manifest, json.dumps(kernel_set_manifest(ks), indent=2) + "\n")
    written.append(manifest)
    return written
