"""Real Hugging Face architectures: tiny random Qwen3 and Llama models made by transformers load into anetrain
and give transformers' logits (float32, 1e-4), export back to the same architecture with the same logits,
sharded and 16-bit checkpoints, Hub ids from the local cache, refusals; and their tokenizer.json files."""

from __future__ import annotations

import json

import pytest
import torch

from anetrain.errors import AnetrainError, InputError
from anetrain.formats import load_model, save_model
from helpers.hf import (
    anetrain_logits,
    llama_tokenizer,
    logits_of,
    qwen_tokenizer,
    save,
    tiny_model,
    transformers_or_skip,
)

VOCAB = 120
TOKENS = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(3))
SHAPES = {
    # name: (heads, kv heads, head_dim) with dim 64
    "gqa, head_dim != dim/heads": (4, 2, 24),
    "mha": (4, 4, 16),
}


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_logits_equal_transformers(tmp_path, arch, tied, shape):
    h, hkv, dh = SHAPES[shape]
    model = tiny_model(arch, VOCAB, tied=tied, n_heads=h, n_kv_heads=hkv, head_dim=dh)
    d = save(model, tmp_path / "m")
    m = load_model(d)
    assert m.cfg.qk_norm == (arch == "qwen3")
    assert (m.cfg.n_heads, m.cfg.n_kv_heads, m.cfg.head_dim, m.cfg.tied_classifier) == (h, hkv, dh, tied)
    assert (m.cfg.rope_theta, m.cfg.norm_eps) == (1e6, 1e-6)
    theirs = logits_of(model, TOKENS)
    torch.testing.assert_close(anetrain_logits(m.params, TOKENS), theirs, rtol=0, atol=1e-4)
    # and the independent reference model agrees too
    from anetrain.reference import ReferenceModel

    with torch.no_grad():
        torch.testing.assert_close(ReferenceModel.from_params(m.params)(TOKENS), theirs, rtol=0, atol=1e-4)


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_export_writes_the_architecture_read_and_transformers_gives_the_same_logits(tmp_path, arch):
    transformers = transformers_or_skip()
    model = tiny_model(arch, VOCAB, tied=arch == "qwen3")
    src = save(model, tmp_path / "src")
    qwen_tokenizer(src)  # a tokenizer beside the weights: the export copies it
    m = load_model(src)
    notes = save_model(tmp_path / "out", m.params, "hf", source=m.source)
    assert notes["architecture"] == {"qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}[arch]
    assert "tokenizer.json" in notes["copied"]
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == arch and cfg["eos_token_id"] == 0 and cfg["bos_token_id"] is None
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert type(back).__name__ == type(model).__name__
    torch.testing.assert_close(logits_of(back, TOKENS), logits_of(model, TOKENS), rtol=0, atol=1e-5)
    assert (tmp_path / "out" / "tokenizer_config.json").is_file()


def test_sharded_bf16_checkpoint(tmp_path):
    transformers = transformers_or_skip()
    d = save(tiny_model("qwen3", VOCAB).to(torch.bfloat16), tmp_path / "m", max_shard_size="40KB")
    assert (d / "model.safetensors.index.json").is_file()
    m = load_model(d)
    assert m.extras["weight_files"] > 1 and m.params.flat.dtype == torch.float32
    # transformers reading the same bf16 files into float32: exactly the values anetrain read
    model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ref = logits_of(model, TOKENS)
    torch.testing.assert_close(anetrain_logits(m.params, TOKENS), ref, rtol=0, atol=1e-4)
    m16 = load_model(d, hf_dtype=torch.bfloat16)  # a frozen LoRA base is read straight into 16 bits
    assert m16.params.flat.dtype == torch.bfloat16 and torch.equal(m16.params.flat.float(), m.params.flat)


def _config(tmp_path, change):
    d = save(tiny_model("qwen3", VOCAB), tmp_path / "m")
    data = json.loads((d / "config.json").read_text())
    change(data)
    (d / "config.json").write_text(json.dumps(data))
    return d


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda c: c.update(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 32.0}),
            "rope_parameters .* is not supported .*no RoPE scaling",
        ),
        (
            lambda c: c.update(rope_scaling={"rope_type": "yarn", "factor": 4.0}),
            "rope_scaling .* not supported",
        ),
        (lambda c: c.update(use_sliding_window=True), "sliding-window attention is not supported"),
        (lambda c: c.update(attention_bias=True), "attention_bias must be false"),
        (lambda c: c.update(model_type="qwen3_moe"), "model_type is 'qwen3_moe'"),
        (lambda c: c.update(num_experts=8), "mixture-of-experts models are not supported"),
        (lambda c: c.update(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
    ],
)
def test_unsupported_configs_are_refused_with_one_line(tmp_path, change, message):
    d = _config(tmp_path, change)
    with pytest.raises(InputError, match=message) as e:
        load_model(d)
    assert "\n" not in str(e.value) and str(d / "config.json") in str(e.value)


def test_hub_id_from_the_local_cache_offline(tmp_path, monkeypatch):
    """``--model owner/name`` resolves through huggingface_hub; offline, from its cache."""
    hub = pytest.importorskip(
        "huggingface_hub", reason="huggingface_hub is not installed (pip install anetrain[hf])"
    )
    cache = tmp_path / "hub"
    snap = cache / "models--tiny--qwen3" / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    model = tiny_model("qwen3", VOCAB)
    save(model, snap)
    qwen_tokenizer(snap)
    (cache / "models--tiny--qwen3" / "refs").mkdir()
    (cache / "models--tiny--qwen3" / "refs" / "main").write_text(snap.name)
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(cache))  # read once, when huggingface_hub loads
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    m = load_model("tiny/qwen3")
    torch.testing.assert_close(anetrain_logits(m.params, TOKENS), logits_of(model, TOKENS), rtol=0, atol=1e-4)
    from anetrain.tokenizer import load_tokenizer

    assert load_tokenizer("tiny/qwen3").fingerprint() == load_tokenizer(snap / "tokenizer.json").fingerprint()
    with pytest.raises(AnetrainError, match="not a local path, and the Hugging Face Hub gave no snapshot"):
        load_model("tiny/absent")


# ---- tokenizer.json ---------------------------------------------------------------------------------------


def test_qwen_style_tokenizer_conventions(tmp_path):
    from anetrain.tokenizer import HFTokenizer, load_tokenizer

    tok = load_tokenizer(qwen_tokenizer(tmp_path / "t"))
    assert isinstance(tok, HFTokenizer)
    eot = tok.tk.token_to_id("<|endoftext|>")
    assert not tok.adds_bos and tok.eos_id == eot and tok.bos_id == eot  # no BOS: documents end with eot
    text = "Once upon a time, Lily saw a “big” dog. 猫"
    ids = tok.encode_document(text)
    assert ids[-1] == eot and ids[0] != eot
    assert tok.decode(ids) == text
    streamed = b"".join(tok.decode_piece(p, i) for p, i in zip([tok.bos_id, *ids], ids, strict=False))
    assert streamed.decode("utf-8") == text  # byte-level pieces reassemble the UTF-8 text exactly
    assert tok.chat_template is not None
    assert len(tok.fingerprint()) == 64 and tok.vocab_size == tok.tk.get_vocab_size()
    # the directory holding it works as well
    assert load_tokenizer(tmp_path / "t").fingerprint() == tok.fingerprint()


def test_llama_style_tokenizer_conventions(tmp_path):
    from anetrain.tokenizer import load_tokenizer

    tok = load_tokenizer(llama_tokenizer(tmp_path / "t"))
    assert tok.adds_bos and tok.bos_id == 1 and tok.eos_id == 2
    text = "The cat sat. Ünïcode ☃"
    ids = tok.encode_document(text)
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids) == text
    streamed = b"".join(tok.decode_piece(p, i) for p, i in zip([1, *ids], ids, strict=False))
    assert streamed.decode("utf-8") == text  # "▁" as a space, <0xHH> byte fallback, no space after BOS


def test_bad_tokenizer_json(tmp_path):
    from anetrain.tokenizer import load_tokenizer

    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0", "model": 3}')
    with pytest.raises(InputError, match=r"not a Hugging Face tokenizer\.json"):
        load_tokenizer(bad)


def test_generation_decoder_gives_transformers_logits_for_qwen3(tmp_path, capsysbinary):
    """The torch decoder (anetrain generate) applies QK-norm too: its logits at every position equal
    transformers' for the same tokens, and `anetrain generate --temperature 0` with the model directory's
    tokenizer.json runs; its greedy tokens are transformers' greedy continuation of the same start token."""
    from anetrain.cli import main
    from anetrain.generate import DecodeWeights, TorchDecoder
    from anetrain.tokenizer import load_tokenizer

    model = tiny_model("qwen3", 320, tied=True, init_range=0.1)
    d = save(model, tmp_path / "m")
    qwen_tokenizer(d)
    m = load_model(d)
    n = TOKENS.shape[1]
    dec = TorchDecoder(DecodeWeights.from_params(m.params), 1, n)  # the native decoder has no QK-norm
    rows = torch.from_numpy(dec.forward(TOKENS[0].tolist(), [0] * n, list(range(n)), range(n)))
    torch.testing.assert_close(rows, logits_of(model, TOKENS[:1])[0], rtol=0, atol=1e-4)
    argv = ["generate", "--model", str(d), "--tokenizer", str(d), "--temperature", "0", "--steps", "12"]
    assert main(argv) == 0
    assert capsysbinary.readouterr().out.endswith(b"\n")
    from anetrain.generate import generate

    tok = load_tokenizer(d)
    ours = generate(m.params, tok, steps=12, temperature=0.0, seed=1).tokens
    start = torch.tensor([[tok.bos_id]])  # no BOS in Qwen3: generation starts after an <|endoftext|>
    with torch.no_grad():
        greedy = model.generate(start, max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_id)
    assert ours == greedy[0].tolist()[: len(ours)] and len(ours) > 1
