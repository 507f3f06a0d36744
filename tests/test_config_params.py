"""Model configurations (presets, files, validation) and the parameter set (layout, initializations)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from anetrain.config import PRESETS, deepnet_alpha, load_config_file, make_config, preset, resolve_config
from anetrain.errors import ConfigError, InputError
from anetrain.params import ModelParams, fold_residual_scale, init_params, param_specs
from anetrain.reference import ReferenceModel
from anetrain.rng import Drand48


def test_presets_are_named_exactly_and_have_the_published_shapes():
    want = {
        "stories260K": (64, 172, 5, 8, 4, 8, 512, 512),
        "stories15M": (288, 768, 6, 6, 6, 48, 32000, 256),
        "stories42M": (512, 1376, 8, 8, 8, 64, 32000, 1024),
        "stories110M": (768, 2048, 12, 12, 12, 64, 32000, 1024),
        "stories110M-original": (768, 2048, 12, 12, 12, 64, 32000, 256),
        "qwen3-0.6b-shaped": (1024, 3072, 28, 16, 8, 128, 151936, 256),
    }
    assert set(PRESETS) == set(want)
    for name, shape in want.items():
        c = PRESETS[name]
        assert (
            c.dim,
            c.hidden_dim,
            c.n_layers,
            c.n_heads,
            c.n_kv_heads,
            c.head_dim,
            c.vocab_size,
            c.seq_len,
        ) == shape
    # parameter counts from llama2.c's files and the original's banner
    assert PRESETS["stories260K"].param_count() == 260_032
    assert PRESETS["stories15M"].param_count() == 15_191_712
    assert PRESETS["stories110M"].param_count() == 109_529_856
    assert PRESETS["qwen3-0.6b-shaped"].layer_param_count() == 15_730_688


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(n_heads=6, n_kv_heads=4, head_dim=8), "not divisible by n_kv_heads"),
        (dict(head_dim=7), "head_dim must be even"),
        (dict(dim=0), "dim must be positive"),
        (dict(vocab_size=-3), "vocab_size must be positive"),
        (dict(dim=100, n_heads=8, n_kv_heads=8), "not divisible by n_heads"),
        (dict(norm_eps=0.0), "norm_eps must be a positive"),
        (dict(dim=64.5), "must be an integer"),
        (dict(colour="red"), "unknown model config field"),
    ],
)
def test_invalid_configs_are_refused_with_a_clear_message(bad, message):
    base = dict(dim=64, hidden_dim=128, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=100, seq_len=32)
    with pytest.raises(ConfigError, match=message):
        make_config(**{**base, **bad})


def test_config_files_toml_and_json(tmp_path):
    toml = tmp_path / "m.toml"
    toml.write_text(
        "[model]\ndim = 96\nhidden = 256\nlayers = 3\nheads = 6\nkv_heads = 2\nhead_dim = 32\n"
        'vocab = 300\nseq_len = 128\nrope_theta = 500000.0\nresidual_scale = "deepnet"\n'
        "tied_classifier = false\n"
    )
    c = load_config_file(toml)
    assert (c.dim, c.hidden_dim, c.n_layers, c.n_kv_heads, c.head_dim, c.q_dim, c.kv_dim) == (
        96,
        256,
        3,
        2,
        32,
        192,
        64,
    )
    assert c.rope_theta == 5e5 and not c.tied_classifier
    assert c.residual_scale == pytest.approx(1 / math.sqrt(6)) == deepnet_alpha(3)
    js = tmp_path / "m.json"
    js.write_text(
        '{"dim": 32, "hidden_dim": 64, "n_layers": 1, "n_heads": 4, "vocab_size": 10, "seq_len": 8}'
    )
    assert resolve_config(str(js)).n_kv_heads == 4
    bad = tmp_path / "bad.toml"
    bad.write_text(
        "dim = 64\nhidden_dim = 128\nn_layers = 2\nn_heads = 6\nn_kv_heads = 4\nvocab_size = 9\nseq_len = 8\n"
    )
    with pytest.raises(InputError, match=r"bad\.toml: .*not divisible"):
        load_config_file(bad)
    broken = tmp_path / "broken.toml"
    broken.write_text("dim = = 3")
    with pytest.raises(InputError, match="not a valid TOML"):
        load_config_file(broken)
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("stories1B")


def test_flat_layout_names_views_and_decay_groups():
    cfg = make_config(
        dim=32,
        hidden_dim=48,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=50,
        seq_len=16,
        tied_classifier=False,
    )
    p = init_params(cfg)
    assert p.numel() == cfg.param_count() == sum(s.numel for s in param_specs(cfg))
    # every named tensor is a view of the one buffer
    assert all(t.untyped_storage().data_ptr() == p.flat.untyped_storage().data_ptr() for _, t in p.named())
    # norms (no decay) first, then the matrices
    assert p.no_decay.numel() == 2 * 2 * 32 + 32
    assert torch.all(p.no_decay == 1.0)
    names = {n for n, t in p.named() if t.dim() >= 2}
    assert sum(p[n].numel() for n in names) == p.decay.numel()
    # the fused views are the same memory as their parts
    layer = p.layers[1]
    assert layer.qkv.data_ptr() == layer.wq.data_ptr() and layer.qkv.shape == (cfg.q_dim + 2 * cfg.kv_dim, 32)
    assert torch.equal(layer.w13[48:], layer.w3)
    assert p.classifier is p["output.weight"]
    # the state dict is what the reference model (and llama2.c's model.py) calls its parameters
    assert set(p.state_dict()) == {n for n, _ in ReferenceModel(cfg).named_parameters()}


def test_llama2c_init_statistics_and_reproducibility():
    cfg = PRESETS["stories15M"].with_(vocab_size=2000)
    a, b, c = init_params(cfg, seed=1), init_params(cfg, seed=1), init_params(cfg, seed=2)
    assert torch.equal(a.flat, b.flat) and not torch.equal(a.flat, c.flat)
    small = 0.02 / math.sqrt(2 * cfg.n_layers)
    for name, t in a.named():
        if t.dim() < 2:
            assert torch.all(t == 1.0)
        elif name.endswith(("wo.weight", "w3.weight")):  # llama2.c scales wo and w3 (not w2)
            assert float(t.std()) == pytest.approx(small, rel=0.05), name
        else:
            assert float(t.std()) == pytest.approx(0.02, rel=0.05), name


def test_original_init_is_the_drand48_stream_in_the_original_order():
    cfg = make_config(dim=32, hidden_dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=40, seq_len=8)
    p = init_params(cfg, "original", seed=42)
    rng = Drand48(42)  # scalar reference: srand48(42); u = 2*drand48() - 1
    alpha = 1 / math.sqrt(2 * cfg.n_layers)
    first_wq = [(2 * rng.next() - 1) / math.sqrt(32) for _ in range(5)]
    np.testing.assert_allclose(p.layers[0].wq.flatten()[:5].numpy(), np.float32(first_wq), rtol=0, atol=0)
    # Wo of layer 0 comes after Wq, Wk, Wv: skip their draws
    rng = Drand48(42)
    rng.random(cfg.q_dim * 32 + 2 * cfg.kv_dim * 32)
    wo0 = (2 * rng.next() - 1) / math.sqrt(cfg.q_dim) * alpha
    assert float(p.layers[0].wo.flatten()[0]) == np.float32(wo0)
    assert float(p.embedding.abs().max()) <= 0.02
    static = init_params(cfg.with_(n_kv_heads=4), "original-static", seed=42)
    rng = Drand48(42)
    u = [2 * rng.next() - 1 for _ in range(2)]  # Wq[0], Wk[0] are drawn interleaved
    assert float(static.layers[0].wq.flatten()[0]) == np.float32(u[0] / math.sqrt(32))
    assert float(static.layers[0].wk.flatten()[0]) == np.float32(u[1] / math.sqrt(32))


def test_vectorized_drand48_equals_the_scalar_recurrence():
    a, b = Drand48(1234), Drand48(1234)
    block = a.random(10_000)
    scalar = np.array([b.next() for _ in range(10_000)])
    assert np.array_equal(block, scalar)
    assert a.next() == b.next()  # both streams continue from the same state


def test_folding_the_residual_scale_keeps_the_function():
    cfg = make_config(
        dim=32,
        hidden_dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=40,
        seq_len=16,
        residual_scale="deepnet",
    )
    p = init_params(cfg, seed=3).to(torch.float64)
    folded = fold_residual_scale(p)
    assert folded.cfg.residual_scale == 1.0
    tokens = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(0))
    a = ReferenceModel.from_params(p)(tokens)
    b = ReferenceModel.from_params(folded)(tokens)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_model_params_refuses_a_wrong_buffer():
    cfg = PRESETS["stories260K"]
    with pytest.raises(ValueError, match="layout needs"):
        ModelParams(cfg, torch.zeros(10))
