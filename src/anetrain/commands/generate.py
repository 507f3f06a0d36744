"""``anetrain generate``: sample text from a model, printed exactly as llama2.c's ``run.c`` prints it.

Only the text goes to standard output, streamed piece by piece (the prompt's pieces included, as run.c
prints every token after the first), followed by one newline; run.c's ``safe_printf`` rule applies, so
single-byte pieces that are neither printable ASCII nor whitespace are not printed. The achieved speed
goes to standard error.
"""

from __future__ import annotations

import argparse
import sys

import torch

from ..cli import HelpFormatter
from ..errors import AnetrainError
from ..formats import load_model, model_tokenizer
from ..generate import stream
from ..tokenizer import load_tokenizer

ORDER = 40

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def printable(piece: bytes) -> bool:
    """run.c's ``safe_printf``: skip empty pieces and single bytes that are not isprint/isspace (C locale)."""
    if not piece:
        return False
    if len(piece) == 1:
        b = piece[0]
        return 0x20 <= b <= 0x7E or 0x09 <= b <= 0x0D
    return True


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate text from a model (llama2.c run.c semantics)",
        description=(
            "Generate text from a model file, as llama2.c's run.c does: the prompt is encoded with BOS,\n"
            "generation stops after --steps positions (prompt included) or when BOS is sampled. The text\n"
            "goes to stdout, the achieved tokens/s to stderr."
        ),
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--model",
        required=True,
        metavar="FILE",
        help="model file (llama2.c .bin, ...), or a run directory (its newest checkpoint)",
    )
    p.add_argument(
        "--tokenizer",
        metavar="FILE",
        help="tokenizer.bin or sentencepiece .model file; for a run directory, the run's by default",
    )
    p.add_argument("--prompt", default="", metavar="TEXT", help="text to start from")
    p.add_argument(
        "--temperature", type=float, default=1.0, metavar="T", help="sampling temperature; 0 = greedy argmax"
    )
    p.add_argument(
        "--top-p", type=float, default=0.9, metavar="P", help="nucleus sampling mass; 0 or 1 = off"
    )
    p.add_argument(
        "--top-k", type=int, default=0, metavar="K", help="sample among the K most likely; 0 = off"
    )
    p.add_argument(
        "--steps",
        type=int,
        default=256,
        metavar="N",
        help="positions to run, prompt included; 0 or more than the model's seq_len = seq_len",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        metavar="S",
        help="random seed; unset or <= 0 seeds from the clock, as run.c",
    )
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="compute precision")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.steps < 0:
        raise AnetrainError(f"--steps must be >= 0, got {args.steps}")
    model = load_model(args.model)
    tok = load_tokenizer(args.tokenizer or model_tokenizer(args.model), vocab_size=model.cfg.vocab_size)
    gen = stream(
        model.params,
        tok,
        prompt=args.prompt,
        steps=args.steps,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        dtype=_DTYPES[args.dtype],
    )
    out = sys.stdout.buffer
    for t in gen:
        if printable(t.piece):
            out.write(t.piece)
            out.flush()
    out.write(b"\n")
    out.flush()
    if gen.positions > 1:
        print(f"achieved tok/s: {gen.tokens_per_s:f}", file=sys.stderr)
    return 0
