"""The Neural Engine through AppleNeuralEngine.framework's private in-memory model classes (macOS only).

The sequence, per program (docs/ane.md, appendix A.1; the original's ane_runtime.h and ane_bridge.m):

1. ``+[_ANEInMemoryModelDescriptor modelWithMILText:weights:optionsPlist:]`` with the MIL text as NSData and
   the weights as ``{"@model_path/weights/<name>.bin": {"offset": 0, "data": NSData}}`` (``@{}`` when the
   program has none: a nil dictionary makes the compile fail silently);
2. ``+[_ANEInMemoryModel inMemoryModelWithDescriptor:]``;
3. ``model.mil`` and ``weights/*.bin`` written to ``NSTemporaryDirectory()/<hexStringIdentifier>/``;
4. ``-compileWithQoS:21 options:@{} error:``, then ``-loadWithQoS:21 options:@{} error:`` (retried once after
   100 ms, as the original does); one more compile+load pair counts against the process's budget;
5. one IOSurface per input and per output, every input of the program the same allocation size (likewise
   outputs), each wrapped by ``+[_ANEIOSurfaceObject objectWithIOSurface:]``;
6. ``+[_ANERequest requestWithInputs:inputIndices:outputs:outputIndices:weightsBuffer:perfStats:
   procedureIndex:]`` with the surfaces in binding (alphabetical) order and indices 0..n-1;
7. per evaluation ``-evaluateWithQoS:21 options:@{} request:error:``;
8. release: ``-unloadWithQoS:21 error:``, the surfaces, the temporary directory.

Every failure is an :class:`~.device.AneRuntimeError` naming the program, with the NSError's code and text.
None of this has been run on Apple hardware by the anetrain project.
"""

from __future__ import annotations

import ctypes
import shutil
import time
from pathlib import Path
from typing import Any

from ...errors import AnetrainError
from ..mil import BLOB_PREFIX
from .device import AneRuntimeError, SurfaceProgram
from .iosurface import IOSurfaceApi
from .objc import ObjCRuntime, runtime

ANE_FRAMEWORK = "/System/Library/PrivateFrameworks/AppleNeuralEngine.framework/AppleNeuralEngine"
QOS = 21
MODEL_PATH = "@model_path/"
LOAD_RETRY_S = 0.1

#: class -> (class methods, instance methods) the runtime sends; checked when the device starts
REQUIRED: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "_ANEInMemoryModelDescriptor": (("modelWithMILText:weights:optionsPlist:",), ()),
    "_ANEInMemoryModel": (
        ("inMemoryModelWithDescriptor:",),
        (
            "hexStringIdentifier",
            "compileWithQoS:options:error:",
            "loadWithQoS:options:error:",
            "evaluateWithQoS:options:request:error:",
            "unloadWithQoS:error:",
        ),
    ),
    "_ANERequest": (
        ("requestWithInputs:inputIndices:outputs:outputIndices:weightsBuffer:perfStats:procedureIndex:",),
        (),
    ),
    "_ANEIOSurfaceObject": (("objectWithIOSurface:",), ()),
}

_process_compiles = 0  # successful compile+load pairs in this process (the leak is per process)
_dir_users: dict[Path, int] = {}  # programs with the same text share <tmp>/<hexStringIdentifier>/


def process_compiles() -> int:
    return _process_compiles


def _dialect_hint(chip: str) -> str:
    """A hint when the programs' dialect is not this Mac's chip (the usual cause of a rejected program)."""
    from ..machine import chip_from_brand, read_brand

    brand = read_brand()
    try:
        actual = chip_from_brand(brand) if brand else None
    except AnetrainError:
        actual = None
    if actual and actual != chip:
        return f" (the programs are written for {chip} but this Mac is an {brand}: try --ane-chip {actual})"
    return ""


class PrivateAneDevice:
    """Compiles and evaluates programs on the Neural Engine; see the module docstring for the sequence."""

    name = "ane"

    def __init__(self, rt: ObjCRuntime | None = None, surfaces: Any = None) -> None:
        self.rt = rt or runtime()
        self.framework = self.rt.load_framework(ANE_FRAMEWORK, "AppleNeuralEngine.framework (private)")
        where = "AppleNeuralEngine.framework"
        self.classes = {name: self.rt.require_class(name, where) for name in REQUIRED}
        for name, (class_methods, instance_methods) in REQUIRED.items():
            for sel in class_methods:
                if not self.rt.responds(self.classes[name], sel, class_method=True):
                    raise AnetrainError(f"+[{name} {sel}] is missing from {where} on this macOS version")
            for sel in instance_methods:
                if not self.rt.responds(self.classes[name], sel, class_method=False):
                    raise AnetrainError(f"-[{name} {sel}] is missing from {where} on this macOS version")
        self.surfaces = surfaces or IOSurfaceApi(self.rt)
        self.tmp_root = Path(self.rt.temporary_directory())

    @property
    def compiles(self) -> int:
        return _process_compiles

    def load(self, program: Any) -> PrivateProgram:
        return PrivateProgram(self, program)

    def close(self) -> None:
        pass


class PrivateProgram(SurfaceProgram):
    """One compiled and loaded program, its surfaces and its request."""

    def __init__(self, device: PrivateAneDevice, program: Any) -> None:
        global _process_compiles
        rt = self.rt = device.rt
        self.device = device
        self.name = program.name
        self.model = 0
        self.request = 0
        self.loaded = False
        self.tmpdir: Path | None = None
        self.inputs, self.outputs = [], []
        c = device.classes
        try:
            with rt.pool():
                weights = {
                    path: rt.nsdict({"offset": rt.nsnumber(0), "data": rt.nsdata(data)})
                    for path, data in program.weights.items()
                }
                desc = rt.send(
                    c["_ANEInMemoryModelDescriptor"],
                    "modelWithMILText:weights:optionsPlist:",
                    rt.nsdata(program.mil_text.encode("utf-8")),
                    rt.nsdict(weights),
                    None,
                )
                if not desc:
                    raise AneRuntimeError(
                        f"ANE: the MIL text of {self.name} was not accepted (modelWithMILText returned nil)"
                        + _dialect_hint(program.chip)
                    )
                self.model = rt.retain(rt.send(c["_ANEInMemoryModel"], "inMemoryModelWithDescriptor:", desc))
                if not self.model:
                    raise AneRuntimeError(f"ANE: inMemoryModelWithDescriptor returned nil for {self.name}")
                self._write_model_files(program)
                self._call("compileWithQoS:options:error:", "compile", QOS, rt.nsdict({}), hint=program.chip)
                try:
                    self._call("loadWithQoS:options:error:", "load", QOS, rt.nsdict({}))
                except AneRuntimeError:
                    time.sleep(LOAD_RETRY_S)
                    self._call("loadWithQoS:options:error:", "load", QOS, rt.nsdict({}))
            self.loaded = True
            _process_compiles += 1
            SurfaceProgram.__init__(self, program, device.surfaces.create)
            with rt.pool():
                wrap = c["_ANEIOSurfaceObject"]
                ins = [rt.send(wrap, "objectWithIOSurface:", s.ref) for s in self.inputs]
                outs = [rt.send(wrap, "objectWithIOSurface:", s.ref) for s in self.outputs]
                if not all(ins + outs):
                    raise AneRuntimeError(f"ANE: objectWithIOSurface returned nil for {self.name}")
                self.request = rt.retain(
                    rt.send(
                        c["_ANERequest"],
                        "requestWithInputs:inputIndices:outputs:outputIndices:weightsBuffer:perfStats:"
                        "procedureIndex:",
                        rt.nsarray(ins),
                        rt.nsarray([rt.nsnumber(i) for i in range(len(ins))]),
                        rt.nsarray(outs),
                        rt.nsarray([rt.nsnumber(i) for i in range(len(outs))]),
                        None,
                        None,
                        rt.nsnumber(0),
                    )
                )
                if not self.request:
                    raise AneRuntimeError(f"ANE: requestWithInputs returned nil for {self.name}")
        except BaseException:
            self.release()
            raise

    def _write_model_files(self, program: Any) -> None:
        """model.mil and the weight blobs where the compiler looks for them: <tmp>/<hexStringIdentifier>/."""
        hexid = self.rt.string(self.rt.send(self.model, "hexStringIdentifier"))
        if not hexid:
            raise AneRuntimeError(f"ANE: hexStringIdentifier returned nil for {self.name}")
        self.tmpdir = self.device.tmp_root / hexid
        _dir_users[self.tmpdir] = _dir_users.get(self.tmpdir, 0) + 1
        try:
            (self.tmpdir / "weights").mkdir(parents=True, exist_ok=True)
            (self.tmpdir / "model.mil").write_bytes(program.mil_text.encode("utf-8"))
            for path, data in program.weights.items():
                rel = Path(path.removeprefix(MODEL_PATH))
                if not path.startswith(BLOB_PREFIX) or rel.is_absolute() or ".." in rel.parts:
                    raise AneRuntimeError(f"ANE: {self.name} names a weight blob outside its model: {path!r}")
                dest = self.tmpdir / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(data)
        except OSError as e:
            raise AneRuntimeError(f"ANE: cannot write {self.name}'s files to {self.tmpdir} ({e})") from None

    def _call(self, selector: str, what: str, *args: Any, hint: str | None = None) -> None:
        """Send a BOOL-returning ``...error:`` method; failure raises with the NSError's code and text."""
        err = ctypes.c_void_p()
        ok = self.rt.send(self.model, selector, *args, ctypes.byref(err))
        if not ok:
            code, text = self.rt.error_text(err.value)
            status = f" (status 0x{code & 0xFFFFFFFF:x})" if code is not None else ""
            raise AneRuntimeError(
                f"ANE {what} of {self.name} failed{status}: {' '.join(text.split())}"
                + (_dialect_hint(hint) if hint else ""),
                code,
            )

    def evaluate(self) -> None:
        with self.rt.pool():
            self._call(
                "evaluateWithQoS:options:request:error:", "evaluation", QOS, self.rt.nsdict({}), self.request
            )

    def release(self) -> None:
        rt = self.rt
        if self.loaded:
            with rt.pool():
                err = ctypes.c_void_p()
                rt.send(self.model, "unloadWithQoS:error:", QOS, ctypes.byref(err))
            self.loaded = False
        rt.release(self.request)
        rt.release(self.model)
        self.request = self.model = 0
        self.close_surfaces()
        if self.tmpdir is not None:
            _dir_users[self.tmpdir] -= 1
            if not _dir_users[self.tmpdir]:
                del _dir_users[self.tmpdir]
                shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None
