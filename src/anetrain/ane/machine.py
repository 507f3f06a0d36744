"""Which machine this is: macOS and Apple silicon checks, the chip family, and published ANE peaks.

The MIL dialect depends on the chip family (:mod:`.dialect`), so the runtime needs to know it. On a Mac,
``sysctl -n machdep.cpu.brand_string`` prints strings such as ``Apple M1 Pro``, ``Apple M4 Max`` or
``Apple M3 Ultra``; :func:`chip_from_brand` turns them into ``m1`` .. ``m5``. Anything else (an Intel Mac,
a future chip) is an error that tells the user to pass the family with ``--ane-chip``.

Peak throughput for the utilization figure is **published**, not measured: Apple's rated numbers and the
original trainer's assumptions (docs/ane.md, appendix A.5-A.6). ``anetrain ane peak`` measures the real one.
"""

from __future__ import annotations

import platform
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from ..errors import AnetrainError, ConfigError
from .dialect import CHIPS


class NeedsMacError(AnetrainError):
    """The Neural Engine runtime was asked for on a machine that has none."""


@dataclass(frozen=True)
class ChipInfo:
    """A chip family (``m1`` .. ``m5``) and, when known, the brand string it was read from."""

    chip: str
    brand: str | None = None

    @property
    def ultra(self) -> bool:
        """Ultra parts join two dies: 32 Neural Engine cores instead of 16."""
        return bool(self.brand and "ultra" in self.brand.lower())


# Published FP16 peaks in TFLOPS (docs/ane.md, appendix A.5-A.6). None of them was measured by anetrain.
PUBLISHED_PEAK_TFLOPS: dict[str, tuple[float, str]] = {
    "m1": (11.0, "Apple's rated 11 TOPS for the M1 Neural Engine"),
    "m2": (15.8, "Apple's rated 15.8 TOPS for the M2 Neural Engine"),
    "m3": (15.8, "Apple's rated 15.8 TOPS for the M3 Neural Engine, as the original lists it"),
    "m4": (15.8, "the original trainer's assumed M4 FP16 peak (Apple rates 38 TOPS by its INT8 method)"),
    "m5": (19.0, "the estimate in the original's community results (Apple has not published one)"),
}


def published_peak(chip: str, ultra: bool = False) -> tuple[float, str]:
    """(TFLOPS, where the number comes from) for a chip family; Ultra parts have twice the cores."""
    key = chip.lower()
    if key not in PUBLISHED_PEAK_TFLOPS:
        raise AnetrainError(f"unknown chip {chip!r} (known: {', '.join(CHIPS)})")
    value, source = PUBLISHED_PEAK_TFLOPS[key]
    if ultra:
        return 2 * value, f"2 x {source} (Ultra: two dies, 32 cores)"
    return value, source


_BRAND = re.compile(r"\bApple\s+M(\d+)\b", re.IGNORECASE)


def chip_from_brand(brand: str) -> str:
    """``Apple M1 Pro`` -> ``m1``, ``Apple M4 Max`` -> ``m4``; anything else raises :class:`AnetrainError`."""
    m = _BRAND.search(brand)
    chip = f"m{m.group(1)}" if m else None
    if chip not in CHIPS:
        raise AnetrainError(
            f"cannot tell the Apple silicon family from the CPU name {brand.strip()!r} "
            f"(known: {', '.join(CHIPS)}); give it with --ane-chip (e.g. --ane-chip m4)"
        )
    return chip  # type: ignore[return-value]


def is_macos() -> bool:
    return sys.platform == "darwin"


def is_apple_silicon() -> bool:
    return is_macos() and platform.machine() == "arm64"


def describe_platform() -> str:
    """A few words on this machine, for error messages: ``Linux x86_64``, ``macOS 15.4 arm64``."""
    if is_macos():
        return f"macOS {platform.mac_ver()[0] or '?'} {platform.machine()}"
    return f"{platform.system() or sys.platform} {platform.machine()}"


def require_macos(what: str) -> None:
    """Raise :class:`NeedsMacError` (one line) unless this is macOS."""
    if not is_macos():
        raise NeedsMacError(f"{what} needs macOS (this is {describe_platform()})")


SIM_HINT = "the same programs run anywhere in the simulator: --backend ane-sim"


def require_apple_silicon(what: str = "the Neural Engine runtime", hint: str = SIM_HINT) -> None:
    """Raise :class:`NeedsMacError` (one line) unless this is macOS on Apple silicon."""
    if not is_macos():
        raise NeedsMacError(f"{what} needs macOS on Apple silicon (this is {describe_platform()}); {hint}")
    if platform.machine() != "arm64":
        raise NeedsMacError(
            f"{what} needs Apple silicon (this Mac is {platform.machine()}; an Intel Mac, or Python "
            "running under Rosetta: use an arm64 Python)"
        )


def read_brand() -> str | None:
    """``sysctl -n machdep.cpu.brand_string`` on macOS; None where it cannot be read."""
    if not is_macos():
        return None
    try:
        out = subprocess.run(
            ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def detect_chip() -> ChipInfo:
    """This Mac's chip family, from its brand string."""
    require_apple_silicon("detecting the Apple silicon family")
    brand = read_brand()
    if brand is None:
        raise AnetrainError(
            "cannot read the CPU name (sysctl -n machdep.cpu.brand_string failed); give the chip family "
            "with --ane-chip (e.g. --ane-chip m4)"
        )
    return ChipInfo(chip_from_brand(brand), brand)


def resolve_chip(chip: str) -> ChipInfo:
    """``auto`` -> the detected chip; a family name is checked and taken as given."""
    if chip.lower() == "auto":
        return detect_chip()
    if chip.lower() not in CHIPS:
        raise ConfigError(f"unknown chip {chip!r} (known: auto, {', '.join(CHIPS)})")
    brand = read_brand()
    return ChipInfo(chip.lower(), brand)


DEFAULT_SIM_CHIP = "m4"  # the dialect the simulator uses for --ane-chip auto off a Mac (M3-M5: program(1.3))


def resolve_sim_chip(chip: str) -> tuple[str, str]:
    """(chip, how it was chosen) for programs that run in the simulator.

    ``auto`` means this Mac's chip on Apple silicon and :data:`DEFAULT_SIM_CHIP` anywhere else (the
    simulator has no chip of its own); a family name is taken as given.
    """
    if chip.lower() != "auto":
        return resolve_chip(chip).chip, "given"
    if is_apple_silicon():
        try:
            return detect_chip().chip, "auto: detected on this Mac"
        except AnetrainError:
            pass
    return DEFAULT_SIM_CHIP, (
        f"auto: not an Apple silicon Mac, so {DEFAULT_SIM_CHIP}'s dialect, the M3-M5 one: program(1.3)/ios18"
    )


def machine_info() -> dict[str, Any]:
    """What a bug report needs to say about the machine (works anywhere; Mac fields are None elsewhere)."""
    from .. import __version__

    brand = read_brand()
    chip = None
    if brand:
        try:
            chip = chip_from_brand(brand)
        except AnetrainError:
            chip = None
    return {
        "anetrain": __version__,
        "os": describe_platform(),
        "macos": (platform.mac_ver()[0] or None) if is_macos() else None,
        "machine": platform.machine(),
        "cpu_brand": brand,
        "chip": chip,
        "python": platform.python_version(),
    }
