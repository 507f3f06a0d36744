"""Per-chip MIL dialects: program version, opset, scalar syntax, surface alignment.

The in-memory ANE compiler does not accept the same text on every chip (docs/ane.md, appendix A.7;
maderix/ANE PR #6 and #35):

* M1/M2 need ``program(1.0)`` with ``func main<ios16>`` and the verbose scalar syntax, where every scalar is
  a rank-0 tensor: ``tensor<string, []>("x")``, ``tensor<bool, []>(true)``; their ANE also rejects ``cast``,
  so all I/O is fp16 and conversion happens on the host.
* M3/M4/M5 take ``program(1.3)`` with ``func main<ios18>`` and the short scalar syntax ``string("x")``.
* M5 wants IOSurfaces aligned to 128 bytes.

No program here uses ``cast`` on any chip: surfaces are fp16 everywhere, which every chip accepts.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class Dialect:
    """How programs for one chip family are written."""

    chip: str
    program_version: str  # the header's program(...) version
    opset: str  # the function's opset: "ios16" or "ios18"
    verbose_scalars: bool  # scalars as rank-0 tensors: tensor<fp16, []>(1.0) instead of fp16(1.0)
    allows_cast: bool  # whether the ANE accepts the cast op (never used by our programs)
    surface_align: int  # IOSurface allocation sizes are rounded up to this many bytes

    @property
    def coreml_target(self) -> str:
        """The coremltools ``ct.target`` attribute name of this opset (``iOS16``/``iOS18``)."""
        return "iOS" + self.opset[3:]


_OLD = dict(program_version="1.0", opset="ios16", verbose_scalars=True, allows_cast=False)
_NEW = dict(program_version="1.3", opset="ios18", verbose_scalars=False, allows_cast=True)

DIALECTS: dict[str, Dialect] = {
    "m1": Dialect("m1", surface_align=64, **_OLD),  # type: ignore[arg-type]
    "m2": Dialect("m2", surface_align=64, **_OLD),  # type: ignore[arg-type]
    "m3": Dialect("m3", surface_align=64, **_NEW),  # type: ignore[arg-type]
    "m4": Dialect("m4", surface_align=64, **_NEW),  # type: ignore[arg-type]
    "m5": Dialect("m5", surface_align=128, **_NEW),  # type: ignore[arg-type]
}

CHIPS = tuple(DIALECTS)


def dialect_for(chip: str) -> Dialect:
    """The dialect of a chip family name (m1..m5); raises :class:`ConfigError` for anything else."""
    try:
        return DIALECTS[chip.lower()]
    except KeyError:
        raise ConfigError(f"unknown chip {chip!r} (known: {', '.join(CHIPS)})") from None
