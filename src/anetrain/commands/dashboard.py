"""``anetrain dashboard RUN_DIR``: the live training dashboard of a run directory (live or finished)."""

from __future__ import annotations

import argparse
import re

from ..errors import InputError

ORDER = 60


def parse_size(text: str) -> tuple[int, int]:
    """``COLSxROWS`` (e.g. ``120x40``) as a pair of ints."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m or int(m.group(1)) < 20 or int(m.group(2)) < 10:
        raise argparse.ArgumentTypeError(f"expected COLSxROWS with at least 20x10, e.g. 120x40, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..cli import HelpFormatter

    p = subparsers.add_parser(
        "dashboard",
        help="live dashboard of a training run (follows RUN_DIR/metrics.jsonl)",
        description=(
            "Attach to a run directory written by `anetrain train --out RUN_DIR`, live or finished, and\n"
            "show the loss curve, training stats, per-phase timing, CPU/memory/power, generated text and\n"
            "the log.\n"
            "Keys: q quit, g generate text now, p toggle log auto-scroll, arrow/page keys scroll the log.\n"
            "Quitting does not stop a trainer that the dashboard did not start."
        ),
        formatter_class=HelpFormatter,
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory to follow")
    p.add_argument("--no-power", action="store_true", help="do not read power (nvidia-smi / powermetrics)")
    p.add_argument(
        "--screenshot",
        metavar="FILE.svg",
        help="render the dashboard once, headless, write an SVG screenshot to this file and exit",
    )
    p.add_argument(
        "--size",
        type=parse_size,
        default="120x40",
        metavar="COLSxROWS",
        help="terminal size for --screenshot",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..fsutil import atomic_write_text
    from ..ui.dashboard import run_dashboard, screenshot

    if args.screenshot:
        if not args.screenshot.lower().endswith(".svg"):
            raise InputError(args.screenshot, "screenshots are SVG files: give a name ending in .svg")
        svg = screenshot(args.run_dir, size=args.size, settle_s=1.5, power=not args.no_power)
        atomic_write_text(args.screenshot, svg)
        print(args.screenshot)
        return 0
    return run_dashboard(args.run_dir, power=not args.no_power)
