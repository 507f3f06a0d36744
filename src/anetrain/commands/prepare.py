"""``anetrain prepare``: text -> uint16 token file (llama2.c's pretokenized format) with a sidecar."""

from __future__ import annotations

import argparse
import sys

ORDER = 5

DESCRIPTION = """\
Turn text into a flat uint16 token file exactly like llama2.c's pretokenizer: BOS (1) before each
document, no EOS. Inputs: .txt (documents separated by empty lines, or by <|endoftext|> markers with
--separator endoftext), .jsonl (a "text" field per line), TinyStories JSON shards (.json lists with a
"story" field). A sidecar OUT.json records the tokenizer, its fingerprint, the vocabulary size and counts.
With a sentencepiece .model the ids equal llama2.c's tinystories.py pretokenize output; with a llama2.c
tokenizer.bin they follow run.c's encoder (which does not collapse runs of spaces)."""


def register(sub: argparse._SubParsersAction) -> None:
    from ..cli import HelpFormatter

    p = sub.add_parser(
        "prepare",
        help="tokenize text into a training token file",
        description=DESCRIPTION,
        formatter_class=HelpFormatter,
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="text inputs (.txt, .jsonl, .json)")
    p.add_argument(
        "--tokenizer", required=True, help="tokenizer: sentencepiece .model or llama2.c tokenizer.bin"
    )
    p.add_argument("--out", required=True, help="output token file (e.g. data/train.bin)")
    p.add_argument(
        "--separator",
        choices=("blank", "endoftext", "line"),
        default="blank",
        help="what separates documents in .txt inputs: an empty line, an <|endoftext|> marker, a newline",
    )
    p.add_argument(
        "--text-field",
        default=None,
        help='field holding the document in .jsonl/.json inputs (default: "text" or "story")',
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="encoding processes (default: one per core for inputs over 2 MB, else 1)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from ..data.prepare import prepare

    with Progress(
        TextColumn("encoding"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        transient=True,
        disable=not sys.stderr.isatty(),
    ) as bar:
        task = bar.add_task("encode", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        side = prepare(
            args.inputs,
            args.tokenizer,
            args.out,
            separator=args.separator,
            text_field=args.text_field,
            workers=args.workers,
            progress=progress,
        )
    print(
        f"wrote {args.out}: {side['n_tokens']:,} tokens from {side['n_documents']:,} documents "
        f"(vocab {side['vocab_size']}); sidecar {args.out}.json",
        file=sys.stderr,
    )
    return 0
