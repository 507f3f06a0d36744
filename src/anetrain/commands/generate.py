"""``anetrain generate``: sample text from a model, printed exactly as llama2.c's ``run.c`` prints it.

Only the text goes to standard output, streamed piece by piece as it is made (the prompt's pieces included, as
run.c prints every token after the first), followed by one newline; run.c's ``safe_printf`` rule applies, so
single-byte pieces that are neither printable ASCII nor whitespace are not printed. With ``--num-samples N``
the N samples follow one another (the first streamed, each ended by a newline, an empty line between them);
``--json`` prints one JSON object per sample instead. Statistics go to standard error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..cli import HelpFormatter
from ..errors import AnetrainError, InputError

ORDER = 40

DTYPE_CHOICES = ("auto", "fp32", "bf16", "int8", "float32", "float64")


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
        help="generate text from a model or a run's checkpoint (llama2.c run.c semantics)",
        description=(
            "Generate text as llama2.c's run.c does: the prompt is encoded with BOS, generation stops after\n"
            "--steps positions (prompt included) or when BOS is sampled. The prompt is fed in one batched\n"
            "pass, then one compiled decode step per token (native CPU kernels; torch operators elsewhere).\n"
            "SOURCE is a run directory (its newest checkpoint, or --best, and the tokenizer its config.json\n"
            "names) or a model file (as --model). Text streams to stdout, statistics to stderr."
        ),
        formatter_class=HelpFormatter,
    )
    p.add_argument("source", nargs="?", metavar="SOURCE", help="run directory or model file")
    p.add_argument(
        "--model", metavar="FILE", help="model file (llama2.c .bin, HF directory, checkpoint, ...)"
    )
    p.add_argument(
        "--tokenizer", metavar="FILE", help="tokenizer.bin or sentencepiece .model (default: the run's)"
    )
    p.add_argument("--best", action="store_true", help="with a run directory: its best-validation checkpoint")
    p.add_argument("--prompt", default=None, metavar="TEXT", help="text to start from")
    p.add_argument(
        "--prompt-file", metavar="FILE", help="read the prompt from a UTF-8 file (one final newline dropped)"
    )
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
    p.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="weight precision: fp32, bf16 (half the bytes), int8 (Q8_0 as runq.c; a llama2.c v2 file is "
        "used as stored, other models are quantized on load); float32/float64 as before; auto = int8 for a "
        "llama2.c v2 file, else fp32",
    )
    p.add_argument(
        "--num-samples",
        type=int,
        default=1,
        metavar="N",
        help="N continuations of the prompt in one batched decode (stream 0 uses --seed as run.c would)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object per sample instead of the text")
    p.add_argument(
        "--threads", type=int, default=None, metavar="N", help="CPU threads (default: torch's, one per core)"
    )
    p.add_argument(
        "--backend",
        choices=("auto", "native", "torch"),
        default="auto",
        help="decoder: native CPU kernels (built with the C compiler at first use), torch operators, or auto",
    )
    p.set_defaults(func=run)


def _prompt(args: argparse.Namespace) -> str:
    if args.prompt_file is None:
        return args.prompt or ""
    if args.prompt is not None:
        raise AnetrainError("give --prompt or --prompt-file, not both")
    path = Path(args.prompt_file)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise InputError(path, f"cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise InputError(path, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    return text[:-1] if text.endswith("\n") else text


def run(args: argparse.Namespace) -> int:
    from ..generate import Generation
    from ..generate.source import is_run_dir, load_weights, resolve_source, run_tokenizer
    from ..tokenizer import load_tokenizer

    if args.steps < 0:
        raise AnetrainError(f"--steps must be >= 0, got {args.steps}")
    if args.num_samples < 1:
        raise AnetrainError(f"--num-samples must be at least 1, got {args.num_samples}")
    if args.threads is not None and args.threads < 1:
        raise AnetrainError(f"--threads must be at least 1, got {args.threads}")
    if args.source and args.model:
        raise AnetrainError("give the model as SOURCE or as --model, not both")
    if not (args.source or args.model):
        raise AnetrainError("no model: give a run directory or model file (SOURCE or --model)")
    prompt = _prompt(args)
    src = resolve_source(args.source or args.model, best=args.best)
    tokenizer_path = args.tokenizer or src.tokenizer
    if tokenizer_path is None:
        if is_run_dir(args.source or args.model):
            run_tokenizer(args.source or args.model)  # raises, naming the problem
        raise AnetrainError("no tokenizer: pass --tokenizer (tokenizer.bin or a sentencepiece .model)")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = "fp64" if args.dtype == "float64" else args.dtype
    weights = load_weights(src.model, dtype)
    tok = load_tokenizer(tokenizer_path, vocab_size=weights.cfg.vocab_size)
    gen = Generation(
        weights,
        tok,
        prompt=prompt,
        steps=args.steps,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        num_samples=args.num_samples,
        backend=args.backend,
        threads=args.threads,
    )
    out = sys.stdout.buffer
    for t in gen:
        if t.stream == 0 and not args.json and printable(t.piece):
            out.write(t.piece)
            out.flush()
    if args.json:
        for s in gen.samples:
            record = {
                "sample": s.stream,
                "seed": s.seed,
                "text": s.text,
                "tokens": s.tokens,
                "prompt_tokens": len(gen.prompt_tokens),
                "positions": s.positions,
                "stopped_at_bos": s.stopped_at_bos,
            }
            out.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
    else:
        out.write(b"\n")
        for s in gen.samples[1:]:
            out.write(b"\n" + b"".join(p for p in s.pieces if printable(p)) + b"\n")
    out.flush()
    st = gen.stats
    if st.decode_steps > 0:
        print(f"achieved tok/s: {st.decode_tokens_per_s:f}", file=sys.stderr)
    where = f"{src.label}; " if src.step is not None else ""
    print(f"{where}{st.line()}", file=sys.stderr)
    return 0
