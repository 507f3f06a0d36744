"""Kernel programs as text: dialects, blobs, padding, layouts, parsing them back, `anetrain ane emit`."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from anetrain.ane.blob import build_blob, read_blob
from anetrain.ane.limits import AneLimitError
from anetrain.ane.mil import MilBuilder, MilBuildError, Op, render_text
from anetrain.ane.milparse import MilError, parse_mil
from anetrain.ane.programs import BACKWARD, EXTRAS, FORWARD, build_kernel_set
from anetrain.cli import main
from anetrain.config import PRESETS, make_config
from anetrain.errors import ConfigError, InputError

GQA = make_config(dim=64, hidden_dim=172, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=96, seq_len=40)
MHA = make_config(dim=64, hidden_dim=96, n_layers=2, n_heads=2, n_kv_heads=2, vocab_size=96, seq_len=32)
ALL = FORWARD + BACKWARD + EXTRAS


# ---- blobs ---------------------------------------------------------------------------------------


def test_blob_header_and_round_trip() -> None:
    values = np.array([[1.0, -2.0, 0.5], [65504.0, 1e-3, 0.0]], dtype=np.float32)
    blob = build_blob(values)
    assert len(blob) == 128 + 2 * 6
    assert blob[0] == 1 and blob[4] == 2 and blob[68] == 1
    assert blob[64:68] == bytes([0xEF, 0xBE, 0xAD, 0xDE])
    assert struct.unpack_from("<I", blob, 72)[0] == 12  # data bytes
    assert struct.unpack_from("<I", blob, 80)[0] == 128  # data offset
    assert blob[128:130] == np.float16(1.0).tobytes()
    assert np.array_equal(read_blob(blob), values.reshape(-1).astype(np.float16))


def test_blob_reader_rejects_damaged_blobs() -> None:
    blob = bytearray(build_blob(np.ones(4)))
    with pytest.raises(InputError, match=r"mask\.bin: weight blob has no DEADBEEF"):
        bad = bytearray(blob)
        bad[64] = 0
        read_blob(bytes(bad), "mask.bin")
    with pytest.raises(InputError, match="header says 8 data bytes"):
        read_blob(bytes(blob[:-2]), "m.bin")
    with pytest.raises(InputError, match="shorter than its 128-byte header"):
        read_blob(bytes(blob[:100]), "m.bin")


# ---- dialects ------------------------------------------------------------------------------------


def test_m4_text_has_the_in_memory_compiler_header() -> None:
    text = build_kernel_set(GQA, "m4", "separate", extras=True, programs="anetrain")["wo_fwd"].mil_text
    lines = text.splitlines()
    assert lines[0] == "program(1.3)"
    assert lines[1] == (
        '[buildInfo = dict<string, string>({{"coremlc-component-MIL", "3510.2.1"}, {"coremlc-version", '
        '"3505.4.1"}, {"coremltools-component-milinternal", ""}, {"coremltools-version", "9.0"}})]'
    )
    assert lines[3].startswith(
        "    func main<ios18>(tensor<fp16, [1, 256, 1, 64]> attn, tensor<fp16, [1, 64, 1, 256]> wo)"
    )
    assert lines[-2] == "    } -> (o);"
    assert 'bool b_false = const()[name = string("b_false"), val = bool(false)];' in text


def test_m1_text_uses_program_1_0_and_verbose_scalars() -> None:
    for p in build_kernel_set(GQA, "m1", "packed", extras=True, programs="anetrain"):
        text = p.mil_text
        assert text.startswith("program(1.0)\n[buildInfo = dict<tensor<string, []>, tensor<string, []>>(")
        assert "func main<ios16>(" in text
        assert "string(" not in text.replace("tensor<string, []>(", "")  # no short scalar syntax anywhere
        assert "cast(" not in text
        assert 'name = tensor<string, []>("out")' in text
    blobbed = build_kernel_set(GQA, "m1", "separate", extras=True, programs="anetrain")["sdpa_fwd"].mil_text
    path = 'tensor<string, []>("@model_path/weights/causal_mask.bin")'
    assert f"BLOBFILE(path = {path}, offset = tensor<uint64, []>(64))" in blobbed


def test_unknown_chip_and_convention_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown chip 'm9'"):
        build_kernel_set(GQA, "m9", "separate", extras=True, programs="anetrain")
    with pytest.raises(ConfigError, match="unknown input convention 'interleaved'"):
        build_kernel_set(GQA, "m4", "interleaved", extras=True, programs="anetrain")


# ---- shapes and padding --------------------------------------------------------------------------


def _matmul_inner_dims(program) -> list[int]:
    dims = []
    shapes = {v.name: v.shape for v in program.graph.inputs}
    shapes.update({n.out.name: n.out.shape for n in program.graph.nodes})
    for n in program.graph.nodes:
        if isinstance(n, Op) and n.op == "matmul":
            args = dict(n.args)
            x = shapes[args["x"].name]
            tx = bool(next(c.value for c in program.graph.nodes if c.out.name == args["transpose_x"].name))
            dims.append(x[-2] if tx else x[-1])
    return dims


@pytest.mark.parametrize("chip", ["m1", "m4"])
def test_stories260K_is_padded_to_the_matmul_rule(chip: str) -> None:
    """head_dim 8 -> 32 and hidden 172 -> 192; every matmul's inner dimension is a multiple of 32."""
    ks = build_kernel_set(PRESETS["stories260K"], chip, "separate", seq=48, extras=True, programs="anetrain")
    assert ks.dims.padding() == {"hidden_dim": [172, 192], "head_dim": [8, 32], "seq": [48, 64]}
    inner = [d for p in ks for d in _matmul_inner_dims(p)]
    assert len(inner) > 30 and all(d % 32 == 0 for d in inner)
    for p in ks:
        assert p.padding == ks.dims.padding()
    sdpa = ks["sdpa_fwd"]
    assert [t.shape for t in sdpa.inputs] == [
        (1, 128, 1, 64),
        (1, 256, 1, 64),
        (1, 128, 1, 64),
        (1, 64, 1, 64),
    ]
    assert sdpa.in_placements["wq"].to_dict()["logical_shape"] == [64, 64]


def test_builder_refuses_a_matmul_the_ane_would_zero() -> None:
    b = MilBuilder()
    x = b.input("x", (1, 1, 8, 16))
    with pytest.raises(MilBuildError, match="inner dimension 8 is not a multiple of 32"):
        b.matmul(x, x, transpose_x=True, transpose_y=False)


# ---- layouts -------------------------------------------------------------------------------------


def test_separate_inputs_are_declared_in_binding_order_with_one_allocation() -> None:
    for chip, align in (("m4", 64), ("m5", 128)):
        for p in build_kernel_set(GQA, chip, "separate", extras=True, programs="anetrain"):
            names = [t.name for t in p.inputs]
            assert names == sorted(names)
            declared = parse_mil(p.mil_text).inputs
            assert [n for n, _ in declared] == names
            assert p.input_alloc_bytes == -(-max(t.nbytes for t in p.inputs) // align) * align
            assert p.output_alloc_bytes % align == 0
    rms = build_kernel_set(GQA, "m5", "separate", extras=True, programs="anetrain")["rmsnorm"]
    assert [t.nbytes for t in rms.inputs] == [128, 8192] and rms.input_alloc_bytes == 8192


def test_packed_layouts_follow_the_original() -> None:
    ks = build_kernel_set(GQA, "m4", "packed", extras=True, programs="anetrain")
    ffn = ks["ffn_fused"]
    assert [t.shape for t in ffn.inputs] == [(1, 64, 1, 2 * 64 + 3 * 192)]  # [xn2 . x2 . W1^T . W3^T . W2]
    pl = {k: (p.w0, p.transposed) for k, p in ffn.in_placements.items()}
    assert pl == {
        "xn2": (0, False),
        "x2": (64, False),
        "w1": (128, True),
        "w3": (320, True),
        "w2": (512, False),
    }
    assert ks["wot_bwd"].in_placements["wo"].transposed is False  # backward: W as stored
    bwd1 = ks["sdpa_bwd1"]  # all activations of one width: stacked along channels
    assert [(p.c0, p.w0) for p in bwd1.in_placements.values()] == [(0, 0), (256, 0), (384, 0), (512, 0)]
    assert [t.name for t in bwd1.outputs] == ["out"]
    assert {k: p.c0 for k, p in bwd1.out_placements.items()} == {"dv": 0, "p": 128, "dp": 128 + 8 * 64}


# ---- the parser ----------------------------------------------------------------------------------


@pytest.mark.parametrize("chip", ["m1", "m4"])
@pytest.mark.parametrize("inputs", ["separate", "packed"])
def test_every_program_parses_back_to_its_graph(chip: str, inputs: str) -> None:
    for p in build_kernel_set(MHA, chip, inputs, extras=True, programs="anetrain"):
        parsed = parse_mil(p.mil_text, p.name)
        assert (parsed.version, parsed.opset) == (p.dialect.program_version, p.dialect.opset)
        assert [(n, t.dims) for n, t in parsed.inputs] == [(t.name, t.shape) for t in p.inputs]
        assert sorted(parsed.outputs) == [t.name for t in p.outputs]
        assert [(s.name, s.op, s.type.dims) for s in parsed.statements] == [
            (n.out.name, n.op if isinstance(n, Op) else "const", n.out.shape) for n in p.graph.nodes
        ]
        consts = {s.name: s.attrs["val"].value for s in parsed.statements if s.op == "const"}
        for n in p.graph.nodes:
            if not isinstance(n, Op) and n.blob is None and n.out.dtype in ("fp16", "int32"):
                assert np.array_equal(
                    np.asarray(consts[n.out.name], np.float64), np.asarray(n.value, np.float64)
                )


def test_fp16_literals_read_back_exactly() -> None:
    b = MilBuilder()
    x = b.input("x", (1, 4, 1, 32))
    vals = [1e-5, 1 / np.sqrt(8), -0.5, 65504.0, 3.0e-7]
    for i, v in enumerate(vals):
        x = b.mul(x, v, name=f"m{i}")
    b.output(x)
    from anetrain.ane.dialect import dialect_for

    parsed = parse_mil(render_text(b.graph(), dialect_for("m4")))
    got = [float(s.attrs["val"].value) for s in parsed.statements if s.op == "const"]
    assert got == [float(np.float16(v)) for v in vals]


@pytest.mark.parametrize(
    "text,message",
    [
        (
            "program(1.3)\n{\n func main<ios18>(tensor<fp16, [1, 2]> x) {\n } -> (y);\n}\n",
            "line 4.*'y' is never defined",
        ),
        (
            "program(1.3)\n{\n func main<ios18>(tensor<fp16, [1, 2]> x) {\n"
            '  tensor<fp16, [1, 2]> y = add(x = x, y = z)[name = string("y")];\n } -> (y);\n}\n',
            "line 4 col .*'z' is used before it is defined",
        ),
        ("program(1.3)\n{\n func main<ios18>(tensor<half, [1]> x) {", "line 3.*unknown dtype 'half'"),
        ("program(1.3)\n{ func main<ios18>(tensor<fp16, [1]> x) { } -> (x); } extra", "text after the end"),
        ("program(1.3)\n{ func main<ios18>(tensor<fp16, [1]> x) { } -> (x); @", "unexpected character '@'"),
    ],
)
def test_parser_errors_name_the_line(text: str, message: str) -> None:
    with pytest.raises(MilError, match=message):
        parse_mil(text, "bad.mil")


# ---- anetrain ane emit ---------------------------------------------------------------------------


def test_emit_writes_programs_blobs_and_manifest(tmp_path, capsys) -> None:
    """anetrain's own programs with separate inputs and the extras (the original's: test_ane_original)."""
    out = tmp_path / "kernels"
    argv = ["ane", "emit", "--model", "stories260K", "--chip", "m3", "--seq", "64", "--out", str(out)]
    rc = main([*argv, "--programs", "anetrain", "--inputs", "separate", "--extras"])
    assert rc == 0
    ks = build_kernel_set(PRESETS["stories260K"], "m3", "separate", seq=64, extras=True, programs="anetrain")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "anetrain-ane-kernels" and manifest["chip"] == "m3"
    assert manifest["programs_set"] == "anetrain" and manifest["inputs"] == "separate"
    assert manifest["padding"] == {"hidden_dim": [172, 192], "head_dim": [8, 32]}
    assert [p["name"] for p in manifest["programs"]] == list(ALL)
    for p in ks:
        assert (out / f"{p.name}.mil").read_text() == p.mil_text
        for path, data in p.weights.items():  # constants with one content per name are shared
            assert (out / "weights" / path.split("/")[-1]).read_bytes() == data
    sdpa = next(p for p in manifest["programs"] if p["name"] == "sdpa_fwd")
    assert sdpa["input_binding_order"] == ["wk", "wq", "wv", "xn"]
    assert sdpa["input_alloc_bytes"] == 256 * 64 * 2 and sdpa["input_surfaces"] == 4
    assert sdpa["program_set"] == "anetrain" and sdpa["convention"] == "separate"
    sizes = (out / "sizes.txt").read_text().splitlines()
    assert sizes[0] == f"sdpa_fwd in={4 * 256 * 64 * 2} out={4 * sdpa['output_alloc_bytes']}"
    assert "wrote 14 programs for stories260K" in capsys.readouterr().out


def test_emit_from_a_config_file_packed(tmp_path) -> None:
    cfg = tmp_path / "tiny.toml"
    cfg.write_text("dim = 64\nhidden_dim = 96\nn_layers = 1\nn_heads = 2\nvocab_size = 64\nseq_len = 32\n")
    argv = ["ane", "emit", "--model", str(cfg), "--programs", "anetrain", "--inputs", "packed"]
    assert main([*argv, "--no-extras", "--out", str(tmp_path / "o")]) == 0  # --no-extras: still accepted
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["inputs"] == "packed" and len(manifest["programs"]) == 10
    assert all(p["input_binding_order"] == ["x"] for p in manifest["programs"])


def test_tensors_beyond_the_hardware_limits_are_refused(tmp_path, capsys) -> None:
    """Limits are errors (one line naming the program, the tensor, the limit and the chip), per limit."""

    def vocab(v: int):  # type: ignore[no-untyped-def]
        return make_config(dim=64, hidden_dim=96, n_layers=1, n_heads=2, vocab_size=v, seq_len=32)

    packed = build_kernel_set(vocab(40000), "m4", "packed", extras=True, programs="anetrain")["classifier"]
    assert packed.inputs[0].shape == (1, 64, 1, 32 + 40000)  # width 40032 fits M3-M5 ...
    with pytest.raises(
        AneLimitError,
        match=r"^ANE program classifier: tensor x \[1, 64, 1, 40032\] has width "
        r"40032, above the limit of 16384 on m1$",
    ):
        build_kernel_set(vocab(40000), "m1", "packed", extras=True, programs="anetrain")  # ... not M1/M2
    with pytest.raises(
        AneLimitError,
        match=r"ANE program classifier: tensor \w+ \[1, 70000, 1, \d+\] has 70000 "
        r"channels, above the limit of 65536 on m4",
    ):
        build_kernel_set(vocab(70000), "m4", "separate", extras=True, programs="anetrain")
    build_kernel_set(vocab(70000), "m4")  # the ten programs without the classifier fit
    cfg = tmp_path / "big.json"
    cfg.write_text(json.dumps({k: v for k, v in vocab(70000).to_dict().items() if k != "name"}))
    out = tmp_path / "o"
    assert main(["ane", "emit", "--model", str(cfg), "--extras", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("anetrain: error: ANE program classifier: tensor ") and "65536 on m4" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()  # refused before anything was written


def test_rank_and_matmul_limits_are_refused() -> None:
    from anetrain.ane.limits import check_limits

    with pytest.raises(
        AneLimitError,
        match=r"^ANE program p: tensor t \[1, 1, 1, 1, 2, 2\] has rank 6, above "
        r"the limit of 5 on m2$",
    ):
        check_limits("p", "m2", "ios16", [("t", (1, 1, 1, 1, 2, 2))])
    check_limits("p", "m2", "ios16", [("t", (1, 1, 1, 2, 2))])  # rank 5 is fine
    with pytest.raises(
        AneLimitError, match=r"^ANE program p: matmul y contracts over 48, not a multiple of 32"
    ):
        check_limits("p", "m4", "ios18", [], [("y", 48)])
    check_limits("p", "m4", "ios18", [("w", (1, 1, 1, 65536)), ("c", (1, 65536, 1, 1))], [("y", 64)])


def test_emit_errors_exit_2(tmp_path, capsys) -> None:
    assert main(["ane", "emit", "--model", "stories9M", "--out", str(tmp_path)]) == 2
    assert "unknown preset 'stories9M'" in capsys.readouterr().err
    assert main(["ane", "emit", "--model", "stories260K", "--seq", "0", "--out", str(tmp_path)]) == 2
    assert "sequence length must be at least 1" in capsys.readouterr().err
    # refused before anything the length sizes is built (it once allocated 1.5 GB of RoPE values first)
    assert main(["ane", "emit", "--model", "stories260K", "--seq", "100000000", "--out", str(tmp_path)]) == 2
    assert "sequence length 100000000 is above 65536" in capsys.readouterr().err
    assert main(["ane"]) == 2
    (tmp_path / "file").write_text("x")
    assert main(["ane", "emit", "--model", "stories260K", "--out", str(tmp_path / "file")]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err
