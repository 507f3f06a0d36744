"""Hugging Face LlamaForCausalLM directories: the RoPE row permutation, round trips, sharded input, bad input,
and (when ``transformers`` is installed) logits parity with transformers' own LlamaForCausalLM."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from anetrain.config import make_config
from anetrain.errors import InputError
from anetrain.formats import detect_format, load_model, save_model
from anetrain.formats.hf import half_to_interleaved, hf_config, hf_tensors, interleaved_to_half
from anetrain.params import ModelParams
from anetrain.reference import ReferenceModel

# GQA, head_dim != dim/n_heads, non-default theta/eps and a residual scale: everything HF can express.
CFG = make_config(
    dim=32,
    hidden_dim=40,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=12,
    vocab_size=50,
    seq_len=16,
    rope_theta=500.0,
    norm_eps=1e-6,
    residual_scale=0.5,
)


def random_params(cfg, seed: int = 0) -> ModelParams:
    g = torch.Generator().manual_seed(seed)
    p = ModelParams.zeros(cfg)
    p.flat.normal_(0.0, 0.1, generator=g)
    p.no_decay.add_(1.0)
    return p


def rope_interleaved(x: torch.Tensor, pos: int, theta: float) -> torch.Tensor:
    """llama2.c: rotate pairs (2i, 2i+1) of each head's vector x [dh]."""
    dh = x.shape[-1]
    ang = pos * theta ** (-torch.arange(0, dh, 2, dtype=torch.float64) / dh)
    a, b = x[0::2], x[1::2]
    out = torch.empty_like(x)
    out[0::2], out[1::2] = a * ang.cos() - b * ang.sin(), b * ang.cos() + a * ang.sin()
    return out


def rope_half(x: torch.Tensor, pos: int, theta: float) -> torch.Tensor:
    """HF: rotate pairs (i, i + dh/2)."""
    dh = x.shape[-1]
    ang = pos * theta ** (-torch.arange(0, dh, 2, dtype=torch.float64) / dh)
    a, b = x[: dh // 2], x[dh // 2 :]
    return torch.cat([a * ang.cos() - b * ang.sin(), b * ang.cos() + a * ang.sin()])


def test_permutation_round_trip_and_meaning():
    g = torch.Generator().manual_seed(0)
    n_heads, dh, d = 3, 8, 5
    w = torch.randn(n_heads * dh, d, generator=g, dtype=torch.float64)
    hw = interleaved_to_half(w, n_heads)
    assert torch.equal(half_to_interleaved(hw, n_heads), w)
    assert not torch.equal(hw, w)
    # row 2i + j of a head moves to row j * dh/2 + i (llama2.c export.py's permutation)
    assert torch.equal(hw[dh + 1 * dh // 2 + 2], w[dh + 2 * 2 + 1])
    # what makes it right: rotating the HF-layout projection half-split equals rotating ours interleaved
    x = torch.randn(d, generator=g, dtype=torch.float64)
    for h in range(n_heads):
        ours = rope_interleaved(w[h * dh : (h + 1) * dh] @ x, pos=5, theta=10000.0)
        theirs = rope_half(hw[h * dh : (h + 1) * dh] @ x, pos=5, theta=10000.0)
        torch.testing.assert_close(interleaved_to_half(ours[:, None], 1)[:, 0], theirs)
        # and dot products (attention scores) between two such vectors agree
        q2 = torch.randn(dh, generator=g, dtype=torch.float64)
        k_ours = rope_interleaved(q2, 3, 10000.0)
        k_theirs = rope_half(interleaved_to_half(q2[:, None], 1)[:, 0], 3, 10000.0)
        torch.testing.assert_close(ours @ k_ours, theirs @ k_theirs)


@pytest.mark.parametrize("tied", [True, False])
def test_round_trip(tmp_path, tied):
    p = random_params(CFG.with_(tied_classifier=tied))
    out = tmp_path / "hf"
    notes = save_model(out, p, "hf")
    assert notes == {"folded_residual_scale": 0.5, "architecture": "LlamaForCausalLM"}
    assert detect_format(out) == "hf"
    cfg_json = json.loads((out / "config.json").read_text())
    assert cfg_json["model_type"] == "llama" and cfg_json["architectures"] == ["LlamaForCausalLM"]
    assert (cfg_json["hidden_size"], cfg_json["head_dim"], cfg_json["num_key_value_heads"]) == (32, 12, 2)
    assert (cfg_json["rope_theta"], cfg_json["rms_norm_eps"], cfg_json["tie_word_embeddings"]) == (
        500.0,
        1e-6,
        tied,
    )
    names = set(load_file(out / "model.safetensors"))
    assert ("lm_head.weight" in names) == (not tied)
    assert "model.layers.1.mlp.gate_proj.weight" in names
    m = load_model(out)
    assert m.format == "hf"
    assert m.cfg == p.cfg.with_(residual_scale=1.0)
    folded = p.clone()
    for layer in folded.layers:
        layer.wo.mul_(0.5)
        layer.w2.mul_(0.5)
    assert torch.equal(m.params.flat, folded.flat)
    # and reading a model.safetensors path reads its directory
    assert torch.equal(load_model(out / "model.safetensors").params.flat, m.params.flat)


def test_sharded_directory(tmp_path):
    p = random_params(CFG.with_(residual_scale=1.0, tied_classifier=False), seed=2)
    tensors = hf_tensors(p)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:5], "model-00002-of-00002.safetensors": names[5:]}
    d = tmp_path / "sharded"
    d.mkdir()
    for fname, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, d / fname, metadata={"format": "pt"})
    weight_map = {k: f for f, keys in shards.items() for k in keys}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (d / "config.json").write_text(json.dumps(hf_config(p.cfg)))
    m = load_model(d)
    assert m.extras["weight_files"] == 2
    assert torch.equal(m.params.flat, p.flat)


def test_half_precision_tensors_are_widened(tmp_path):
    p = random_params(CFG.with_(residual_scale=1.0), seed=3)
    d = tmp_path / "bf16"
    d.mkdir()
    save_file({k: t.to(torch.bfloat16) for k, t in hf_tensors(p).items()}, d / "model.safetensors")
    (d / "config.json").write_text(json.dumps(hf_config(p.cfg)))
    m = load_model(d)
    assert m.params.flat.dtype == torch.float32
    torch.testing.assert_close(m.params.flat, p.flat, rtol=1e-2, atol=1e-3)


# ---- bad input ------------------------------------------------------------------------------------


def _write_dir(tmp_path, config_change=None, tensor_change=None):
    p = random_params(CFG.with_(residual_scale=1.0))
    d = tmp_path / "bad"
    save_model(d, p, "hf")
    if config_change is not None:
        data = json.loads((d / "config.json").read_text())
        config_change(data)
        (d / "config.json").write_text(json.dumps(data))
    if tensor_change is not None:
        tensors = load_file(d / "model.safetensors")
        tensor_change(tensors)
        save_file(tensors, d / "model.safetensors")
    return d


def _set(key, value):
    return lambda data: data.__setitem__(key, value)


@pytest.mark.parametrize(
    ("config_change", "message"),
    [
        (_set("model_type", "mistral"), "model_type is 'mistral'; only 'llama' .* and 'qwen3' can be read"),
        (_set("hidden_size", "32"), "field hidden_size must be a positive integer, got '32'"),
        (_set("num_attention_heads", -4), "field num_attention_heads must be a positive integer"),
        (_set("num_key_value_heads", 3), "inconsistent config .*not divisible by n_kv_heads 3"),
        (_set("rms_norm_eps", "tiny"), "field rms_norm_eps must be a positive number"),
        (_set("hidden_act", "gelu"), "hidden_act 'gelu' is not supported"),
        (_set("attention_bias", True), "attention_bias must be false"),
        (_set("rope_scaling", {"rope_type": "linear", "factor": 2.0}), "rope_scaling .* is not supported"),
        (_set("tie_word_embeddings", "yes"), "tie_word_embeddings must be true or false"),
        (lambda data: data.pop("vocab_size"), "field vocab_size is missing"),
    ],
)
def test_bad_config(tmp_path, config_change, message):
    d = _write_dir(tmp_path, config_change=config_change)
    with pytest.raises(InputError, match=message) as e:
        load_model(d)
    assert str(d / "config.json") in str(e.value)


@pytest.mark.parametrize(
    ("tensor_change", "message"),
    [
        (lambda t: t.pop("model.norm.weight"), "is missing tensor model.norm.weight"),
        (
            lambda t: t.__setitem__("model.norm.weight", torch.ones(31)),
            r"tensor model.norm.weight has shape \(31,\), config.json implies \(32,\)",
        ),
        (
            lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.bias", torch.zeros(48)),
            "unexpected tensor model.layers.0.self_attn.q_proj.bias",
        ),
        (
            lambda t: t["model.layers.1.mlp.up_proj.weight"].__setitem__((0, 0), float("nan")),
            "NaN or infinite weights",
        ),
        (
            lambda t: t.__setitem__("model.norm.weight", torch.ones(32, dtype=torch.int32)),
            "has dtype torch.int32",
        ),
    ],
)
def test_bad_tensors(tmp_path, tensor_change, message):
    d = _write_dir(tmp_path, tensor_change=tensor_change)
    with pytest.raises(InputError, match=message) as e:
        load_model(d)
    assert str(d) in str(e.value)


def test_directory_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(InputError, match=r"is a directory without config\.json"):
        load_model(tmp_path)


def test_damaged_safetensors(tmp_path):
    d = _write_dir(tmp_path)
    (d / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(InputError, match=r"model\.safetensors: cannot be read"):
        load_model(d)


def test_index_cannot_escape_the_directory(tmp_path):
    d = _write_dir(tmp_path)
    (d / "model.safetensors").unlink()
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../x.safetensors"}}))
    with pytest.raises(InputError, match=r"invalid shard '\.\./x\.safetensors'"):
        load_model(d)


# ---- parity with transformers ----------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False])
def test_transformers_gives_the_same_logits(tmp_path, monkeypatch, tied):
    transformers = pytest.importorskip(
        "transformers", reason="transformers is not installed (optional extra 'hf': pip install anetrain[hf])"
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    p = random_params(CFG.with_(tied_classifier=tied), seed=11)
    out = tmp_path / "hf"
    save_model(out, p, "hf")
    model = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32, local_files_only=True)
    model.eval()
    tokens = torch.randint(0, CFG.vocab_size, (2, CFG.seq_len), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        theirs = model(tokens).logits
        ours = ReferenceModel.from_params(p)(tokens)
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) == tied
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
