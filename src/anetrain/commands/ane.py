"""``anetrain ane ...``: Apple Neural Engine tools. ``emit`` writes a model's kernel programs (MIL text).

Each subcommand is a ``register_<name>(subparsers)`` function listed in :data:`SUBCOMMANDS`; adding one
(``selfcheck``, ``peak``) means writing its function and appending it there.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

ORDER = 70


def _emit(args: argparse.Namespace) -> int:
    from ..ane.emit import emit_kernel_set
    from ..ane.programs import build_kernel_set
    from ..config import resolve_config

    cfg = resolve_config(args.model)
    ks = build_kernel_set(cfg, args.chip, args.inputs, seq=args.seq, extras=not args.no_extras)
    files = emit_kernel_set(ks, args.out)
    pad = ", ".join(f"{k} {a}->{b}" for k, (a, b) in ks.dims.padding().items()) or "none"
    d = ks.dialect
    print(
        f"wrote {len(ks)} programs for {cfg.name} ({cfg.shape_line()}) to {args.out}: "
        f"{d.chip}, program({d.program_version})/{d.opset}, {ks.convention} inputs, "
        f"seq {ks.dims.seq}; padding: {pad}; {len(files)} files"
    )
    for p in ks:
        print(
            f"  {p.name:<13} in {len(p.inputs)} x {p.input_alloc_bytes:>9,} B   "
            f"out {len(p.outputs)} x {p.output_alloc_bytes:>9,} B   {p.doc}"
        )
        for w in p.meta["warnings"]:
            print(f"warning: {p.name}: {w}", file=sys.stderr)
    return 0


def register_emit(sub: Any) -> None:
    from ..ane.dialect import CHIPS
    from ..ane.program import CONVENTIONS
    from ..cli import HelpFormatter

    p = sub.add_parser(
        "emit",
        help="write a model's ANE kernel programs (MIL text, weight blobs, manifest.json)",
        description="Generate the dynamic-weight kernel set of a model (forward, dx and the optional extras) "
        "for one chip and write it to a directory: one .mil file per program, its weight blobs under "
        "<program>/weights/, and manifest.json with every program's inputs, outputs, binding order, "
        "surface allocation sizes and padding. A macOS runtime compiles exactly these files.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--model", required=True, help="a preset name or a .toml/.json model config file")
    p.add_argument(
        "--chip", default="m4", choices=CHIPS, help="Apple silicon family (selects the MIL dialect)"
    )
    p.add_argument(
        "--inputs",
        default="separate",
        choices=CONVENTIONS,
        help="separate: weights as separate inputs (uniform surfaces, alphabetical binding); "
        "packed: one input surface holding activations and weights, as the original",
    )
    p.add_argument(
        "--seq",
        type=int,
        default=None,
        help="sequence length the programs are built for; none: the model's seq_len",
    )
    p.add_argument(
        "--no-extras",
        action="store_true",
        help="omit the final RMSNorm, classifier, softmax and RMSNorm-backward programs",
    )
    p.add_argument("--out", required=True, help="directory to write (created if needed)")
    p.set_defaults(func=_emit)


SUBCOMMANDS: list[Callable[[Any], None]] = [register_emit]


def register(subparsers: Any) -> None:
    from ..cli import HelpFormatter

    p = subparsers.add_parser(
        "ane",
        help="Apple Neural Engine tools (emit kernel programs)",
        description="Tools for the Apple Neural Engine backend. Everything but running programs on a Mac "
        "works on any machine.",
        formatter_class=HelpFormatter,
    )
    sub = p.add_subparsers(dest="ane_command", metavar="SUBCOMMAND")
    for add in SUBCOMMANDS:
        add(sub)

    def usage(_: argparse.Namespace) -> int:
        p.print_help()
        return 2

    p.set_defaults(func=usage)
