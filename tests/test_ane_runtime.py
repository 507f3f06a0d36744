"""The macOS runtime, everything about it that can be checked without Apple hardware.

* chip detection from ``sysctl`` brand strings, published peaks, the one-line errors on a machine that is not
  a Mac (the bridge modules import anywhere without touching libobjc);
* the ctypes signature of every selector sent (argument count = colons; BOOL/QoS/NSError** types);
* surfaces: bytes land where the program expects them (row-major fp16 at the start of equal, aligned
  allocations, bound alphabetically);
* the compile budget of the in-process executor;
* the private-API sequence (:mod:`anetrain.ane.runtime.private`) driven against a stand-in for the Objective-C
  runtime
  whose "Neural Engine" reads the files the runtime wrote and executes the request with the simulator, binding
  surfaces by index to the MIL names in alphabetical order as the hardware does: a whole training step through
  it equals the simulator pipeline's.

Nothing here claims the code works on a Mac: that is what ``anetrain ane selfcheck`` is for.
"""

from __future__ import annotations

import ctypes
import hashlib
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from anetrain.ane.machine import (
    NeedsMacError,
    chip_from_brand,
    is_macos,
    machine_info,
    published_peak,
    require_apple_silicon,
)
from anetrain.ane.pipeline import AneSimPipeline
from anetrain.ane.programs import build_kernel_set
from anetrain.ane.runtime import AneRuntimeExecutor, make_executor, make_runtime_pipeline, objc, private
from anetrain.ane.runtime.budget import DEFAULT_COMPILE_BUDGET, compile_budget, needs_fresh_process
from anetrain.ane.runtime.device import AneRuntimeError, ProgramSpec, SimDevice
from anetrain.ane.runtime.iosurface import HostSurface, fill_inputs, surface_properties
from anetrain.ane.sim import SimExecutor, SimProgram
from anetrain.ane.surfaces import Staging, read_outputs
from anetrain.config import make_config
from anetrain.errors import AnetrainError, ConfigError
from anetrain.params import init_params
from anetrain.pipeline.dw import SerialDW
from anetrain.pipeline_factory import PipelineChoice, make_pipeline

CFG = make_config(dim=64, hidden_dim=80, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, seq_len=32)
not_mac = pytest.mark.skipif(is_macos(), reason="checks the behaviour on a machine that is not a Mac")


# ------------------------------------------------------------------------------------------------
# The machine


@pytest.mark.parametrize(
    ("brand", "chip"),
    [
        ("Apple M1", "m1"),
        ("Apple M1 Pro", "m1"),
        ("Apple M2 Max", "m2"),
        ("Apple M3 Ultra", "m3"),
        ("Apple M4 Max", "m4"),
        ("Apple M4 Pro\n", "m4"),
        ("Apple M5", "m5"),
    ],
)
def test_chip_family_from_the_brand_string(brand: str, chip: str) -> None:
    assert chip_from_brand(brand) == chip


@pytest.mark.parametrize(
    "brand", ["Intel(R) Core(TM) i9-9980HK CPU @ 2.40GHz", "Apple M6 Max", "Apple A18 Pro", ""]
)
def test_an_unknown_chip_asks_for_ane_chip(brand: str) -> None:
    with pytest.raises(AnetrainError, match="--ane-chip"):
        chip_from_brand(brand)


def test_the_detected_chip_picks_the_dialect(monkeypatch: pytest.MonkeyPatch) -> None:
    """On an (emulated) M2 Pro, --ane-chip auto builds program(1.0)/ios16 programs; on an M4 Max
    program(1.3)/ios18; an Intel Mac or an unreadable brand string is a one-line error."""
    from anetrain.ane import machine

    monkeypatch.setattr(machine, "is_macos", lambda: True)
    monkeypatch.setattr(machine.platform, "machine", lambda: "arm64")
    params = init_params(CFG, "llama2c", seed=0)
    window = torch.randint(0, CFG.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    for brand, chip, header in (
        ("Apple M2 Pro", "m2", "program(1.0)"),
        ("Apple M4 Max", "m4", "program(1.3)"),
    ):
        monkeypatch.setattr(machine, "read_brand", lambda b=brand: b)
        info = machine.resolve_chip("auto")
        assert (info.chip, info.brand) == (chip, brand)
        pipe = make_runtime_pipeline(params, chip="auto", executor=AneRuntimeExecutor(SimDevice()))
        pipe.loss(window)
        assert pipe.chip == chip and pipe._compiled[8].kernels["wo_fwd"].mil_text.startswith(header)
        pipe.close()
    monkeypatch.setattr(machine, "read_brand", lambda: None)
    with pytest.raises(AnetrainError, match=r"cannot read the CPU name.*--ane-chip"):
        machine.resolve_chip("auto")
    monkeypatch.setattr(machine.platform, "machine", lambda: "x86_64")
    with pytest.raises(NeedsMacError, match="needs Apple silicon"):
        machine.resolve_chip("auto")


def test_published_peaks_are_labelled_as_published() -> None:
    assert published_peak("m4")[0] == 15.8
    assert published_peak("m1")[0] == 11.0
    value, source = published_peak("m3", ultra=True)
    assert value == 31.6 and "Ultra" in source
    with pytest.raises(AnetrainError, match="unknown chip"):
        published_peak("a17")


@not_mac
def test_on_linux_the_runtime_refuses_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANETRAIN_ANE_RUNTIME", raising=False)
    with pytest.raises(NeedsMacError, match=r"needs macOS on Apple silicon \(this is Linux"):
        require_apple_silicon()
    with pytest.raises(NeedsMacError, match="needs macOS"):
        objc.runtime()
    with pytest.raises(NeedsMacError, match="--backend ane-sim"):
        make_runtime_pipeline(init_params(CFG, "llama2c", seed=0), chip="m4")
    with pytest.raises(NeedsMacError, match="needs macOS"):
        make_pipeline(init_params(CFG, "llama2c", seed=0), PipelineChoice(backend="ane"))
    with pytest.raises(AnetrainError, match="cannot load the Objective-C runtime"):
        objc.ObjCRuntime()  # the bridge itself, bypassing the platform check: a clear error, no crash
    info = machine_info()
    assert info["macos"] is None and info["chip"] is None and info["os"].startswith("Linux")


def test_the_bridge_modules_import_without_touching_libobjc() -> None:
    code = (
        "import ctypes\n"
        "real = ctypes.CDLL\n"
        "def guard(name, *a, **k):\n"
        "    if any(w in str(name) for w in ('objc', 'Foundation', 'IOSurface', 'NeuralEngine')):\n"
        "        raise SystemExit(f'{name} was loaded at import time')\n"
        "    return real(name, *a, **k)\n"
        "ctypes.CDLL = guard\n"
        "import anetrain.ane.runtime, anetrain.ane.runtime.objc, anetrain.ane.runtime.iosurface\n"
        "import anetrain.ane.runtime.private, anetrain.ane.runtime.coreml, anetrain.ane.runtime.supervisor\n"
        "import anetrain.ane.peak, anetrain.ane.bench\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_every_selector_has_a_typed_prototype() -> None:
    for sel, (_, argtypes) in objc.SIGNATURES.items():
        assert sel.count(":") == len(argtypes), sel
        proto = objc.prototype(sel)
        assert proto._argtypes_ == (objc.ID, objc.SEL, *argtypes), sel
    for _, (class_methods, instance_methods) in private.REQUIRED.items():
        for sel in class_methods + instance_methods:
            assert sel in objc.SIGNATURES, sel
    # BOOL-returning methods with an unsigned QoS and an NSError** last, as the framework declares them
    for sel in (
        "compileWithQoS:options:error:",
        "loadWithQoS:options:error:",
        "evaluateWithQoS:options:request:error:",
    ):
        restype, argtypes = objc.SIGNATURES[sel]
        assert restype is ctypes.c_bool and argtypes[0] is ctypes.c_uint32 and argtypes[-1] == objc.ERROR_OUT
    with pytest.raises(AnetrainError, match="no C signature"):
        objc.prototype("performSelector:")


# ------------------------------------------------------------------------------------------------
# Surfaces


def test_iosurface_properties_are_one_row_of_bytes() -> None:
    assert surface_properties(49152) == {
        "kIOSurfaceWidth": 49152,
        "kIOSurfaceHeight": 1,
        "kIOSurfaceBytesPerElement": 1,
        "kIOSurfaceBytesPerRow": 49152,
        "kIOSurfaceAllocSize": 49152,
        "kIOSurfacePixelFormat": 0,
    }
    with pytest.raises(ValueError):
        surface_properties(0)


@pytest.mark.parametrize(("chip", "align"), [("m4", 64), ("m5", 128)])
def test_inputs_land_row_major_at_the_start_of_equal_aligned_surfaces(chip: str, align: int) -> None:
    """ffn_bwd_w13t (separate inputs dh1, dh3, w1, w3): each surface gets exactly its tensor, fp16, element
    (c, w) at byte 2 (c W + w), the rest zero; every surface has the same aligned size; binding order is
    alphabetical whatever order the dict has."""
    program = build_kernel_set(CFG, chip, "separate", seq=20, extras=True, programs="anetrain")[
        "ffn_bwd_w13t"
    ]
    spec = ProgramSpec.of(program)
    assert [t.name for t in spec.inputs] == ["dh1", "dh3", "w1", "w3"]
    alloc = spec.input_alloc_bytes
    assert alloc % align == 0 and alloc >= max(t.nbytes for t in spec.inputs)
    rng = np.random.default_rng(0)
    arrays = {t.name: rng.standard_normal(t.shape).astype(np.float16) for t in reversed(spec.inputs)}
    surfaces = [HostSurface(alloc) for _ in spec.inputs]
    fill_inputs(spec, arrays, surfaces)
    for t, s in zip(spec.inputs, surfaces, strict=True):
        raw = s.contents()
        assert len(raw) == alloc
        _, c, _, w = t.shape
        values = np.frombuffer(raw[: t.nbytes], dtype="<f2").reshape(c, w)
        np.testing.assert_array_equal(values, arrays[t.name].reshape(c, w))
        cc, ww = c - 1, w // 2  # one element by its byte offset
        assert raw[2 * (cc * w + ww) : 2 * (cc * w + ww) + 2] == arrays[t.name][0, cc, 0, ww].tobytes()
        assert raw[t.nbytes :] == bytes(alloc - t.nbytes)
    with pytest.raises(ValueError, match="no data for input"):
        fill_inputs(spec, {"dh1": arrays["dh1"]}, surfaces)
    with pytest.raises(ValueError, match="needs shape"):
        fill_inputs(spec, {**arrays, "w1": arrays["w1"][:, :2]}, surfaces)


def test_packed_program_fills_its_single_surface_and_reads_back() -> None:
    program = build_kernel_set(CFG, "m1", "packed", seq=16, extras=True, programs="anetrain")["wo_fwd"]
    st = Staging(program)
    rng = np.random.default_rng(1)
    st.write("attn", rng.standard_normal((CFG.q_dim, 16)))
    st.write("wo", rng.standard_normal((CFG.dim, CFG.q_dim)) / 8)
    surfaces = [HostSurface(program.input_alloc_bytes)]
    fill_inputs(program, st.arrays, surfaces)
    assert surfaces[0].contents()[: program.inputs[0].nbytes] == st.arrays["x"].astype("<f2").tobytes()
    sim = SimProgram(program.mil_text, program.weights, program.chip)
    outs = [HostSurface(program.output_alloc_bytes)]
    sim.evaluate(surfaces, outs)
    expected = SimExecutor().run(program, st.arrays)
    np.testing.assert_array_equal(read_outputs(program, outs)["out"], expected["out"])


# ------------------------------------------------------------------------------------------------
# Budget and the in-process executor


def test_compile_budget_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANETRAIN_ANE_COMPILE_BUDGET", raising=False)
    assert compile_budget() == DEFAULT_COMPILE_BUDGET == 100
    monkeypatch.setenv("ANETRAIN_ANE_COMPILE_BUDGET", "7")
    assert compile_budget() == 7 and compile_budget(3) == 3
    monkeypatch.setenv("ANETRAIN_ANE_COMPILE_BUDGET", "many")
    with pytest.raises(ConfigError, match="whole number"):
        compile_budget()
    with pytest.raises(ConfigError, match="at least 1"):
        compile_budget(0)
    assert not needs_fresh_process(99, 100) and needs_fresh_process(100, 100)


def test_in_process_executor_compiles_once_and_stops_at_its_budget() -> None:
    ks = build_kernel_set(CFG, "m4", "separate", seq=16, extras=True, programs="anetrain")
    ex = AneRuntimeExecutor(SimDevice(), budget=3)
    rng = np.random.default_rng(0)
    names = ["wo_fwd", "ffn_bwd_w2t", "q_bwd"]
    for _ in range(2):
        for n in names:
            st = Staging(ks[n])
            for op, p in ks[n].in_placements.items():
                st.write(op, rng.standard_normal((p.rows.n, p.cols.n)))
            got = ex.run(ks[n], st.arrays)
            ref = SimExecutor().run(ks[n], st.arrays)
            assert all(np.array_equal(got[k], ref[k]) for k in ref)
    assert (ex.stats.compiles, ex.stats.evals) == (3, 6)
    with pytest.raises(AnetrainError, match="compile budget of 3 programs per process is used up"):
        ex.load(ks["kv_bwd"])
    ex.close()


def test_sim_runtime_pipeline_matches_the_simulator_pipeline() -> None:
    params = init_params(CFG, "llama2c", seed=0)
    window = torch.randint(0, CFG.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    ref = AneSimPipeline(params.clone(), dw=SerialDW())
    pipe = make_runtime_pipeline(params.clone(), chip="auto", runtime="sim")
    assert (pipe.name, pipe.backend, pipe.chip) == ("ane", "ane", "m4")
    assert isinstance(pipe.executor, AneRuntimeExecutor)
    assert pipe.forward_backward(window, 1024.0) == ref.forward_backward(window, 1024.0)
    assert torch.equal(pipe.grads.flat, ref.grads.flat)
    assert pipe.executor.stats.compiles == 10 and pipe.executor.stats.evals == 2 * 2 * 10
    pipe.close()
    ref.close()
    with pytest.raises(ConfigError, match="unknown ANE runtime"):
        make_executor("metal")


# ------------------------------------------------------------------------------------------------
# The private-API sequence against a stand-in Objective-C runtime


class FakeObjC:
    """Just enough of :class:`anetrain.ane.runtime.objc.ObjCRuntime` for :mod:`anetrain.ane.runtime.private`.

    Objects are handles into a table. The "compiler" reads model.mil and the weight files from the temporary
    directory the runtime wrote (as the real one does) and loads them into the simulator; an evaluation binds
    the request's surfaces by index to the MIL inputs/outputs in alphabetical order and runs the simulator on
    them, reporting its status errors (0x1d) through NSError like the framework.
    """

    def __init__(
        self,
        tmp: Path,
        *,
        fail_compile: bool = False,
        fail_load_once: bool = False,
        missing: str | None = None,
    ) -> None:
        self.tmp = tmp
        self.fail_compile = fail_compile
        self.fail_load_once = fail_load_once
        self.missing = missing
        self.objs: dict[int, Any] = {}
        self.sent: list[str] = []
        self.retains = 0
        self.releases = 0
        self.surfaces: dict[int, HostSurface] = {}

    def _new(self, *value: Any) -> int:
        h = len(self.objs) + 1000
        self.objs[h] = value
        return h

    # runtime
    def load_framework(self, path: str, what: str) -> None:
        assert path.endswith("AppleNeuralEngine")

    def cls(self, name: str) -> int:
        return 0 if name == self.missing else self._new("class", name)

    def require_class(self, name: str, where: str) -> int:
        if name == self.missing:
            raise AnetrainError(f"the Objective-C class {name} is missing from {where} on this macOS version")
        return self._new("class", name)

    def responds(self, cls: int, selector: str, class_method: bool) -> bool:
        return selector != self.missing

    def pool(self) -> Any:
        return nullcontext()

    def retain(self, obj: int) -> int:
        self.retains += 1
        return obj

    def release(self, obj: int) -> None:
        if obj:
            self.releases += 1

    def temporary_directory(self) -> str:
        return str(self.tmp)

    # values
    def nsstring(self, s: str) -> int:
        return self._new("str", s)

    def string(self, h: int) -> str:
        return self.objs[h][1]

    def nsdata(self, b: bytes) -> int:
        return self._new("data", bytes(b))

    def nsnumber(self, i: int) -> int:
        return self._new("num", int(i))

    def nsarray(self, items: list[int]) -> int:
        return self._new("array", list(items))

    def nsdict(self, m: dict[Any, int]) -> int:
        return self._new("dict", {(k if isinstance(k, str) else self.objs[k][1]): v for k, v in m.items()})

    def error_text(self, err: int) -> tuple[int, str]:
        return self.objs[err][1], self.objs[err][2]

    def _fail(self, errref: Any, code: int, text: str) -> bool:
        errref._obj.value = self._new("error", code, text)
        return False

    def send(self, r: int, sel: str, *args: Any) -> Any:
        self.sent.append(sel)
        o = self.objs.get(r)
        if sel == "modelWithMILText:weights:optionsPlist:":
            mil, weights, options = args
            assert options is None
            wd = self.objs[weights][1]
            blobs = {}
            for path, entry in wd.items():
                e = self.objs[entry][1]
                assert set(e) == {"offset", "data"} and self.objs[e["offset"]][1] == 0
                blobs[path] = self.objs[e["data"]][1]
            return self._new("desc", self.objs[mil][1].decode(), blobs)
        if sel == "inMemoryModelWithDescriptor:":
            return self._new("model", {"desc": self.objs[args[0]], "sim": None, "loaded": False})
        if sel == "hexStringIdentifier":
            return self.nsstring(hashlib.sha256(o[1]["desc"][1].encode()).hexdigest()[:16])
        if sel == "compileWithQoS:options:error:":
            qos, _, errref = args
            assert qos == 21
            if self.fail_compile:
                return self._fail(errref, 5, "InvalidMILProgram:\n  line 7")
            d = self.tmp / hashlib.sha256(o[1]["desc"][1].encode()).hexdigest()[:16]
            text = (d / "model.mil").read_text()
            weights = {
                f"@model_path/{p.relative_to(d)}": p.read_bytes() for p in (d / "weights").rglob("*.bin")
            }
            assert weights == o[1]["desc"][2]  # the files on disk are the dictionary's blobs
            chip = "m1" if text.startswith("program(1.0)") else "m4"
            o[1]["sim"] = SimProgram(text, weights, chip)
            return True
        if sel == "loadWithQoS:options:error:":
            if self.fail_load_once:
                self.fail_load_once = False
                return self._fail(args[2], 1, "load failed")
            o[1]["loaded"] = True
            return True
        if sel == "objectWithIOSurface:":
            return self._new("iosobj", args[0])
        if sel.startswith("requestWithInputs:"):
            ins, in_idx, outs, out_idx, wbuf, perf, proc = args
            assert wbuf is None and perf is None and self.objs[proc][1] == 0
            return self._new("request", [self.objs[h] for h in (ins, in_idx, outs, out_idx)])
        if sel == "evaluateWithQoS:options:request:error:":
            qos, _, req, errref = args
            assert qos == 21 and o[1]["loaded"]
            ins, in_idx, outs, out_idx = self.objs[req][1]
            assert [self.objs[i][1] for i in in_idx[1]] == list(range(len(ins[1])))
            surf = lambda h: self.surfaces[self.objs[h][1]]  # noqa: E731
            from anetrain.ane.sim import AneStatusError

            try:
                o[1]["sim"].evaluate([surf(h) for h in ins[1]], [surf(h) for h in outs[1]])
            except AneStatusError as e:
                return self._fail(errref, e.status, str(e))
            return True
        if sel == "unloadWithQoS:error:":
            o[1]["loaded"] = False
            return True
        raise AssertionError(f"unexpected selector {sel}")


class FakeSurfaces:
    """IOSurfaceApi stand-in: host memory, registered under a fake IOSurfaceRef."""

    def __init__(self, rt: FakeObjC) -> None:
        self.rt = rt
        self.sizes: list[int] = []

    def create(self, nbytes: int) -> HostSurface:
        s = HostSurface(nbytes)
        s.ref = 10_000 + len(self.rt.surfaces)  # type: ignore[attr-defined]
        self.rt.surfaces[s.ref] = s  # type: ignore[attr-defined]
        self.sizes.append(nbytes)
        return s


def fake_device(tmp: Path, **kw: Any) -> tuple[private.PrivateAneDevice, FakeObjC, FakeSurfaces]:
    rt = FakeObjC(tmp, **kw)
    surfaces = FakeSurfaces(rt)
    return private.PrivateAneDevice(rt=rt, surfaces=surfaces), rt, surfaces  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("chip", "programs", "inputs"),
    [
        ("m4", "original", "packed"),
        ("m1", "original", "packed"),
        ("m4", "anetrain", "separate"),
        ("m1", "anetrain", "packed"),
    ],
)
def test_private_sequence_runs_a_training_step_like_the_simulator(
    tmp_path: Path, chip: str, programs: str, inputs: str
) -> None:
    device, rt, surfaces = fake_device(tmp_path)
    before = private.process_compiles()
    params = init_params(CFG, "llama2c", seed=3)
    window = torch.randint(0, CFG.vocab_size, (2, 17), generator=torch.Generator().manual_seed(3))
    ref = AneSimPipeline(params.clone(), chip=chip, programs=programs, inputs=inputs, dw=SerialDW())
    ex = AneRuntimeExecutor(device)
    pipe = make_runtime_pipeline(
        params.clone(), chip=chip, programs=programs, inputs=inputs, runtime="sim", executor=ex
    )
    assert pipe.forward_backward(window, 512.0) == ref.forward_backward(window, 512.0)
    assert torch.equal(pipe.grads.flat, ref.grads.flat)
    assert private.process_compiles() - before == 10 == ex.stats.compiles
    assert rt.sent.count("compileWithQoS:options:error:") == 10
    assert rt.sent.count("evaluateWithQoS:options:request:error:") == 2 * 2 * 10
    ks = pipe._compiled[16].kernels
    expected = sorted(
        [ks[n].input_alloc_bytes] * len(ks[n].inputs) + [ks[n].output_alloc_bytes] * len(ks[n].outputs)
        for n in ks.programs
    )
    assert sorted(x for sizes in expected for x in sizes) == sorted(surfaces.sizes)
    # one model directory per distinct program (its identifier hashes the text and weights; with MHA the
    # original's woFwd and qBwd are the same program, as on the Mac where the original runs them)
    distinct = {(p.mil_text, tuple(sorted(p.weights.items()))) for p in ks}
    assert len(list(tmp_path.iterdir())) == len(distinct) >= 9
    pipe.close()
    assert list(tmp_path.iterdir()) == []  # released: unloaded, directories removed
    assert rt.sent.count("unloadWithQoS:error:") == 10 and rt.releases == rt.retains


def test_private_failures_are_one_line_errors(tmp_path: Path) -> None:
    program = build_kernel_set(CFG, "m4", "separate", seq=16, extras=True, programs="anetrain")["wo_fwd"]
    device, _, _ = fake_device(tmp_path, fail_compile=True)
    with pytest.raises(
        AneRuntimeError, match=r"ANE compile of wo_fwd failed \(status 0x5\): InvalidMILProgram: line 7"
    ):
        device.load(program)
    assert list(tmp_path.iterdir()) == []
    device, rt, _ = fake_device(tmp_path, fail_load_once=True)  # the original retries a failed load once
    device.load(program).release()
    assert rt.sent.count("loadWithQoS:options:error:") == 2
    with pytest.raises(AnetrainError, match=r"_ANERequest is missing from AppleNeuralEngine\.framework"):
        fake_device(tmp_path, missing="_ANERequest")
    with pytest.raises(AnetrainError, match=r"-\[_ANEInMemoryModel unloadWithQoS:error:\] is missing"):
        fake_device(tmp_path, missing="unloadWithQoS:error:")


def test_programs_with_the_same_text_share_their_directory_until_the_last_is_released(tmp_path: Path) -> None:
    program = build_kernel_set(CFG, "m4", "separate", seq=16, extras=True, programs="anetrain")["q_bwd"]
    a = fake_device(tmp_path)[0].load(program)
    b = fake_device(tmp_path)[0].load(program)
    assert a.tmpdir == b.tmpdir and a.tmpdir is not None and (a.tmpdir / "model.mil").is_file()
    a.release()
    assert (b.tmpdir / "model.mil").is_file()  # type: ignore[operator]
    b.release()
    assert list(tmp_path.iterdir()) == []


def test_a_request_the_hardware_rejects_reports_its_status(tmp_path: Path) -> None:
    """Surfaces of different sizes fail like the ANE (0x1d): the error names the program and the status."""
    program = build_kernel_set(CFG, "m4", "separate", seq=16, extras=True, programs="anetrain")[
        "ffn_bwd_w13t"
    ]
    device, rt, _ = fake_device(tmp_path)
    loaded = device.load(program)
    rt.surfaces[loaded.inputs[0].ref] = HostSurface(loaded.inputs[0].alloc + 64)  # type: ignore[attr-defined]
    with pytest.raises(AneRuntimeError, match=r"ANE evaluation of ffn_bwd_w13t failed \(status 0x1d\)") as e:
        loaded.evaluate()
    assert e.value.status == 0x1D
    loaded.release()
