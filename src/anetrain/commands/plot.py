"""``anetrain plot RUN_DIR... --out FILE.png``: loss, ms/step by phase and throughput of one or more runs."""

from __future__ import annotations

import argparse

from .dashboard import parse_size

ORDER = 61


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..cli import HelpFormatter

    p = subparsers.add_parser(
        "plot",
        help="plot loss, ms/step by phase and tokens/s of runs into an image",
        description=(
            "Draw one image from the metrics.jsonl of one or more run directories: training and validation\n"
            "loss, the ms/step breakdown by phase (stacked) and throughput. Several runs are overlaid, each\n"
            "labelled by its directory name."
        ),
        formatter_class=HelpFormatter,
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories to plot")
    p.add_argument(
        "--out",
        required=True,
        default=argparse.SUPPRESS,  # required: no default to show
        metavar="FILE",
        help="image to write (.png, .svg or .pdf)",
    )
    p.add_argument(
        "--x",
        choices=("step", "tokens", "time"),
        default="step",
        help="x axis: optimizer step, tokens trained, or wall time",
    )
    p.add_argument("--size", type=parse_size, default="1200x800", metavar="WxH", help="image size in pixels")
    p.add_argument("--dpi", type=int, default=100, help="dots per inch (font size relative to the image)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..ui.plot import plot_runs

    path = plot_runs(args.run_dirs, args.out, x=args.x, size=args.size, dpi=args.dpi)
    print(path)
    return 0
