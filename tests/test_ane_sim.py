"""The simulator's hardware rules: fp16 rounding, surface binding and allocation, matmul rule, dialects."""

from __future__ import annotations

import numpy as np
import pytest

from anetrain.ane.dialect import dialect_for
from anetrain.ane.limits import AneLimitError
from anetrain.ane.mil import MilBuilder, render_text
from anetrain.ane.milparse import MilError
from anetrain.ane.programs import build_kernel_set
from anetrain.ane.sim import STATUS_BAD_REQUEST, AneStatusError, SimExecutor, SimProgram
from anetrain.ane.surfaces import (
    Staging,
    Surface,
    input_surfaces,
    output_surfaces,
    read_operand,
    read_outputs,
)
from anetrain.config import make_config

CFG = make_config(dim=64, hidden_dim=96, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=64, seq_len=32)


def small_program(build, chip: str = "m4") -> SimProgram:
    b = MilBuilder()
    build(b)
    return SimProgram(render_text(b.graph(), dialect_for(chip)), {}, chip)


def test_every_op_result_is_rounded_to_fp16() -> None:
    def build(b: MilBuilder) -> None:
        x = b.input("x", (1, 1, 1, 4))
        b.output(b.add(x, 2.0**-11, name="y"), b.mul(x, 60000.0, name="z"))

    out = small_program(build).run({"x": np.array([1.0, 2.0, -1.0, 0.25])})
    assert out["y"].dtype == np.float16
    # 1 + 2^-11 and 2 + 2^-11 round back (ties to even); below 1 the spacing is 2^-11 so those are exact
    assert out["y"].reshape(-1).tolist() == [1.0, 2.0, -1.0 + 2.0**-11, 0.25 + 2.0**-11]
    assert out["z"].reshape(-1).tolist() == [
        60000.0,
        np.inf,
        -60000.0,
        15000.0,
    ]  # 120000 overflows fp16 to inf


def test_matmul_accumulates_in_fp32_then_rounds_once() -> None:
    """2048 + 32 ones: fp16 accumulation would stick at 2048 (its spacing is 2 there); fp32 gives 2080."""

    def build(b: MilBuilder) -> None:
        x, y = b.input("x", (1, 1, 1, 64)), b.input("y", (1, 1, 64, 1))
        b.output(b.matmul(x, y, name="z"))

    x = np.concatenate([[2048.0], np.ones(32), np.zeros(31)])
    out = small_program(build).run({"x": x, "y": np.ones(64)})
    assert out["z"].item() == 2080.0


def test_a_matmul_with_a_bad_inner_dimension_raises_or_gives_zeros() -> None:
    b = MilBuilder(strict_matmul=False)  # the generator's own builder refuses this; write it anyway
    x = b.input("x", (1, 1, 4, 8))
    b.output(b.matmul(x, x, transpose_y=True, name="z"))
    text = render_text(b.graph(), dialect_for("m4"))
    ones = {"x": np.ones((1, 1, 4, 8))}
    with pytest.raises(
        AneLimitError, match=r"ANE program <mil>: matmul z contracts over 8, not a multiple of 32"
    ):
        SimProgram(text, {}, "m4")  # refused when loaded, before it runs
    out = SimProgram(text, {}, "m4", strict_matmul=False).run(ones)
    assert out["z"].shape == (1, 1, 4, 4) and not out["z"].any()  # what the hardware silently returns


def test_surfaces_bind_alphabetically_and_misordering_gives_wrong_data() -> None:
    ks = build_kernel_set(CFG, "m4", "separate", extras=True, programs="anetrain")
    prog = ks["q_bwd"]  # inputs dq [64, 32] and wq [64, 64]: same allocation, different data
    rng = np.random.default_rng(0)
    dq, wq = rng.standard_normal((32, CFG.q_dim)), rng.standard_normal((CFG.q_dim, 64)) * 0.1
    st = Staging(prog)
    st.write("dq", dq.T)
    st.write("wq", wq)
    sim = SimExecutor().load(prog)
    ins = input_surfaces(prog, st.arrays)
    assert [t.name for t in prog.inputs] == ["dq", "wq"] and len({s.alloc for s in ins}) == 1
    outs = output_surfaces(prog)
    sim.evaluate(ins, outs)
    good = read_operand(prog, read_outputs(prog, outs), "dx")
    assert np.allclose(good.T, dq @ wq, rtol=0, atol=2e-2)
    outs = output_surfaces(prog)
    sim.evaluate(ins[::-1], outs)  # the host bound wq first: the ANE reads it as dq, silently
    wrong = read_operand(prog, read_outputs(prog, outs), "dx")
    assert not np.allclose(wrong, good, atol=1e-1)


def test_unequal_or_small_surfaces_fail_with_status_0x1d() -> None:
    prog = build_kernel_set(CFG, "m5", "separate", extras=True, programs="anetrain")["q_bwd"]
    sim = SimExecutor().load(prog)
    outs = output_surfaces(prog)
    small, big = sorted(t.nbytes for t in prog.inputs)  # dq [64, 32] and wq [64, 64]: 4096 and 8192 bytes
    with pytest.raises(AneStatusError, match="different allocation sizes") as e:
        sim.evaluate([Surface(small), Surface(big)], outs)
    assert e.value.status == STATUS_BAD_REQUEST == 0x1D
    with pytest.raises(AneStatusError, match="not a multiple of 128 bytes"):
        sim.evaluate([Surface(big + 64), Surface(big + 64)], outs)
    with pytest.raises(AneStatusError, match=f"needs {big} bytes, surfaces hold {small}"):
        sim.evaluate([Surface(small), Surface(small)], outs)
    with pytest.raises(AneStatusError, match="1 input surfaces for 2 inputs"):
        sim.evaluate([Surface(big)], outs)
    sim.evaluate([Surface(big + 128), Surface(big + 128)], outs)  # alike, aligned, large enough: accepted


def test_text_for_another_chip_does_not_compile() -> None:
    m4 = build_kernel_set(CFG, "m4", "separate", extras=True, programs="anetrain")["wo_fwd"]
    with pytest.raises(MilError, match=r"program\(1\.3\) with func main<ios18> does not compile on m1"):
        SimProgram(m4.mil_text, m4.weights, "m1")
    hybrid = m4.mil_text.replace("program(1.3)", "program(1.0)").replace("<ios18>", "<ios16>")
    with pytest.raises(MilError, match="short scalar syntax does not compile on m2"):
        SimProgram(hybrid, m4.weights, "m2")
    m1 = build_kernel_set(CFG, "m1", "separate", extras=True, programs="anetrain")["wo_fwd"]
    cast = m1.mil_text.replace(" = reshape(", " = cast(", 1)
    with pytest.raises(MilError, match="the m1 ANE rejects the cast op"):
        SimProgram(cast, m1.weights, "m1")


def test_unsupported_ops_and_wrong_declarations_are_reported_by_line() -> None:
    prog = build_kernel_set(CFG, "m4", "separate", extras=True, programs="anetrain")["ffn_fused"]
    gelu = prog.mil_text.replace("sigmoid(", "gelu(")
    line = next(i for i, s in enumerate(gelu.splitlines(), 1) if "gelu(" in s)
    with pytest.raises(MilError, match=f"line {line}: unsupported op 'gelu'"):
        SimProgram(gelu, prog.weights, "m4", source="ffn_fused")
    lying = prog.mil_text.replace(
        "tensor<fp16, [1, 1, 96, 32]> sigmoid", "tensor<fp16, [1, 1, 32, 96]> sigmoid"
    )
    with pytest.raises(MilError, match=r"sigmoid_\d+ is declared fp16\[1, 1, 32, 96\] but sigmoid computes"):
        SimProgram(lying, prog.weights, "m4").run({t.name: np.zeros(t.shape) for t in prog.inputs})
    sdpa = build_kernel_set(CFG, "m4", "separate", extras=True, programs="anetrain")["sdpa_fwd"]
    with pytest.raises(MilError, match=r"no weight blob '@model_path/weights/rope_cos\.bin'"):
        SimProgram(sdpa.mil_text, {}, "m4")


def test_executor_compiles_each_program_once() -> None:
    ks = build_kernel_set(CFG, "m4", "separate", extras=True, programs="anetrain")
    ex = SimExecutor()
    st = Staging(ks["wo_fwd"])
    for _ in range(3):
        ex.run(ks["wo_fwd"], st.arrays)
    assert (ex.compiles, ex.evals) == (1, 3)


ORIGINAL_STYLE = """program(1.3)
[buildInfo = dict<string, string>({{"coremlc-component-MIL", "3510.2.1"}, {"coremlc-version", "3505.4.1"}})]
{
    func main<ios18>(tensor<fp16, [1, 64, 1, 32]> x) {
        tensor<fp16, [1,64,1,32]> sq = mul(x=x,y=x);
        tensor<int32, [1]> rax = const()[name=string("rax"), val=tensor<int32, [1]>([1])];
        bool kd = const()[name=string("kd"), val=bool(true)];
        tensor<fp16, [1,1,1,32]> ss = reduce_sum(x=sq,axes=rax,keep_dims=kd);
        fp16 invd = const()[name=string("invd"), val=fp16(0x1p-6)];
        tensor<fp16, [1,1,1,32]> ss2 = mul(x=ss,y=invd);
        fp16 eps = const()[name=string("eps"), val=fp16(0.00001)];
        tensor<fp16, [1,1,1,32]> ss3 = add(x=ss2,y=eps);
        fp16 nhalf = const()[name=string("nhalf"), val=fp16(-0.5)];
        tensor<fp16, [1,1,1,32]> rrms = pow(x=ss3,y=nhalf);  // 1/sqrt(mean x^2 + eps)
        tensor<fp16, [1,64,1,32]> out = mul(x=x,y=rrms);
    } -> (out);
}
"""


def test_the_original_trainers_formatting_runs() -> None:
    """Compact arguments, ops without name attributes, hex floats and comments, as in maderix's generators."""
    x = np.random.default_rng(0).standard_normal((1, 64, 1, 32))
    y = SimProgram(ORIGINAL_STYLE, {}, "m4").run({"x": x})["out"]
    ref = x / np.sqrt((x**2).mean(axis=1, keepdims=True) + 1e-5)
    assert np.abs(y - ref).max() < 4e-3
