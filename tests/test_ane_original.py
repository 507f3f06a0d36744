"""The original trainer's ten Neural Engine programs (anetrain.ane.original), the default program set.

1. Byte for byte: for the original's configuration (stories110M-original: dim 768, hidden 2048, 12 heads,
   seq 256, residual scale 1/sqrt(2L); M3-M5 dialect) every program's MIL text, every constant blob and
   every surface size equals ../shared/data/ane_reference/stories110m/, which holds what the original's
   own generator writes; `anetrain ane emit` writes that directory again.
2. Parametric: any model, sequence length and dialect, with the same op forms; coremltools' type inference
   agrees with every declared type; the M1/M2 form is program(1.0)/ios16 with verbose scalars.
3. Correct: each program, run by the simulator from its text, against anetrain.kernels in float64, with
   the host's part (K/V tiling, group sums, inverse RoPE) as the pipeline does it; and the one place the
   original is wrong (GQA's head mapping) is corrected by exactly the pinned lines docs/ane.md lists.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from anetrain import kernels as K
from anetrain.ane import original
from anetrain.ane.dialect import dialect_for
from anetrain.ane.mil import to_coreml
from anetrain.ane.original import MASK_FILL, ORIGINAL_NAMES, gqa_differences, original_programs, rope_blobs
from anetrain.ane.programs import BACKWARD, FORWARD, build_kernel_set
from anetrain.ane.shapes import Dims
from anetrain.ane.sim import SimExecutor
from anetrain.ane.surfaces import Staging, read_operand
from anetrain.cli import main
from anetrain.config import PRESETS, deepnet_alpha, make_config
from helpers.data import REPO, shared_file

REFERENCE = "ane_reference/stories110m"


def reference_dir() -> Path:
    return shared_file(f"{REFERENCE}/sizes.txt").parent


def reference_sizes() -> dict[str, tuple[int, int]]:
    sizes = {}
    for line in (reference_dir() / "sizes.txt").read_text().splitlines():
        name, i, o = line.split()
        sizes[name] = (int(i.removeprefix("in=")), int(o.removeprefix("out=")))
    return sizes


# ------------------------------------------------------------------------------------------------
# 1. byte for byte


def test_the_ten_programs_equal_the_original_byte_for_byte() -> None:
    ref = reference_dir()
    ks = build_kernel_set(PRESETS["stories110M-original"], "m4")
    assert ks.program_set == "original" and len(ks) == 10
    assert tuple(ORIGINAL_NAMES) == FORWARD + BACKWARD
    assert [p.stem for p in ks] == list(ORIGINAL_NAMES.values())
    sizes = reference_sizes()
    assert list(sizes) == [p.stem for p in ks]  # train.m's order
    for p in ks:
        assert p.mil_text == (ref / f"{p.stem}.mil").read_text(), p.stem
        for path, data in p.weights.items():
            assert data == (ref / "weights" / path.removeprefix("@model_path/weights/")).read_bytes(), path
        # one input and one output surface, of the size train.m allocates
        assert (len(p.inputs), len(p.outputs)) == (1, 1)
        assert (p.input_alloc_bytes, p.output_alloc_bytes) == sizes[p.stem]
        assert (p.inputs[0].nbytes, p.outputs[0].nbytes) == sizes[p.stem]
    used = {path for p in ks for path in p.weights}
    assert {f"@model_path/weights/{f.name}" for f in (ref / "weights").iterdir()} == used


def test_emit_writes_the_reference_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ref = reference_dir()
    out = tmp_path / "kernels"
    assert main(["ane", "emit", "--model", "stories110M-original", "--chip", "m4", "--out", str(out)]) == 0
    want = sorted(str(f.relative_to(ref)) for f in ref.rglob("*") if f.is_file())
    got = sorted(str(f.relative_to(out)) for f in out.rglob("*") if f.is_file())
    assert got == sorted([*want, "manifest.json"])
    for name in want:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["programs_set"] == "original" and manifest["inputs"] == "packed"
    for p in manifest["programs"]:
        assert (p["program_set"], p["convention"], p["input_surfaces"], p["output_surfaces"]) == (
            "original",
            "packed",
            1,
            1,
        )
        assert p["mil"] == f"{p['original_name']}.mil"
    assert "wrote 10 programs for stories110M-original" in capsys.readouterr().out


def test_the_constants_are_built_as_the_original_builds_them() -> None:
    """Mask: 0 on and below the diagonal, -65504 above; RoPE: float32 C (powf, cosf, sinf), then fp16."""
    d = Dims.build(PRESETS["stories110M-original"])
    progs = original_programs(d)
    mask = progs["sdpa_fwd"].graph.blobs["@model_path/weights/mask.bin"].reshape(256, 256)
    assert mask[5, 5] == 0 and mask[5, 4] == 0 and mask[5, 6] == MASK_FILL == -65504.0
    assert (np.triu(np.ones((256, 256)), k=1).astype(bool) == (mask != 0)).all()
    cos, sin = rope_blobs(256, 64, 64, 10000.0)
    assert cos.shape == (1, 1, 256, 64) and (cos[..., 0::2] == cos[..., 1::2]).all()  # each pair twice
    exact = np.cos(np.outer(np.arange(256), 10000.0 ** (-np.arange(0, 64, 2) / 64)))
    assert np.abs(cos[0, 0, :, 0::2].astype(np.float64) - exact).max() < 2e-3  # fp16 of the right angles
    # without a C math library: float64 rounded to float32, within one fp16 step of the C library's
    original._rope_values.cache_clear()
    saved = original._c_math
    try:
        original._c_math = lambda: None  # type: ignore[assignment]
        cos2, sin2 = rope_blobs(256, 64, 64, 10000.0)
    finally:
        original._c_math = saved
        original._rope_values.cache_clear()
    for a, b in ((cos, cos2), (sin, sin2)):
        diff = a.astype(np.float64) != b.astype(np.float64)
        assert diff.sum() <= 0.002 * diff.size
        ulp = np.abs(np.spacing(a[diff].astype(np.float16))).astype(np.float64)
        assert (np.abs(a[diff].astype(np.float64) - b[diff].astype(np.float64)) <= ulp).all()


# ------------------------------------------------------------------------------------------------
# 2. parametric, same op forms, every dialect

CASES = {
    # MHA with head_dim 16 (padded to 32) and seq 24 (padded to 32)
    "mha": dict(dim=64, hidden_dim=80, n_layers=1, n_heads=4, n_kv_heads=4, vocab_size=96, seq_len=24),
    # stories260K's GQA: head_dim 8 (padded to 32), hidden 172 (padded to 192), 8 query heads on 4 kv heads
    "gqa-260K": dict(dim=64, hidden_dim=172, n_layers=1, n_heads=8, n_kv_heads=4, vocab_size=96, seq_len=40),
    # GQA with head_dim 32 != dim/heads and Dq != D (the Qwen3-shaped structure)
    "gqa-hd32": dict(
        dim=64, hidden_dim=128, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=32, vocab_size=96, seq_len=32
    ),
}


def config(case: str):  # type: ignore[no-untyped-def]
    return make_config(**CASES[case], residual_scale="deepnet", name=case)


def op_forms(text: str) -> list[str]:
    """Each statement's op and parameter names, in order (what the text does, not its sizes or names);
    the GQA correction's one extra constant (``cil``) left out."""
    forms = []
    for line in text.splitlines():
        m = re.match(r"\s+.+? (\w+) = (\w+)\((.*?)\)\[name", line)
        if not m or " cil = const()" in line:
            continue
        params, depth, cur = [], 0, ""
        for ch in m.group(3) + ",":
            depth += (ch == "(") - (ch == ")")
            if ch == "," and depth == 0:
                params.append(cur.split("=")[0])
                cur = ""
            else:
                cur += ch
        forms.append(f"{m.group(2)}({','.join(p for p in params if p)})")
    return forms


@pytest.mark.parametrize("chip", ["m1", "m4", "m5"])
@pytest.mark.parametrize("case", list(CASES))
def test_any_model_and_dialect_gets_the_same_op_forms(case: str, chip: str) -> None:
    ks = build_kernel_set(config(case), chip)
    ref = build_kernel_set(PRESETS["stories110M-original"], "m4")
    d = dialect_for(chip)
    for p in ks:
        head = p.mil_text.splitlines()[:4]
        assert head[0] == f"program({d.program_version})" and f"func main<{d.opset}>(" in head[3]
        assert ("tensor<string, []>(" in p.mil_text) == d.verbose_scalars == (chip in ("m1", "m2"))
        assert " cast(" not in p.mil_text
        # the same statements as the reference program (GQA's interleaved tiling: one constant more)
        assert op_forms(p.mil_text) == op_forms(ref[p.name].mil_text), p.name
        assert (" cil = const()" in p.mil_text) == (p.name == "sdpa_fwd" and config(case).gqa_ratio > 1)
        _, mismatches = to_coreml(p.graph, d)  # Apple's type inference recomputes every shape
        assert mismatches == [], mismatches


def test_verbose_dialect_spells_scalars_as_rank_0_tensors() -> None:
    text = build_kernel_set(config("gqa-hd32"), "m2")["sdpa_fwd"].mil_text
    assert text.startswith("program(1.0)\n[buildInfo = dict<tensor<string, []>, tensor<string, []>>(")
    assert (
        'tensor<bool, []> bF = const()[name=tensor<string, []>("bF"), val=tensor<bool, []>(false)];' in text
    )
    assert (
        'tensor<fp16, []> neg1 = const()[name=tensor<string, []>("neg1"), val=tensor<fp16, []>(-1)];' in text
    )
    assert (
        'BLOBFILE(path=tensor<string, []>("@model_path/weights/mask.bin"), offset=tensor<uint64, []>(64))'
        in text
    )


# ------------------------------------------------------------------------------------------------
# 3. what each program computes (simulator, fp16) against anetrain.kernels (float64)

TOL = 1e-3  # relative Frobenius error per output; measured up to 6.3e-4 (attn, stories260K-shaped GQA)
EXECUTOR = SimExecutor()


def run(ks, name: str, **operands: np.ndarray) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    """Stage logical operands (activations token-major [S, C], weights [out, in]), run, return [S, C]."""
    prog = ks[name]
    st = Staging(prog)
    for k, v in operands.items():
        st.write(k, v.T if prog.in_placements[k].cols.name == "seq" else v)
    out = EXECUTOR.run(prog, st.arrays)
    return {k: read_operand(prog, out, k).T for k in prog.out_placements}


def rnd(gen: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    """Values exact in fp16, so the reference sees the ANE's inputs."""
    return (gen.standard_normal(shape) * scale).astype(np.float16).astype(np.float64)


def rel(a: np.ndarray, ref: torch.Tensor | np.ndarray) -> float:
    r = np.asarray(ref, dtype=np.float64)
    return float(np.linalg.norm(np.asarray(a, dtype=np.float64) - r) / np.linalg.norm(r))


def t64(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))


def tile(cfg, kv: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    """[S, Hkv*dh] -> [S, H*dh], head h <- kv head h // R (what the host does before sdpa_bwd1/2)."""
    s = kv.shape[0]
    return np.repeat(kv.reshape(s, cfg.n_kv_heads, cfg.head_dim), cfg.gqa_ratio, axis=1).reshape(s, -1)


@pytest.mark.parametrize("case", list(CASES))
def test_every_program_computes_its_kernel(case: str) -> None:
    cfg = config(case)
    ks = build_kernel_set(cfg, "m4")
    gen = np.random.default_rng(7)
    s, d, f, dq, dkv, h, hkv, dh = (
        cfg.seq_len,
        cfg.dim,
        cfg.hidden_dim,
        cfg.q_dim,
        cfg.kv_dim,
        cfg.n_heads,
        cfg.n_kv_heads,
        cfg.head_dim,
    )
    wq, wk, wv = (
        rnd(gen, dq, d, scale=d**-0.5),
        rnd(gen, dkv, d, scale=d**-0.5),
        rnd(gen, dkv, d, scale=d**-0.5),
    )
    wo, w1, w3, w2 = (
        rnd(gen, d, dq, scale=dq**-0.5),
        rnd(gen, f, d, scale=d**-0.5),
        rnd(gen, f, d, scale=d**-0.5),
        rnd(gen, d, f, scale=f**-0.5),
    )
    errs: dict[str, float] = {}

    def check(got: np.ndarray, want: torch.Tensor | np.ndarray, what: str) -> None:
        errs[what] = rel(got, want)

    # sdpa_fwd: projections, RoPE, causal GQA attention (head h reads kv head h // R)
    xn = rnd(gen, s, d)
    out = run(ks, "sdpa_fwd", xn=xn, wq=wq, wk=wk, wv=wv)
    rope = K.Rope.build(s, dh, cfg.rope_theta, dtype=torch.float64)
    q = K.rope_forward((t64(xn) @ t64(wq).T).view(1, s, h, dh), rope.cos, rope.sin)  # [1, S, H, dh]
    k = K.rope_forward((t64(xn) @ t64(wk).T).view(1, s, hkv, dh), rope.cos, rope.sin)
    v = (t64(xn) @ t64(wv).T).view(1, s, hkv, dh)
    attn, _ = K.causal_attention_forward(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    check(out["attn"], attn.transpose(1, 2).reshape(s, dq), "sdpa_fwd.attn")
    check(out["q_rope"], q.reshape(s, dq), "sdpa_fwd.q_rope")
    check(out["k_rope"], k.reshape(s, dkv), "sdpa_fwd.k_rope")
    check(out["v"], v.reshape(s, dkv), "sdpa_fwd.v")
    assert np.array_equal(out["xn_pass"], xn)  # passed through
    # wo_fwd, ffn_fused (alpha = 1/sqrt(2L) inside, as the original)
    a = rnd(gen, s, dq)
    check(run(ks, "wo_fwd", attn=a, wo=wo)["o"], t64(a) @ t64(wo).T, "wo_fwd.o")
    xn2, x2 = rnd(gen, s, d), rnd(gen, s, d)
    out = run(ks, "ffn_fused", xn2=xn2, x2=x2, w1=w1, w3=w3, w2=w2)
    h1, h3 = t64(xn2) @ t64(w1).T, t64(xn2) @ t64(w3).T
    g = torch.nn.functional.silu(h1) * h3
    check(out["x_next"], t64(x2) + cfg.residual_scale * (g @ t64(w2).T), "ffn_fused.x_next")
    for name, want in (("h1", h1), ("h3", h3), ("g", g)):
        check(out[name], want, f"ffn_fused.{name}")
    # the dx matmuls
    dy, dh1, dh3 = rnd(gen, s, d), rnd(gen, s, f), rnd(gen, s, f)
    check(run(ks, "ffn_bwd_w2t", dffn=dy, w2=w2)["dg"], t64(dy) @ t64(w2), "ffn_bwd_w2t")
    got = run(ks, "ffn_bwd_w13t", dh1=dh1, dh3=dh3, w1=w1, w3=w3)["dxn2"]
    check(got, t64(dh1) @ t64(w1) + t64(dh3) @ t64(w3), "ffn_bwd_w13t")
    check(run(ks, "wot_bwd", do=dy, wo=wo)["dattn"], t64(dy) @ t64(wo), "wot_bwd")
    dqr, dkr, dvr = rnd(gen, s, dq), rnd(gen, s, dkv), rnd(gen, s, dkv)
    check(run(ks, "q_bwd", dq=dqr, wq=wq)["dx"], t64(dqr) @ t64(wq), "q_bwd")
    check(
        run(ks, "kv_bwd", dk=dkr, dv=dvr, wk=wk, wv=wv)["dx"],
        t64(dkr) @ t64(wk) + t64(dvr) @ t64(wv),
        "kv_bwd",
    )
    # the attention backward: the host tiles K, V; the programs; the host sums the groups, un-rotates
    qh, kh, vh = (rnd(gen, s, dq, scale=0.5), rnd(gen, s, dkv, scale=0.5), rnd(gen, s, dkv))
    dout = rnd(gen, s, dq)
    b1 = run(ks, "sdpa_bwd1", q_rope=qh, k_tiled=tile(cfg, kh), v_tiled=tile(cfg, vh), dattn=dout)
    b2 = run(ks, "sdpa_bwd2", p=b1["p"], dp=b1["dp"], q_rope=qh, k_tiled=tile(cfg, kh))
    qt, kt, vt = (t64(a).view(1, s, -1, dh).transpose(1, 2) for a in (qh, kh, vh))
    _, lse = K.causal_attention_forward(qt, kt, vt)
    dq_ref, dk_ref, dv_ref = K.causal_attention_backward(
        t64(dout).view(1, s, h, dh).transpose(1, 2), qt, kt, vt, lse
    )
    group = lambda x: x.reshape(s, hkv, cfg.gqa_ratio, dh).sum(axis=2).reshape(s, -1)  # noqa: E731
    check(b2["dq_rope"], dq_ref.transpose(1, 2).reshape(s, dq), "sdpa_bwd2.dq")
    check(group(b2["dk_full"]), dk_ref.transpose(1, 2).reshape(s, dkv), "sdpa_bwd2.dk (group sum)")
    check(group(b1["dv_full"]), dv_ref.transpose(1, 2).reshape(s, dkv), "sdpa_bwd1.dv (group sum)")
    print(f"{case}: max relative error {max(errs.values()):.2e} ({max(errs, key=errs.__getitem__)})")
    bad = {k: f"{v:.2e}" for k, v in errs.items() if v > TOL}
    assert not bad, bad


def test_the_original_gqa_mapping_is_wrong_and_anetrain_corrects_it() -> None:
    """With the original's tiling (h mod Hkv) attention disagrees with every reference; with anetrain's
    (h // R) it agrees. For MHA the two are the same program."""
    cfg = config("gqa-hd32")
    dims = Dims.build(cfg)
    gen = np.random.default_rng(3)
    s, d = cfg.seq_len, cfg.dim
    xn, wq = rnd(gen, s, d), rnd(gen, cfg.q_dim, d, scale=d**-0.5)
    wk, wv = rnd(gen, cfg.kv_dim, d, scale=d**-0.5), rnd(gen, cfg.kv_dim, d, scale=d**-0.5)
    ours = build_kernel_set(cfg, "m4")
    theirs = build_kernel_set(cfg, "m4")
    faithful = original_programs(dims, faithful_gqa=True)["sdpa_fwd"]
    theirs.programs["sdpa_fwd"].mil_text = faithful.text(dialect_for("m4"))
    good = run(ours, "sdpa_fwd", xn=xn, wq=wq, wk=wk, wv=wv)["attn"]
    wrong = run(theirs, "sdpa_fwd", xn=xn, wq=wq, wk=wk, wv=wv)["attn"]
    dh = cfg.head_dim
    rope = K.Rope.build(s, dh, cfg.rope_theta, dtype=torch.float64)
    q = K.rope_forward((t64(xn) @ t64(wq).T).view(1, s, cfg.n_heads, dh), rope.cos, rope.sin).transpose(1, 2)
    k = K.rope_forward((t64(xn) @ t64(wk).T).view(1, s, cfg.n_kv_heads, dh), rope.cos, rope.sin).transpose(
        1, 2
    )
    v = (t64(xn) @ t64(wv).T).view(1, s, cfg.n_kv_heads, dh).transpose(1, 2)
    ref = K.causal_attention_forward(q, k, v)[0].transpose(1, 2).reshape(s, cfg.q_dim)
    assert rel(good, ref) < TOL and rel(wrong, ref) > 0.3
    assert gqa_differences(Dims.build(config("mha")), dialect_for("m4")) == []


QWEN_DIFF = [
    "-        tensor<fp16, [1,16,256,128]> k_tiled = "
    'concat(axis=cax,interleave=cid,values=(k_rope,k_rope))[name=string("ktile")];',
    "-        tensor<fp16, [1,16,256,128]> v_tiled = "
    'concat(axis=cax,interleave=cid,values=(v,v))[name=string("vtile")];',
    '+        bool cil = const()[name=string("cil"), val=bool(true)];',
    "+        tensor<fp16, [1,16,256,128]> k_tiled = "
    'concat(axis=cax,interleave=cil,values=(k_rope,k_rope))[name=string("ktile")];',
    "+        tensor<fp16, [1,16,256,128]> v_tiled = "
    'concat(axis=cax,interleave=cil,values=(v,v))[name=string("vtile")];',
]


def test_qwen3_shaped_differences_from_the_original_are_exactly_the_pinned_lines() -> None:
    """qwen3-0.6b-shaped at the original's configuration (seq 256, residual scale 1/sqrt(2L)): the only
    lines that differ from what the original's generator writes are the GQA correction's, and docs/ane.md
    lists every one of them."""
    cfg = PRESETS["qwen3-0.6b-shaped"].with_(residual_scale=deepnet_alpha(28))
    dims = Dims.build(cfg, 256)
    assert gqa_differences(dims, dialect_for("m4")) == QWEN_DIFF
    faithful = original_programs(dims, faithful_gqa=True)
    for name, p in original_programs(dims).items():  # every other program: identical
        if name != "sdpa_fwd":
            assert p.text(dialect_for("m4")) == faithful[name].text(dialect_for("m4")), name
    doc = (REPO / "docs" / "ane.md").read_text()
    for line in QWEN_DIFF:
        assert line in doc, f"docs/ane.md does not list: {line}"
