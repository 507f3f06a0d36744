"""``anetrain export IN OUT --format F``: convert a model between file formats."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import AnetrainError
from ..formats import load_model, save_model
from ..formats.common import human_bytes
from .info import disk_bytes

ORDER = 31

CHOICES = ("llama2c-v0", "llama2c-v1", "llama2c-v2", "hf", "peft", "blzt")

# How the writers' notes read to the user.
NOTE_TEXT = {
    "folded_residual_scale": "folded the residual scale {} into wo and w2 (the format has none)",
    "rescaled_wo_w2_by": "scaled wo and w2 by {} (and their Adam moments to match) for the file's residual "
    "scale",
    "group_size": "Q8_0 group size {}",
    "max_quantization_error": "largest quantization error {:.3g}",
    "rope_note": "{}",
    "architecture": "architecture {}",
    "copied": "copied {} from the source model",
    "lora": "LoRA adapters: {}",
    "base_model": "adapter_config.json names the base model {}",
    "tokenizer": "tokenizer: {}",
    "tokenizer_not_written": "no tokenizer files: {}",
}


def register(subparsers: Any) -> None:
    from ..cli import HelpFormatter

    p = subparsers.add_parser(
        "export",
        help="convert a model file to another format",
        description="Read IN (any format `anetrain info` reads) and write OUT in --format:\n"
        "  llama2c-v0  llama2.c legacy .bin (what run.c reads)\n"
        "  llama2c-v1  llama2.c fp32 with a 256-byte header\n"
        "  llama2c-v2  llama2.c Q8_0 int8 (what runq.c reads)\n"
        "  hf          Hugging Face LlamaForCausalLM directory (config.json + model.safetensors, and the\n"
        "              tokenizer's files with --tokenizer or from a run directory), replaced as a whole\n"
        "  blzt        the original trainer's checkpoint (v4; v2 with --blzt-version 2)\n"
        "A residual scale is folded into wo/w2 where the format has none. A format that cannot express the\n"
        "model (e.g. llama2.c with head_dim != dim/n_heads) is refused. Only BLZT keeps Adam state.",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "input",
        metavar="IN",
        help="model file, Hugging Face directory, or run directory (its newest checkpoint)",
    )
    p.add_argument("output", metavar="OUT", help="file (a directory for --format hf and peft) to write")
    p.add_argument(
        "--format", choices=CHOICES, default=argparse.SUPPRESS, help="output format (required unless --int8)"
    )
    p.add_argument(
        "--blzt-version",
        type=int,
        choices=(2, 4),
        default=4,
        help="BLZT version for --format blzt: 4 (dynamic pipeline) or 2 (static pipeline: MHA with "
        "head_dim = dim/n_heads, trained without RoPE)",
    )
    p.add_argument("--int8", action="store_true", help="synonym for --format llama2c-v2")
    p.add_argument(
        "--tokenizer",
        metavar="FILE",
        help="--format hf: the sentencepiece .model (or a tokenizer.bin with its .model beside it) written "
        "into the directory so that AutoTokenizer loads it; default: a run directory's own tokenizer",
    )
    p.set_defaults(func=run)


def target_format(args: argparse.Namespace) -> str:
    """The save_model format name the options ask for."""
    fmt = getattr(args, "format", None)
    if args.int8:
        if fmt not in (None, "llama2c-v2"):
            raise AnetrainError(f"--int8 means --format llama2c-v2; it conflicts with --format {fmt}")
        fmt = "llama2c-v2"
    if fmt is None:
        raise AnetrainError("give the output format with --format (or --int8)")
    return f"blzt-v{args.blzt_version}" if fmt == "blzt" else fmt


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import run_tokenizer
    from ..fsutil import refuse_overwriting_input

    fmt = target_format(args)
    refuse_overwriting_input(args.output, [args.input], flag="OUT")
    if args.tokenizer and fmt != "hf":
        raise AnetrainError(f"--tokenizer is for --format hf (a {fmt} file holds no tokenizer)")
    tokenizer = args.tokenizer or (run_tokenizer(args.input) if fmt == "hf" else None)
    m = load_model(args.input)
    keeps_state = fmt.startswith("blzt")
    notes = save_model(
        args.output,
        m.params,
        fmt,
        optimizer=m.optimizer if keeps_state else None,
        extras=m.extras if keeps_state or fmt == "peft" else None,
        source=m.source,
        adapters=m.adapters,
        tokenizer=tokenizer,
    )
    merged = " with its LoRA adapters merged" if m.adapters is not None and fmt != "peft" else ""
    print(f"wrote {args.output}: {fmt}, {human_bytes(disk_bytes(args.output))} (from {m.format}{merged})")
    if m.optimizer is not None and not keeps_state:
        print(f"note: the input's Adam state is not stored by {fmt}")
    if keeps_state and m.optimizer is None:
        print("note: the input has no optimizer state; Adam moments written as zeros")
    for key, value in notes.items():
        print("note: " + NOTE_TEXT.get(key, key.replace("_", " ") + ": {}").format(value))
    return 0
