"""System telemetry for the dashboard: the trainer's CPU % and memory (psutil) and power draw.

Power comes from whatever the platform offers without asking for a password, and never blocks for long:
NVIDIA GPUs through pynvml when installed, else ``nvidia-smi`` (with a timeout); macOS through
``sudo -n powermetrics`` (``-n``: fail instead of prompting). Any failure turns the source off for the
session and the dashboard shows n/a. Each call is meant to run on a worker thread.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

import psutil

SUBPROCESS_TIMEOUT_S = 3.0


@dataclass
class ProcessSample:
    cpu_percent: float  # of one core; can exceed 100 with several threads
    rss_mb: float


class ProcessSampler:
    """CPU % and resident memory of one process and its children (the trainer may spawn workers)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._procs: dict[int, psutil.Process] = {}

    def sample(self) -> ProcessSample | None:
        """The usage since the previous call (the first call's CPU % is 0); None once the process is gone."""
        try:
            root = self._procs.get(self.pid) or psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return None
        cpu = rss = 0.0
        alive = {}
        for p in procs:
            p = self._procs.get(p.pid, p)
            try:
                cpu += p.cpu_percent(None)
                rss += p.memory_info().rss
                alive[p.pid] = p
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        self._procs = alive
        if self.pid not in alive:
            return None
        return ProcessSample(cpu_percent=cpu, rss_mb=rss / 2**20)


def run_quietly(cmd: list[str], timeout: float = SUBPROCESS_TIMEOUT_S) -> str | None:
    """stdout of ``cmd`` when it exits 0 within ``timeout``; None on any failure (never prompts)."""
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


_MAC_POWER = re.compile(r"^(CPU|GPU|ANE) Power:\s*([\d.]+)\s*mW", re.MULTILINE)


def parse_powermetrics(text: str) -> dict[str, float]:
    """``{"CPU": W, "GPU": W, "ANE": W}`` from powermetrics' text output (it reports mW)."""
    return {name: float(mw) / 1000.0 for name, mw in _MAC_POWER.findall(text)}


def parse_nvidia_smi(text: str) -> dict[str, float]:
    """``{"GPU": W}`` (summed over GPUs) from ``nvidia-smi --query-gpu=power.draw --format=csv,noheader``."""
    total, seen = 0.0, False
    for line in text.splitlines():
        m = re.match(r"\s*([\d.]+)", line)
        if m:
            total += float(m.group(1))
            seen = True
    return {"GPU": total} if seen else {}


class PowerReader:
    """Reads power in watts by source name; :attr:`available` becomes False after the first failure."""

    def __init__(self, enabled: bool = True) -> None:
        self.available = enabled
        self.source = "none"
        self._read = self._detect() if enabled else None
        if self._read is None:
            self.available = False

    def _detect(self) -> Callable[[], dict[str, float] | None] | None:
        """The first power source that works here (its reader), or None."""
        try:
            import pynvml  # type: ignore[import-not-found]

            pynvml.nvmlInit()
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            if handles:
                self.source = "nvml"
                return lambda: {"GPU": sum(pynvml.nvmlDeviceGetPowerUsage(h) for h in handles) / 1000.0}
        except Exception:  # pynvml absent, or no driver: try the next source
            pass
        if shutil.which("nvidia-smi"):
            self.source = "nvidia-smi"
            cmd = ["nvidia-smi", "--query-gpu=power.draw", "--format=csv,noheader"]
            return lambda: _nonempty(parse_nvidia_smi(run_quietly(cmd) or ""))
        if sys.platform == "darwin" and shutil.which("powermetrics"):
            self.source = "powermetrics"
            cmd = [
                "sudo",
                "-n",
                "powermetrics",
                "-n",
                "1",
                "-i",
                "500",
                "--samplers",
                "cpu_power,gpu_power,ane_power",
            ]
            return lambda: _nonempty(parse_powermetrics(run_quietly(cmd) or ""))
        return None

    def read(self) -> dict[str, float] | None:
        """Watts by source, or None when power is not available here (then it stays off)."""
        if not self.available or self._read is None:
            return None
        try:
            watts = self._read()
        except Exception:
            watts = None
        if not watts:
            self.available = False
            return None
        return watts


def _nonempty(d: dict[str, float]) -> dict[str, float] | None:
    return d or None
