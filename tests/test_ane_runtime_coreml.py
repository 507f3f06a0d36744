"""The Core ML route: every kernel program converts, saves as an .mlpackage and keeps the MIL names as its
feature names; loading it for prediction is refused off macOS with a clear error. (Skipped without
coremltools, the "coreml" extra.)"""

from __future__ import annotations

import dataclasses
import gc
import logging
from pathlib import Path

import numpy as np
import pytest

from anetrain.ane.machine import NeedsMacError, is_macos
from anetrain.ane.programs import BACKWARD, EXTRAS, FORWARD, build_kernel_set
from anetrain.ane.runtime import AneRuntimeExecutor, make_executor
from anetrain.ane.runtime.coreml import CoreMLDevice, CoreMLProgram, io_names, load_package
from anetrain.ane.sim import SimExecutor
from anetrain.ane.surfaces import Staging
from anetrain.config import make_config
from anetrain.errors import AnetrainError

ct = pytest.importorskip(
    "coremltools", reason="coremltools is not installed (pip install 'anetrain[coreml]')"
)

CFG = make_config(dim=64, hidden_dim=172, n_layers=1, n_heads=8, n_kv_heads=4, vocab_size=96, seq_len=32)


@pytest.fixture(autouse=True)
def _quiet_and_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gc, "collect", lambda *a, **k: 0)  # ct.convert ends with a slow full collection
    logging.getLogger("coremltools").setLevel(logging.ERROR)


def test_every_program_becomes_a_package_with_the_mil_names(tmp_path: Path) -> None:
    ks = build_kernel_set(CFG, "m4", "separate", extras=True, programs="anetrain")
    device = CoreMLDevice(tmp_path / "pkgs")
    for p in ks:
        package, names = device.build(p)
        assert package == tmp_path / "pkgs" / f"{p.name}.mlpackage"
        assert (package / "Manifest.json").is_file()
        assert names == {
            "inputs": {t.name: t.name for t in p.inputs},
            "outputs": {t.name: t.name for t in p.outputs},
        }
        spec = ct.models.MLModel(str(package), skip_model_load=True).get_spec()
        assert [i.name for i in spec.description.input] == [t.name for t in p.inputs]
        assert {o.name: tuple(o.type.multiArrayType.shape) for o in spec.description.output} == {
            t.name: t.shape for t in p.outputs
        }
    assert sorted(x.name for x in (tmp_path / "pkgs").iterdir()) == sorted(
        f"{n}.mlpackage" for n in FORWARD + BACKWARD + EXTRAS
    )
    device.build(ks["wo_fwd"])  # rebuilding replaces the package in place
    assert len(list((tmp_path / "pkgs").iterdir())) == len(ks)


def test_io_names_refuse_a_model_that_does_not_match(tmp_path: Path) -> None:
    ks = build_kernel_set(CFG, "m4", "separate", extras=True, programs="anetrain")
    model = ct.models.MLModel(str(CoreMLDevice(tmp_path).build(ks["wo_fwd"])[0]), skip_model_load=True)
    other = dataclasses.replace(ks["wo_fwd"], inputs=ks["q_bwd"].inputs)
    with pytest.raises(
        AnetrainError, match=r"Core ML inputs \['attn', 'wo'\] do not match the MIL inputs \['dq', 'wq'\]"
    ):
        io_names(other, model)


@pytest.mark.skipif(is_macos(), reason="checks the refusal on a machine that is not a Mac")
def test_prediction_needs_macos(tmp_path: Path) -> None:
    ks = build_kernel_set(CFG, "m1", "separate", extras=True, programs="anetrain")
    device = CoreMLDevice(tmp_path)
    with pytest.raises(NeedsMacError, match=r"Core ML prediction needs macOS \(this is Linux"):
        device.load(ks["ffn_fused"])
    assert (tmp_path / "ffn_fused.mlpackage").is_dir()  # converted and saved before the refusal
    with pytest.raises(NeedsMacError, match="needs macOS"):
        load_package(tmp_path / "ffn_fused.mlpackage")
    assert isinstance(make_executor("coreml"), AneRuntimeExecutor)  # Core ML never needs a worker process


def test_a_loaded_package_is_driven_through_predict(tmp_path: Path) -> None:
    """The handle feeds predict() by feature name and reads outputs back in program shapes (a stand-in model
    that computes with the simulator plays Core ML here)."""
    program = build_kernel_set(CFG, "m4", "separate", seq=16, extras=True, programs="anetrain")[
        "ffn_bwd_w13t"
    ]
    st = Staging(program)
    rng = np.random.default_rng(0)
    for name, p in program.in_placements.items():
        st.write(name, rng.standard_normal((p.rows.n, p.cols.n)))

    class Model:
        def predict(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            assert all(v.dtype == np.float16 for v in feed.values())
            out = SimExecutor().run(program, feed)
            return {k: v.astype(np.float32).reshape(-1) for k, v in out.items()}  # Core ML may hand back fp32

    names = {
        "inputs": {t.name: t.name for t in program.inputs},
        "outputs": {t.name: t.name for t in program.outputs},
    }
    loaded = CoreMLProgram(program, Model(), names, tmp_path / "x.mlpackage")
    loaded.write(st.arrays)
    loaded.evaluate()
    got = loaded.read()
    ref = SimExecutor().run(program, st.arrays)
    assert got["dxn2"].dtype == np.float16 and got["dxn2"].shape == program.outputs[0].shape
    np.testing.assert_array_equal(got["dxn2"], ref["dxn2"])
