"""BLZT checkpoints (the original trainer's): v2/v4 round trips with Adam state, size formula, the residual
scale conversion, refusals and bad input."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from anetrain.config import PRESETS, deepnet_alpha, make_config
from anetrain.errors import ConfigError, InputError
from anetrain.formats import load_model, save_model
from anetrain.formats.blzt import HEADER, MAGIC, STATIC_ROPE_NOTE, blzt_file_size
from anetrain.optim import AdamState
from anetrain.params import ModelParams
from anetrain.reference import ReferenceModel

MHA = make_config(dim=16, hidden_dim=24, n_layers=2, n_heads=4, vocab_size=32, seq_len=8)
GQA = make_config(
    dim=16, hidden_dim=24, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=6, vocab_size=32, seq_len=8
)
HEADER_EXTRAS = {
    "step": 1200,
    "total_steps": 5000,
    "lr": 3e-4,
    "loss": 2.25,
    "cum_compile_ms": 1234.5,
    "cum_train_ms": 98765.25,
    "cum_wall_ms": 100000.0,
    "cum_steps": 1200,
    "cum_batches": 120,
}


def random_params(cfg, seed: int = 0) -> ModelParams:
    g = torch.Generator().manual_seed(seed)
    p = ModelParams.zeros(cfg)
    p.flat.normal_(0.0, 0.1, generator=g)
    p.no_decay.add_(1.0)
    return p


def random_adam(p: ModelParams, t: int = 17) -> AdamState:
    g = torch.Generator().manual_seed(99)
    m, v = p.like(), p.like()
    m.flat.normal_(0.0, 1e-3, generator=g)
    v.flat.uniform_(0.0, 1e-6, generator=g)
    return AdamState(m, v, t)


def test_size_formula_matches_the_original():
    assert blzt_file_size(PRESETS["stories110M"]) == 1_314_358_368
    assert blzt_file_size(PRESETS["qwen3-0.6b-shaped"]) == 7_152_513_120


@pytest.mark.parametrize(("version", "cfg"), [(2, MHA), (4, GQA.with_(residual_scale=deepnet_alpha(2)))])
def test_round_trip_with_adam_state(tmp_path, version, cfg):
    p, adam = random_params(cfg), None
    adam = random_adam(p)
    path = tmp_path / "ckpt.bin"
    notes = save_model(path, p, f"blzt-v{version}", optimizer=adam, extras=HEADER_EXTRAS)
    assert "rescaled_wo_w2_by" not in notes  # the model's residual scale is the file's own
    assert path.stat().st_size == blzt_file_size(cfg)
    m = load_model(path)
    assert m.format == f"blzt-v{version}"
    assert m.cfg == cfg
    assert torch.equal(m.params.flat, p.flat)
    assert m.optimizer is not None and m.optimizer.t == 17
    assert torch.equal(m.optimizer.m.flat, adam.m.flat) and torch.equal(m.optimizer.v.flat, adam.v.flat)
    for k, value in HEADER_EXTRAS.items():
        assert m.extras[k] == (pytest.approx(value, rel=1e-7) if k in ("lr", "loss") else value)
    assert m.extras["adam_t"] == 17 and m.extras["blzt_version"] == version
    assert (m.extras.get("rope_note") == STATIC_ROPE_NOTE) == (version == 2)
    again = tmp_path / "again.bin"
    save_model(again, m.params, f"blzt-v{version}", optimizer=m.optimizer, extras=m.extras)
    assert again.read_bytes() == path.read_bytes()


def test_layout_is_per_layer_weights_then_moment_pairs(tmp_path):
    p = random_params(GQA.with_(residual_scale=deepnet_alpha(2)))
    adam = random_adam(p)
    path = tmp_path / "ckpt.bin"
    save_model(path, p, "blzt-v4", optimizer=adam)
    raw = path.read_bytes()
    h = HEADER.unpack_from(raw)
    assert h[0] == MAGIC and raw[:4] == b"TZLB" and h[1] == 4
    assert h[4:10] == (2, 32, 16, 24, 4, 8)  # n_layers, vocab, dim, hidden, heads, seq
    assert h[18:21] == (2, 6, 24)  # kv_heads, head_dim, q_dim
    body = np.frombuffer(raw[96:], dtype="<f4")
    wq = p["layers.0.attention.wq.weight"].numpy().ravel()
    assert np.array_equal(body[: wq.size], wq)
    n_layer = GQA.layer_param_count()
    # after layer 0's nine weights: Wq.m then Wq.v
    assert np.array_equal(
        body[n_layer : n_layer + wq.size], adam.m["layers.0.attention.wq.weight"].numpy().ravel()
    )
    assert np.array_equal(
        body[n_layer + wq.size : n_layer + 2 * wq.size],
        adam.v["layers.0.attention.wq.weight"].numpy().ravel(),
    )
    emb = p.embedding.numpy().ravel()
    assert np.array_equal(body[-3 * emb.size : -2 * emb.size], emb)  # E, E.m, E.v last
    assert np.array_equal(body[-emb.size :], adam.v.embedding.numpy().ravel())


def test_v4_converts_residual_scale_keeping_the_function(tmp_path):
    """A model with residual scale 1 written as v4 (the original runs it with 1/sqrt(2L)): same logits."""
    p = random_params(GQA, seed=4)
    adam = random_adam(p)
    path = tmp_path / "ckpt.bin"
    notes = save_model(path, p, "blzt-v4", optimizer=adam)
    alpha = deepnet_alpha(2)
    c = 1.0 / alpha
    assert notes["rescaled_wo_w2_by"] == pytest.approx(c)
    m = load_model(path)
    assert m.cfg.residual_scale == pytest.approx(alpha)
    tokens = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ReferenceModel.from_params(p)(tokens)
        got = ReferenceModel.from_params(m.params)(tokens)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    name = "layers.1.feed_forward.w2.weight"
    torch.testing.assert_close(m.params[name], p[name] * c)
    torch.testing.assert_close(m.optimizer.m[name], adam.m[name] / c)  # the gradient of c*W is g/c
    torch.testing.assert_close(m.optimizer.v[name], adam.v[name] / c**2)
    assert torch.equal(
        m.optimizer.m["layers.1.feed_forward.w1.weight"], adam.m["layers.1.feed_forward.w1.weight"]
    )


def test_without_optimizer_writes_zero_moments(tmp_path):
    p = random_params(MHA)
    path = tmp_path / "ckpt.bin"
    save_model(path, p, "blzt-v2")
    m = load_model(path)
    assert m.optimizer.t == 0 and not m.optimizer.m.flat.any() and not m.optimizer.v.flat.any()


@pytest.mark.parametrize(
    ("version", "cfg", "message"),
    [
        (2, GQA.with_(head_dim=4), "BLZT v2 cannot store n_kv_heads 2 != n_heads 4"),
        (2, MHA.with_(head_dim=8), "BLZT v2 cannot store head_dim 8 != dim/n_heads 4"),
        (4, GQA.with_(tied_classifier=False), "BLZT v4 cannot store an untied classifier"),
        (2, MHA.with_(tied_classifier=False), "BLZT v2 cannot store an untied classifier"),
        (4, GQA.with_(rope_theta=1e6), "BLZT v4 cannot store rope_theta"),
    ],
)
def test_refusals(tmp_path, version, cfg, message):
    with pytest.raises(ConfigError, match=message):
        save_model(tmp_path / "x.bin", random_params(cfg), f"blzt-v{version}")
    assert not list(tmp_path.iterdir())


def _corrupt(raw: bytes, case: str) -> bytes:
    b = bytearray(raw)
    if case == "truncated-header":
        return raw[:50]
    if case == "truncated":
        return raw[:-8]
    if case == "version":
        b[4:8] = struct.pack("<i", 3)
    elif case == "zero-dim":
        b[24:28] = struct.pack("<i", 0)
    elif case == "q-dim":
        b[92:96] = struct.pack("<i", 25)
    elif case == "inconsistent-heads":
        b[84:88] = struct.pack("<i", 3)
    elif case == "nan":
        b[96:100] = struct.pack("<f", float("nan"))
    elif case == "nan-moment":
        b[-4:] = struct.pack("<f", float("nan"))
    return bytes(b)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("truncated-header", "shorter than the 96-byte BLZT header"),
        ("truncated", "does not match its BLZT v4 header"),
        ("version", "unknown BLZT version 3"),
        ("zero-dim", "dim must be positive"),
        ("q-dim", "q_dim 25 != n_heads 4 \\* head_dim 6"),
        ("inconsistent-heads", "not divisible by n_kv_heads 3"),
        ("nan", "NaN or infinite weights"),
        ("nan-moment", "NaN or infinite Adam second moments"),
    ],
)
def test_bad_files(tmp_path, case, message):
    good = tmp_path / "good.bin"
    save_model(good, random_params(GQA), "blzt-v4", optimizer=random_adam(random_params(GQA)))
    bad = tmp_path / f"{case}.bin"
    bad.write_bytes(_corrupt(good.read_bytes(), case))
    with pytest.raises(InputError, match=message) as e:
        load_model(bad)
    assert str(bad) in str(e.value)


def test_wrong_magic_is_named(tmp_path):
    from anetrain.formats.blzt import read_blzt

    path = tmp_path / "x.bin"
    path.write_bytes(b"\x01\x02\x03\x04" + bytes(200))
    with pytest.raises(InputError, match="not a BLZT checkpoint \\(magic 0x04030201, expected 0x424c5a54\\)"):
        read_blzt(path)
