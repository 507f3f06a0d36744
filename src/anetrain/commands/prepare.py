"""``anetrain prepare``: text -> token file (llama2.c's uint16 format, or uint32 for large vocabularies)
with a sidecar; instruction records -> tokens and a loss mask (``--format chat``)."""

from __future__ import annotations

import argparse
import sys

ORDER = 5

DESCRIPTION = """\
Turn text into a flat token file. With a llama2.c tokenizer.bin or sentencepiece .model, exactly like
llama2.c's pretokenizer: uint16, BOS (1) before each document, no EOS (with a .model the ids equal
tinystories.py's pretokenize output; a tokenizer.bin follows run.c's encoder, which does not collapse runs
of spaces). With a Hugging Face tokenizer.json (a file, a model directory or a Hub id), the model's own
layout: Qwen3's "text <|endoftext|>", Llama's "<s> text </s>"; uint32 when the vocabulary has ids above
65,535. Inputs: .txt (documents separated by empty lines, or by <|endoftext|> markers with --separator
endoftext), .jsonl (a "text" field per line), TinyStories JSON shards (.json lists with a "story" field).

--format chat reads instruction data instead: .jsonl records {"prompt": ..., "completion": ...} or
{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}, ...]}, rendered with the
tokenizer's chat template where it has one; OUT.mask beside the tokens marks the completion/assistant
tokens, the only ones training scores. A bad record is reported with its file and line; nothing is written.

A sidecar OUT.json records the dtype, the tokenizer, its fingerprint, the vocabulary size and counts."""


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
        "--tokenizer",
        required=True,
        help="tokenizer: sentencepiece .model, llama2.c tokenizer.bin, or a Hugging Face tokenizer.json (or "
        "the model directory / Hub id holding one)",
    )
    p.add_argument(
        "--format",
        choices=("text", "chat"),
        default="text",
        help="text: documents; chat: instruction records with a loss mask (see above)",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="--format chat: refuse records longer than this many tokens (default 4096; 0: no limit)",
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

    from ..data.prepare import DEFAULT_MAX_TOKENS, prepare, prepare_chat
    from ..errors import ConfigError

    if args.format == "text" and args.max_tokens is not None:
        raise ConfigError("--max-tokens applies to --format chat")
    max_tokens = DEFAULT_MAX_TOKENS if args.max_tokens is None else (args.max_tokens or None)

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

        if args.format == "chat":
            side = prepare_chat(
                args.inputs, args.tokenizer, args.out, max_tokens=max_tokens, progress=progress
            )
        else:
            side = prepare(
                args.inputs,
                args.tokenizer,
                args.out,
                separator=args.separator,
                text_field=args.text_field,
                workers=args.workers,
                progress=progress,
            )
    if args.format == "chat":
        print(
            f"wrote {args.out}: {side['n_tokens']:,} {side['dtype']} tokens from {side['records']:,} records "
            f"({side['loss_tokens']:,} scored, {side['chat_format']}); loss mask {args.out}.mask; "
            f"sidecar {args.out}.json",
            file=sys.stderr,
        )
        return 0
    print(
        f"wrote {args.out}: {side['n_tokens']:,} tokens from {side['n_documents']:,} documents "
        f"({side['dtype']}, vocab {side['vocab_size']}); sidecar {args.out}.json",
        file=sys.stderr,
    )
    return 0
