"""The Core ML route, the sanctioned fallback: each program as an ML program run by Core ML on the ANE.

Every kernel program keeps the builder graph its MIL text was rendered from; :func:`convert_program` replays
that graph through coremltools (:func:`.mil.to_coreml`, where Apple's type inference checks it) and converts
it to an ML program for the chip's deployment target. :func:`save_package` writes it as an ``.mlpackage``;
:func:`load_package` loads it with ``compute_units=CPU_AND_NE`` and :class:`CoreMLDevice` runs it with
``predict()``. Input and output feature names are the MIL names (:func:`io_names` checks that), so the
runtime's executors drive it like any other device.

Core ML decides placement itself (small graphs may stay on the CPU whatever the compute units say) and
``predict()`` copies every input, weights included, on each call: slower than the private route, but a
public API (docs/ane.md, appendix A.7). Conversion works on any machine; prediction needs macOS.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import AnetrainError
from ..machine import NeedsMacError, describe_platform, is_macos
from ..mil import to_coreml
from .device import AneRuntimeError

COMPUTE_UNITS = ("CPU_AND_NE", "ALL", "CPU_ONLY", "CPU_AND_GPU")


def _coremltools() -> Any:
    try:
        import coremltools as ct
    except ImportError:
        raise AnetrainError("the Core ML route needs coremltools: pip install 'anetrain[coreml]'") from None
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    return ct


def convert_program(program: Any) -> Any:
    """The program as a coremltools ``MLModel`` (converted, not loaded: works on any machine)."""
    ct = _coremltools()
    if getattr(program, "graph", None) is None:
        raise AnetrainError(f"program {program.name} has no builder graph to convert for Core ML")
    prog, mismatches = to_coreml(program.graph, program.dialect)
    if mismatches:
        raise AnetrainError(f"program {program.name} disagrees with coremltools: {'; '.join(mismatches)}")
    target = getattr(ct.target, program.dialect.coreml_target)
    return ct.convert(
        prog,
        convert_to="mlprogram",
        minimum_deployment_target=target,
        compute_precision=ct.precision.FLOAT16,
        compute_units=ct.ComputeUnit.CPU_AND_NE,
        skip_model_load=True,
    )


def io_names(program: Any, model: Any) -> dict[str, dict[str, str]]:
    """MIL name -> Core ML feature name for every input and output; raises if they do not correspond."""
    desc = model.get_spec().description
    ins = [i.name for i in desc.input]
    outs = [o.name for o in desc.output]
    mapping = {"inputs": {}, "outputs": {}}  # type: dict[str, dict[str, str]]
    for side, names, specs in (("inputs", ins, program.inputs), ("outputs", outs, program.outputs)):
        expected = [t.name for t in specs]
        if sorted(names) != sorted(expected):
            raise AnetrainError(
                f"program {program.name}: Core ML {side} {sorted(names)} "
                f"do not match the MIL {side} {expected}"
            )
        mapping[side] = {n: n for n in expected}
    return mapping


def save_package(model: Any, dest: str | os.PathLike[str]) -> Path:
    """Write ``model`` as the ``.mlpackage`` directory ``dest``, replacing any old one only when complete."""
    out = Path(dest)
    if out.suffix != ".mlpackage":
        raise AnetrainError(f"{out}: a Core ML package must end in .mlpackage")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save(str(tmp / out.name))
        old = out.with_name(f".{out.name}.old")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp / out.name, out)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        raise AnetrainError(f"{out}: cannot write the Core ML package ({e.strerror or e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_package(path: str | os.PathLike[str], compute_units: str = "CPU_AND_NE") -> Any:
    """A saved package loaded for prediction (macOS only)."""
    if not is_macos():
        raise NeedsMacError(
            f"Core ML prediction needs macOS (this is {describe_platform()}); conversion and saving work "
            "anywhere, running the model does not"
        )
    if compute_units not in COMPUTE_UNITS:
        raise AnetrainError(
            f"unknown Core ML compute units {compute_units!r} (known: {', '.join(COMPUTE_UNITS)})"
        )
    ct = _coremltools()
    try:
        return ct.models.MLModel(str(path), compute_units=getattr(ct.ComputeUnit, compute_units))
    except Exception as e:
        raise AneRuntimeError(f"Core ML could not load {path}: {e}") from None


class CoreMLProgram:
    """A loaded package driven through ``predict()``: write stages the feed, evaluate predicts."""

    def __init__(self, program: Any, model: Any, names: dict[str, dict[str, str]], package: Path) -> None:
        self.program = program
        self.model = model
        self.names = names
        self.package = package
        self._feed: dict[str, np.ndarray] = {}
        self._result: dict[str, Any] = {}

    def write(self, inputs: Mapping[str, np.ndarray]) -> None:
        feed = {}
        for t in self.program.inputs:
            if t.name not in inputs:
                raise ValueError(f"program {self.program.name}: no data for input {t.name}")
            feed[self.names["inputs"][t.name]] = np.asarray(inputs[t.name], dtype=np.float16).reshape(t.shape)
        self._feed = feed

    def evaluate(self) -> None:
        try:
            self._result = self.model.predict(self._feed)
        except Exception as e:
            raise AneRuntimeError(f"Core ML prediction of {self.program.name} failed: {e}") from None

    def read(self) -> dict[str, np.ndarray]:
        return {
            t.name: np.asarray(self._result[self.names["outputs"][t.name]], dtype=np.float16).reshape(t.shape)
            for t in self.program.outputs
        }

    def release(self) -> None:
        self.model = None
        with contextlib.suppress(OSError):
            shutil.rmtree(self.package)


class CoreMLDevice:
    """Programs converted, saved under ``directory`` and run by Core ML (``compute_units``, default
    ``CPU_AND_NE``). There is no per-process compile leak on this route."""

    name = "coreml"

    def __init__(
        self, directory: str | os.PathLike[str] | None = None, compute_units: str = "CPU_AND_NE"
    ) -> None:
        if compute_units not in COMPUTE_UNITS:
            raise AnetrainError(
                f"unknown Core ML compute units {compute_units!r} (known: {', '.join(COMPUTE_UNITS)})"
            )
        self._own_dir = directory is None
        self.directory = (
            Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="anetrain-coreml-"))
        )
        self.compute_units = compute_units
        self._compiles = 0

    @property
    def compiles(self) -> int:
        return self._compiles

    def build(self, program: Any) -> tuple[Path, dict[str, dict[str, str]]]:
        """Convert and save ``program``; returns the package path and the feature-name mapping."""
        model = convert_program(program)
        names = io_names(program, model)
        return save_package(model, self.directory / f"{program.name}.mlpackage"), names

    def load(self, program: Any) -> CoreMLProgram:
        package, names = self.build(program)
        loaded = CoreMLProgram(program, load_package(package, self.compute_units), names, package)
        self._compiles += 1
        return loaded

    def close(self) -> None:
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)
