"""``anetrain tokenizer``: train a BPE vocabulary, export a .model as tokenizer.bin, encode, decode."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..cli import HelpFormatter
from ..errors import AnetrainError
from ..tokenizer import export_tokenizer_bin, load_tokenizer, train_tokenizer
from ..tokenizer.corpus import SEPARATORS

ORDER = 20


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "tokenizer",
        help="train, export, inspect and apply tokenizers (llama2.c tokenizer.bin, sentencepiece .model)",
        description=(
            "Tokenizer tools. Tokenizer files are llama2.c tokenizer.bin or sentencepiece .model files;\n"
            "tokenizer.bin files encode exactly as llama2.c's run.c does, .model files as sentencepiece."
        ),
        formatter_class=HelpFormatter,
    )
    sub = parser.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)

    p = sub.add_parser(
        "train",
        help="train a BPE tokenizer with sentencepiece, as llama2.c's tinystories.py train_vocab",
        description=(
            "Train a BPE vocabulary with llama2.c's sentencepiece settings and write PREFIX.model and its\n"
            "llama2.c export PREFIX.bin. Inputs: .txt files (documents separated as --separator says),\n"
            '.jsonl files (one object per line with a "text" or "story" field) or .json lists of them.'
        ),
        formatter_class=HelpFormatter,
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="corpus files (.txt, .jsonl, .json)")
    p.add_argument("--vocab-size", type=int, required=True, help="number of tokens in the vocabulary")
    p.add_argument(
        "--out", required=True, metavar="PREFIX", help="output prefix: writes PREFIX.model and PREFIX.bin"
    )
    p.add_argument(
        "--separator",
        choices=SEPARATORS,
        default="blank",
        help="how documents are separated in text files: blank lines, <|endoftext|> markers, or one per line",
    )
    p.add_argument("--verbose", action="store_true", help="show sentencepiece's training log")
    p.set_defaults(func=run_train)

    p = sub.add_parser(
        "export",
        help="convert a sentencepiece .model into a llama2.c tokenizer.bin",
        description="Convert a sentencepiece .model into a llama2.c tokenizer.bin (llama2.c tokenizer.py).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", help="sentencepiece .model file")
    p.add_argument("--out", required=True, metavar="BIN", help="the tokenizer.bin to write")
    p.set_defaults(func=run_export)

    p = sub.add_parser(
        "encode",
        help="print the token ids of a text",
        description="Print the token ids of TEXT on one line, separated by spaces.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--tokenizer", required=True, metavar="FILE", help="tokenizer.bin or .model file")
    p.add_argument("text", metavar="TEXT", help="the text to encode ('-' reads standard input)")
    p.add_argument("--no-bos", dest="bos", action="store_false", help="do not start with BOS (id 1)")
    p.add_argument("--eos", action="store_true", help="end with EOS (id 2)")
    p.set_defaults(func=run_encode)

    p = sub.add_parser(
        "decode",
        help="print the text of token ids",
        description="Print the text of the token ids (BOS and EOS print nothing).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--tokenizer", required=True, metavar="FILE", help="tokenizer.bin or .model file")
    p.add_argument("ids", nargs="+", type=int, metavar="ID", help="token ids")
    p.set_defaults(func=run_decode)

    p = sub.add_parser(
        "info",
        help="print a tokenizer's size, special ids and fingerprint",
        description="Print a tokenizer's kind, vocabulary size, special ids and sha256 fingerprint.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("tokenizer", metavar="FILE", help="tokenizer.bin or .model file")
    p.set_defaults(func=run_info)


def run_train(args: argparse.Namespace) -> int:
    paths = train_tokenizer(
        [Path(p) for p in args.inputs],
        args.vocab_size,
        args.out,
        separator=args.separator,
        verbose=args.verbose,
    )
    print(f"wrote {paths.model} and {paths.bin}", file=sys.stderr)
    return 0


def run_export(args: argparse.Namespace) -> int:
    out = export_tokenizer_bin(args.model, args.out)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def run_encode(args: argparse.Namespace) -> int:
    tok = load_tokenizer(args.tokenizer)
    text = sys.stdin.read() if args.text == "-" else args.text
    print(" ".join(str(i) for i in tok.encode(text, bos=args.bos, eos=args.eos)))
    return 0


def run_decode(args: argparse.Namespace) -> int:
    tok = load_tokenizer(args.tokenizer)
    bad = [i for i in args.ids if not 0 <= i < tok.vocab_size]
    if bad:
        raise AnetrainError(
            f"token id {bad[0]} is outside the vocabulary of {args.tokenizer} (0..{tok.vocab_size - 1})"
        )
    sys.stdout.write(tok.decode(args.ids) + "\n")
    return 0


def run_info(args: argparse.Namespace) -> int:
    tok = load_tokenizer(args.tokenizer)
    print(f"{tok.path}: {type(tok).__name__}")
    print(f"vocab_size: {tok.vocab_size}")
    print(f"bos_id: {tok.bos_id}  eos_id: {tok.eos_id}")
    print(f"fingerprint: sha256:{tok.fingerprint()}")
    return 0
