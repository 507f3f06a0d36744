"""``anetrain ane peak``: the original's conv-chain probes as MIL programs, validated by coremltools here
(timing them needs a Mac); the timing arithmetic with a stand-in device and clock; the CLI off a Mac."""

from __future__ import annotations

import gc
import logging
from pathlib import Path

import numpy as np
import pytest

from anetrain.ane.blob import read_blob
from anetrain.ane.machine import is_macos
from anetrain.ane.peak import (
    INT8_CONFIGS,
    PEAK_CONFIGS,
    ProbeConfig,
    build_probe,
    custom_configs,
    default_configs,
    int8_blob,
    run_probe,
    tflops,
    time_evaluations,
)
from anetrain.cli import main
from anetrain.errors import ConfigError


def test_the_original_tables_and_flop_formula() -> None:
    assert [(c.channels, c.spatial, c.depth) for c in default_configs()] == list(PEAK_CONFIGS)
    assert PEAK_CONFIGS[:5] == tuple((512, 64, d) for d in (32, 48, 64, 96, 128))
    pairs = default_configs(int8=True)
    assert [(c.channels, c.spatial, c.depth, c.int8) for c in pairs[:2]] == [
        (512, 64, 128, False),
        (512, 64, 128, True),
    ]
    assert len(pairs) == 2 * len(INT8_CONFIGS) and all(c.square for c in pairs)
    c = ProbeConfig(512, 64, 128)
    assert c.flops == 2 * 512**2 * 64 * 128
    assert tflops(c, 1.0) == pytest.approx(4.294967296)  # GFLOP / ms
    assert ProbeConfig(512, 64, 128, int8=True, square=True).flops == 2 * 512**2 * 64 * 64 * 128
    assert [(x.depth, x.int8) for x in custom_configs(256, 32, [2, 4], int8=True)] == [
        (2, False),
        (2, True),
        (4, False),
        (4, True),
    ]
    with pytest.raises(ConfigError, match="must be positive"):
        custom_configs(256, 32, [0])


def test_fp16_probe_text_and_blobs() -> None:
    p = build_probe(ProbeConfig(64, 32, 3), "m1")
    text = p.mil_text
    assert text.startswith("program(1.0)") and "func main<ios16>(tensor<fp16, [1, 64, 1, 32]> x)" in text
    assert text.count(" = conv(") == 3 and "cast(" not in text
    assert (
        "-> (c2);" in text
        and 'pad_type_4 = const()[name = tensor<string, []>("pad_type_4"), val = tensor<string, []>("valid")]'
        in text
    )
    assert sorted(p.weights) == [f"@model_path/weights/W{i}.bin" for i in range(3)]  # one blob per matrix
    w = read_blob(p.weights["@model_path/weights/W0.bin"]).reshape(64, 64)
    assert 0.05 < float(w.astype(np.float32).std()) < 0.2  # N(0, 1/C): the chain keeps unit-size activations
    assert p.input_alloc_bytes == p.output_alloc_bytes == 64 * 32 * 2


def test_w8a8_probe_text_and_int8_blobs() -> None:
    p = build_probe(ProbeConfig(64, 16, 2, int8=True, square=True), "m4")
    lines = p.mil_text.splitlines()
    assert lines[0] == "program(1.3)" and "func main<ios18>(tensor<fp16, [1, 64, 16, 16]> x)" in lines[3]
    dq = lines[4]
    assert dq.startswith(
        "        tensor<fp16, [64, 64, 1, 1]> W0 = constexpr_affine_dequantize()[axis = int32(0), "
    )
    assert (
        "quantized_data = tensor<int8, [64, 64, 1, 1]>"
        '(BLOBFILE(path = string("@model_path/weights/W0.bin"), offset = uint64(64)))' in dq
    )
    assert dq.endswith("zero_point = int8(0)];")
    assert sum(" = quantize(" in ln for ln in lines) == 1 and sum(" = dequantize(" in ln for ln in lines) == 1
    assert "tensor<int8, [1, 64, 16, 16]> q0 = quantize(input = c0, output_dtype = " in p.mil_text
    blob = p.weights["@model_path/weights/W1.bin"]
    assert len(blob) == 128 + 64 * 64
    assert (
        blob[0] == 1
        and blob[4] == 2
        and blob[64:68] == b"\xef\xbe\xad\xde"
        and blob[68] == 1
        and blob[74] == 8
    )
    q = np.frombuffer(blob[128:], dtype=np.int8)
    assert q.min() >= -127 and max(-int(q.min()), int(q.max())) == 127  # one scale, the full int8 range
    assert int8_blob(np.array([-1, 2], dtype=np.int8))[128:] == b"\xff\x02"
    with pytest.raises(ConfigError, match="ios17"):
        build_probe(ProbeConfig(64, 16, 2, int8=True, square=True), "m2")


@pytest.mark.parametrize(
    ("config", "chip"),
    [
        (ProbeConfig(64, 32, 3), "m1"),
        (ProbeConfig(128, 32, 2), "m4"),
        (ProbeConfig(64, 16, 3, square=True), "m5"),
        (ProbeConfig(64, 16, 3, int8=True, square=True), "m3"),
    ],
)
def test_probes_validate_and_convert_with_coremltools(config: ProbeConfig, chip: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    ct = pytest.importorskip("coremltools", reason="coremltools is not installed")
    from anetrain.ane.peak import probe_to_coreml

    monkeypatch.setattr(gc, "collect", lambda *a, **k: 0)
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    p = build_probe(config, chip)
    prog, mismatches = probe_to_coreml(p)
    assert mismatches == []
    ops = [op.op_type for op in prog.functions["main"].operations]
    assert ops.count("conv") == config.depth
    if config.int8:
        assert ops.count("constexpr_affine_dequantize") == config.depth
        assert ops.count("quantize") == ops.count("dequantize") == config.depth - 1
    target = getattr(ct.target, p.dialect.coreml_target)
    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=target, skip_model_load=True)
    desc = model.get_spec().description
    assert [(i.name, tuple(i.type.multiArrayType.shape)) for i in desc.input] == [("x", p.inputs[0].shape)]
    assert [o.name for o in desc.output] == [f"c{config.depth - 1}"]


class FakeLoaded:
    def __init__(self, clock: list[float], ms: float) -> None:
        self.clock, self.ms, self.evals, self.written = clock, ms, 0, None

    def write(self, inputs):  # type: ignore[no-untyped-def]
        self.written = inputs

    def evaluate(self) -> None:
        self.evals += 1
        self.clock[0] += self.ms / 1e3

    def release(self) -> None:
        self.released = True


def test_timing_is_ten_warmups_then_fifty_timed_runs() -> None:
    clock = [100.0]
    loaded = FakeLoaded(clock, ms=2.5)
    assert time_evaluations(loaded, clock=lambda: clock[0]) == pytest.approx(2.5)
    assert loaded.evals == 60

    class Device:
        def load(self, probe):  # type: ignore[no-untyped-def]
            self.loaded = FakeLoaded(clock, ms=4.0)
            self.probe = probe
            return self.loaded

    dev = Device()
    cfg = ProbeConfig(64, 32, 4)
    row = run_probe(dev, cfg, "m4", clock=lambda: clock[0])
    assert row["ms"] == pytest.approx(4.0) and row["tflops"] == pytest.approx(cfg.flops / 1e9 / 4.0)
    assert row["error"] is None and dev.loaded.released and dev.loaded.written["x"].shape == (1, 64, 1, 32)
    assert dev.probe.name == "peak_fp16_c64_s32_d4"


def test_peak_cli_emits_anywhere_and_refuses_to_time_off_a_mac(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "probes"
    assert (
        main(
            [
                "ane",
                "peak",
                "--emit",
                str(out),
                "--chip",
                "m4",
                "--int8",
                "--depth",
                "2",
                "--channels",
                "64",
                "--spatial",
                "8",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in out.glob("*.mil")) == [
        "peak_fp16_c64_s8x8_d2.mil",
        "peak_w8a8_c64_s8x8_d2.mil",
    ]
    assert sorted(p.name for p in (out / "peak_w8a8_c64_s8x8_d2" / "weights").iterdir()) == [
        "W0.bin",
        "W1.bin",
    ]
    assert "wrote 2 probe programs for m4" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["ane", "peak", "--depth", "0"])
    assert e.value.code == 2 and "depths must be positive" in capsys.readouterr().err
    if not is_macos():
        assert main(["ane", "peak"]) == 2
        err = capsys.readouterr().err
        assert (
            "anetrain ane peak (it times programs on the Neural Engine) needs macOS on Apple silicon" in err
        )
        assert "--emit" in err and "Traceback" not in err
        assert main(["ane", "peak", "--emit", str(out)]) == 2
        assert "needs the chip family" in capsys.readouterr().err
