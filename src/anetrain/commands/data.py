"""``anetrain data tinystories``: fetch the data and models the original trainer uses."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ORDER = 4

DESCRIPTION = """\
Download the Llama-2-tokenized TinyStories shard the original trainer uses (tinystories_data00.bin,
20.7M tokens, extracted from a ~1 GB tarball as its download_data.sh does), llama2.c's tokenizer.bin, and,
when asked, tinyllamas checkpoints (--model stories15M|stories42M|stories110M|stories260K). Interrupted
downloads resume; every file is checked against its size (and sha256 where one is published)."""


def register(sub: argparse._SubParsersAction) -> None:
    from ..cli import HelpFormatter

    p = sub.add_parser(
        "data",
        help="download TinyStories, llama2.c's tokenizer and checkpoints",
        description=DESCRIPTION,
        formatter_class=HelpFormatter,
    )
    what = p.add_subparsers(dest="what", metavar="WHAT", required=True)
    t = what.add_parser(
        "tinystories",
        help="the TinyStories shard (+ tokenizer, + models on request)",
        description=DESCRIPTION,
        formatter_class=HelpFormatter,
    )
    t.add_argument("--out", required=True, help="directory to download into")
    t.add_argument(
        "--model",
        action="append",
        default=[],
        choices=("stories260K", "stories15M", "stories42M", "stories110M"),
        help="also download this tinyllamas checkpoint (repeatable)",
    )
    t.add_argument("--no-data", action="store_true", help="skip the TinyStories shard")
    t.add_argument("--no-tokenizer", action="store_true", help="skip llama2.c's tokenizer.bin")
    t.add_argument(
        "--keep-tarball", action="store_true", help="keep the ~1 GB tarball after extracting the shard"
    )
    t.add_argument(
        "--mirror", default=None, help="fetch from this base URL instead (same paths), e.g. a local cache"
    )
    t.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from ..data import download as D

    out = Path(args.out)
    jobs: list[tuple[str, object]] = []
    if not args.no_data:
        jobs.append(("TinyStories shard", None))
    if not args.no_tokenizer:
        jobs.append(("tokenizer.bin", D.ASSETS["tokenizer"]))
    for m in args.model:
        jobs.append((f"{m}.bin", D.ASSETS[m]))
        if m == "stories260K":
            jobs.append(("tok512.bin", D.ASSETS["tok512"]))
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        disable=not sys.stderr.isatty(),
        transient=True,
    ) as bar:
        for label, asset in jobs:
            task = bar.add_task(label, total=None)

            def progress(done: int, total: int | None, task: int = task) -> None:
                bar.update(task, completed=done, total=total)

            if asset is None:
                path = D.fetch_tinystories(
                    out,
                    tarball=D.mirrored(D.TINYSTORIES_TARBALL, args.mirror),
                    keep_tarball=args.keep_tarball,
                    progress=progress,
                )
            else:
                path = D.fetch(D.mirrored(asset, args.mirror), out, progress=progress)  # type: ignore[arg-type]
            print(f"{label}: {path} ({path.stat().st_size:,} bytes, verified)", file=sys.stderr)
    return 0
