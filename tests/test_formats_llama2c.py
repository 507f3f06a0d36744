"""llama2.c v0/v1/v2 files: round trips, the real stories260K.bin, Q8_0 error bounds, refusals, bad input."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from anetrain.config import PRESETS, make_config
from anetrain.errors import ConfigError, InputError
from anetrain.formats import detect_format, load_model, save_model
from anetrain.formats.llama2c import rope_tables, v0_file_size
from anetrain.formats.q80 import dequantize_q80, q80_group_size, quantize_q80
from anetrain.params import ModelParams
from anetrain.reference import ReferenceModel
from helpers.data import shared_file

GQA = make_config(dim=16, hidden_dim=24, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32, seq_len=8)


def random_params(cfg, seed: int = 0) -> ModelParams:
    """Every tensor random (norm gains around 1), so that any misplaced tensor shows."""
    g = torch.Generator().manual_seed(seed)
    p = ModelParams.zeros(cfg)
    p.flat.normal_(0.0, 0.1, generator=g)
    p.no_decay.add_(1.0)
    return p


@pytest.mark.parametrize("version", [0, 1])
@pytest.mark.parametrize("tied", [True, False])
def test_fp32_round_trip_is_exact(tmp_path, version, tied):
    p = random_params(GQA.with_(tied_classifier=tied))
    path = tmp_path / "m.bin"
    save_model(path, p, f"llama2c-v{version}")
    m = load_model(path)
    assert m.format == f"llama2c-v{version}"
    assert m.cfg == p.cfg
    assert torch.equal(m.params.flat, p.flat)
    again = tmp_path / "again.bin"
    save_model(again, m.params, f"llama2c-v{version}")
    assert again.read_bytes() == path.read_bytes()


def test_v0_layout_matches_llama2c(tmp_path):
    """Header ints, negative vocab for an untied classifier, RoPE tables before wcls, exact size."""
    p = random_params(GQA.with_(tied_classifier=False))
    path = tmp_path / "m.bin"
    save_model(path, p, "llama2c-v0")
    raw = path.read_bytes()
    assert len(raw) == v0_file_size(p.cfg)
    assert struct.unpack_from("<7i", raw) == (16, 24, 2, 4, 2, -32, 8)
    body = np.frombuffer(raw[28:], dtype="<f4")
    assert np.array_equal(body[: 32 * 16], p.embedding.numpy().ravel())
    assert np.array_equal(body[-32 * 16 :], p["output.weight"].numpy().ravel())
    cos, sin = rope_tables(p.cfg)
    n_tab = 8 * 2  # seq_len x head_dim/2
    tables = body[-32 * 16 - 2 * n_tab : -32 * 16]
    assert np.array_equal(tables, np.concatenate([cos.numpy().ravel(), sin.numpy().ravel()]))
    # freq_sin[pos 1, pair 1] = sin(1 * 10000^(-2/4)); position 0 is cos 1, sin 0
    assert tables[n_tab + 1 * 2 + 1] == pytest.approx(np.sin(10000 ** (-2 / 4)), rel=1e-6)
    assert cos[0].tolist() == [1.0, 1.0] and sin[0].tolist() == [0.0, 0.0]


def test_v1_v2_headers(tmp_path):
    p = random_params(GQA.with_(tied_classifier=False))
    for version in (1, 2):
        path = tmp_path / f"v{version}.bin"
        save_model(path, p, f"llama2c-v{version}")
        raw = path.read_bytes()
        assert raw[:4] == b"\x32\x34\x6b\x61"
        assert struct.unpack_from("<i7iB", raw, 4) == (version, 16, 24, 2, 4, 2, 32, 8, 0)
        if version == 2:
            assert struct.unpack_from("<i", raw, 37)[0] == 16
        # v1: norms come first, straight after the 256-byte header
        if version == 1:
            first = np.frombuffer(raw[256 : 256 + 64], dtype="<f4")
            assert np.array_equal(first, p["layers.0.attention_norm.weight"].numpy())


def test_stories260k_reexport_is_byte_identical(tmp_path):
    src = shared_file("stories260K.bin")
    m = load_model(src)
    assert m.format == "llama2c-v0"
    assert (m.cfg.dim, m.cfg.hidden_dim, m.cfg.n_layers, m.cfg.n_heads, m.cfg.n_kv_heads) == (
        64,
        172,
        5,
        8,
        4,
    )
    assert m.cfg.param_count() == 260_032 and m.cfg.tied_classifier
    out = tmp_path / "re.bin"
    save_model(out, m.params, "llama2c-v0")
    assert out.read_bytes() == src.read_bytes()  # weights and the RoPE tables, bit for bit


def test_v0_size_formula_matches_published_sizes():
    assert v0_file_size(PRESETS["stories15M"]) == 60_816_028
    assert v0_file_size(PRESETS["stories42M"]) == 167_020_572
    assert v0_file_size(PRESETS["stories110M"]) == 438_381_596


# ---- Q8_0 ----------------------------------------------------------------------------------------


def test_q80_group_size_choice():
    assert [q80_group_size(d) for d in (768, 288, 64, 48, 100, 7)] == [64, 32, 64, 16, 4, 1]


def test_v2_quantization_error_within_half_a_step(tmp_path):
    p = random_params(GQA.with_(tied_classifier=False), seed=3)
    p["layers.1.feed_forward.w2.weight"][0].zero_()  # an all-zero group must not give NaN
    path = tmp_path / "q.bin"
    notes = save_model(path, p, "llama2c-v2")
    gs = notes["group_size"]
    m = load_model(path)
    assert m.format == "llama2c-v2" and m.extras["group_size"] == gs == 16
    for name, t in p.named():
        got = m.params[name]
        if t.dim() == 1:  # norms stay fp32
            assert torch.equal(got, t)
            continue
        groups = t.reshape(-1, gs)
        bound = groups.abs().amax(dim=1, keepdim=True) / 127 / 2
        err = (got.reshape(-1, gs) - groups).abs()
        assert bool((err <= bound * (1 + 1e-5) + 1e-12).all()), name
        assert float(err.max()) > 0 or float(groups.abs().max()) == 0
    assert torch.equal(m.params["layers.1.feed_forward.w2.weight"][0], torch.zeros(24))
    assert notes["max_quantization_error"] == pytest.approx(float((m.params.flat - p.flat).abs().max()))


def test_v2_requantization_is_byte_identical(tmp_path):
    p = random_params(GQA, seed=5)
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    save_model(a, p, "llama2c-v2")
    save_model(b, load_model(a).params, "llama2c-v2")
    assert a.read_bytes() == b.read_bytes()


def test_q80_matches_definition():
    w = torch.tensor([0.5, -1.27, 0.0, 0.3, 2.0, 1.0, -1.0, 0.01])
    q, s, err = quantize_q80(w, 4)
    assert s.tolist() == pytest.approx([1.27 / 127, 2.0 / 127])
    assert q.tolist() == [50, -127, 0, 30, 127, 64, -64, 1]  # 63.5 rounds to even 64
    assert torch.allclose(dequantize_q80(q, s, 4), w, atol=float(s.max()) / 2)
    assert err <= float(s.max()) / 2


# ---- residual scale and refusals -------------------------------------------------------------------


def test_residual_scale_is_folded_with_identical_logits(tmp_path):
    cfg = GQA.with_(residual_scale=0.4)
    p = random_params(cfg, seed=7)
    path = tmp_path / "m.bin"
    notes = save_model(path, p, "llama2c-v0")
    assert notes["folded_residual_scale"] == 0.4
    m = load_model(path)
    assert m.cfg.residual_scale == 1.0
    assert torch.equal(m.params["layers.0.attention.wo.weight"], p["layers.0.attention.wo.weight"] * 0.4)
    tokens = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ReferenceModel.from_params(p)(tokens)
        got = ReferenceModel.from_params(m.params)(tokens)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"head_dim": 8}, "llama2.c v{v} cannot store head_dim 8 != dim/n_heads 4"),
        ({"rope_theta": 1e6}, "llama2.c v{v} cannot store rope_theta 1e+06"),
        ({"norm_eps": 1e-6}, "llama2.c v{v} cannot store norm_eps 1e-06"),
    ],
)
@pytest.mark.parametrize("version", [0, 1, 2])
def test_refuses_what_llama2c_cannot_express(tmp_path, change, message, version):
    p = random_params(GQA.with_(**change))
    path = tmp_path / "m.bin"
    with pytest.raises(ConfigError, match=message.format(v=version).replace("+", r"\+")):
        save_model(path, p, f"llama2c-v{version}")
    assert not path.exists() and not list(tmp_path.iterdir())


# ---- bad input ------------------------------------------------------------------------------------


def _corrupt_v0(raw: bytes, case: str) -> bytes:
    if case == "truncated-header":
        return raw[:20]
    if case == "truncated":
        return raw[:-4]
    if case == "zero-dim":
        return struct.pack("<i", 0) + raw[4:]
    if case == "inconsistent-heads":
        return raw[:16] + struct.pack("<i", 3) + raw[20:]  # n_kv_heads 3 does not divide n_heads 4
    if case == "nan":
        b = bytearray(raw)
        b[28 + 40 : 28 + 44] = struct.pack("<f", float("nan"))
        return bytes(b)
    raise AssertionError(case)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("truncated-header", "shorter than the 28-byte llama2.c header"),
        ("truncated", "does not match its llama2.c v0 header"),
        ("zero-dim", "dim must be positive"),
        ("inconsistent-heads", "not divisible by n_kv_heads 3"),
        ("nan", "NaN or infinite weights"),
    ],
)
def test_bad_v0_files(tmp_path, case, message):
    good = tmp_path / "good.bin"
    save_model(good, random_params(GQA), "llama2c-v0")
    bad = tmp_path / f"{case}.bin"
    bad.write_bytes(_corrupt_v0(good.read_bytes(), case))
    with pytest.raises(InputError, match=message) as e:
        load_model(bad)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)


def _corrupt_v12(raw: bytes, case: str) -> bytes:
    b = bytearray(raw)
    if case == "version":
        b[4:8] = struct.pack("<i", 7)
    elif case == "truncated-header":
        return raw[:100]
    elif case == "size":
        return raw + b"\0" * 4
    elif case == "negative-layers":
        b[16:20] = struct.pack("<i", -2)
    elif case == "flag":
        b[36] = 5
    elif case == "group-size":
        b[37:41] = struct.pack("<i", 0)
    elif case == "group-size-divides-not":
        b[37:41] = struct.pack("<i", 1000)
    elif case == "nan-scale":
        b[-4:] = struct.pack("<f", float("inf"))
    return bytes(b)


@pytest.mark.parametrize(
    ("version", "case", "message"),
    [
        (1, "version", "unknown llama2.c format version 7"),
        (1, "truncated-header", "shorter than the 256-byte llama2.c header"),
        (1, "size", "does not match its llama2.c v1 header"),
        (1, "negative-layers", "n_layers must be positive"),
        (1, "flag", "shared-classifier flag is 5"),
        (2, "size", "does not match its llama2.c v2 header"),
        (2, "group-size", "group size 0 must be positive"),
        (2, "group-size-divides-not", "group size 1000 does not divide"),
        (2, "nan-scale", "NaN or infinite Q8_0 scales"),
    ],
)
def test_bad_v1_v2_files(tmp_path, version, case, message):
    good = tmp_path / "good.bin"
    save_model(good, random_params(GQA), f"llama2c-v{version}")
    bad = tmp_path / f"{case}.bin"
    bad.write_bytes(_corrupt_v12(good.read_bytes(), case))
    with pytest.raises(InputError, match=message) as e:
        load_model(bad)
    assert str(bad) in str(e.value)


def test_unrecognized_file_says_what_was_tried(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"hello world, not a model" * 10)
    assert detect_format(junk) == "unknown"
    with pytest.raises(InputError, match=r"not a recognized model file: no BLZT or llama2\.c v1/v2 magic"):
        load_model(junk)
