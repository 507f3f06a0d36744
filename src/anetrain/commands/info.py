"""``anetrain info FILE``: what a model file holds (format, config, parameter count, format extras)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from ..formats import LoadedModel, load_model
from ..formats.common import human_bytes, human_count

ORDER = 30


def register(subparsers: Any) -> None:
    from ..cli import HelpFormatter

    p = subparsers.add_parser(
        "info",
        help="show a model file's format, config, parameter count and extras",
        description="Read a model file (llama2.c v0/v1/v2, BLZT checkpoint, or Hugging Face directory) and "
        "describe it. The format is detected from the file's header.",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "file",
        help="model file, Hugging Face model directory, or run directory (its newest checkpoint; or "
        "RUN_DIR/checkpoints/best)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run)


def disk_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes on disk: the file, or every file of a directory."""
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.iterdir() if f.is_file())
    return p.stat().st_size


def describe(path: str, m: LoadedModel) -> dict[str, Any]:
    """Everything ``info`` reports, as plain data."""
    n = m.cfg.param_count()
    return {
        "file": path,
        "format": m.format,
        "bytes": disk_bytes(path),
        "config": m.cfg.to_dict(),
        "parameters": n,
        "tied_classifier": m.cfg.tied_classifier,
        "optimizer_state": None if m.optimizer is None else {"adam_t": m.optimizer.t},
        "extras": m.extras,
    }


def format_text(info: dict[str, Any]) -> str:
    cfg = info["config"]
    n = info["parameters"]
    lines = [
        f"file        {info['file']} ({human_bytes(info['bytes'])})",
        f"format      {info['format']}",
        f"parameters  {n:,} ({human_count(n)}; {human_bytes(4 * n)} as float32)",
        "classifier  " + ("tied to the token embedding" if info["tied_classifier"] else "separate (untied)"),
    ]
    if info["optimizer_state"] is not None:
        lines.append(f"optimizer   Adam moments present (t = {info['optimizer_state']['adam_t']})")
    lines.append("config")
    width = max(len(k) for k in cfg)
    lines += [f"  {k:<{width}}  {v}" for k, v in cfg.items()]
    if info["extras"]:
        lines.append("extras")
        width = max(len(k) for k in info["extras"])
        lines += [f"  {k:<{width}}  {_short(v)}" for k, v in info["extras"].items()]
    return "\n".join(lines)


def _short(v: Any) -> str:
    """Floats from float32 header fields printed without their binary noise (3e-4, not 0.000300000014)."""
    return f"{v:.7g}" if isinstance(v, float) else str(v)


def run(args: argparse.Namespace) -> int:
    info = describe(args.file, load_model(args.file))
    print(json.dumps(info, indent=2) if args.json else format_text(info))
    return 0
