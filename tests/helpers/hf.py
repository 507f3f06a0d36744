"""Tiny Hugging Face models and tokenizers made on the spot (no download): random Qwen3 and Llama models built
by transformers itself, and tokenizer.json files trained with the tokenizers library on the shared
TinyStories text, with Qwen-like (byte-level BPE, no BOS, <|endoftext|>, a chat template) and Llama-like
(sentencepiece-style BPE with byte fallback, <s> added before every text, </s>) conventions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from .data import shared_file

#: a Qwen-style chat template (the shape of Qwen's, without tools and thinking)
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def transformers_or_skip():
    return pytest.importorskip(
        "transformers", reason="transformers is not installed (optional extra 'hf': pip install anetrain[hf])"
    )


def qwen_tokenizer(out: Path, vocab_size: int = 320) -> Path:
    """A byte-level BPE tokenizer.json + tokenizer_config.json (eos <|im_end|>, no BOS, chat template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train([str(shared_file("tinystories_valid_head.txt"))], trainer)
    out.mkdir(parents=True, exist_ok=True)
    tk.save(str(out / "tokenizer.json"))
    config = {
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "chat_template": CHAT_TEMPLATE,
        "tokenizer_class": "Qwen2Tokenizer",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out / "tokenizer.json"


def llama_tokenizer(out: Path, vocab_size: int = 400) -> Path:
    """A sentencepiece-style BPE tokenizer.json with byte fallback that puts <s> before every text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tk.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tk.train([str(shared_file("tinystories_valid_head.txt"))], trainer)
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    # the byte-fallback pieces <0x00>..<0xFF> are ordinary vocabulary entries, as in Llama's tokenizer.json
    spec = json.loads(tk.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(spec))
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return out / "tokenizer.json"


def wide_tokenizer(out: Path) -> Path:
    """A byte-level tokenizer with 70,257 ids whose every text token is above 65,535 (a uint32 token file)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {f"<pad{i}>": i for i in range(70000)}
    for j, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet())):
        vocab[c] = 70000 + j
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(["<|endoftext|>"])
    out.mkdir(parents=True, exist_ok=True)
    tk.save(str(out / "tokenizer.json"))
    return out / "tokenizer.json"


def tiny_model(
    arch: str,
    vocab_size: int,
    *,
    tied: bool = False,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    head_dim: int = 24,
    dim: int = 64,
    layers: int = 2,
    theta: float = 1e6,
    seed: int = 0,
    init_range: float = 0.02,
):
    """A random transformers Qwen3ForCausalLM ("qwen3") or LlamaForCausalLM ("llama") in float32, its norm
    gains perturbed (so a misplaced gain, e.g. a wrongly permuted q_norm, changes the logits). A larger
    ``init_range`` gives the logits the range that lets a frozen random model be fine-tuned visibly."""
    transformers = transformers_or_skip()
    common = dict(
        vocab_size=vocab_size,
        hidden_size=dim,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": theta},
        tie_word_embeddings=tied,
        bos_token_id=None,
        eos_token_id=0,
        initializer_range=init_range,
    )
    torch.manual_seed(seed)
    if arch == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


def save(model, out: Path, **kw) -> Path:
    model.save_pretrained(out, safe_serialization=True, **kw)
    return out


def logits_of(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def anetrain_logits(params, tokens: torch.Tensor) -> torch.Tensor:
    """Logits from anetrain's kernels (the baseline pipeline's forward, the final norm, the classifier)."""
    from anetrain import kernels as K
    from anetrain.pipeline.baseline import BaselinePipeline

    pipe = BaselinePipeline(params)
    x = pipe.forward_hidden(tokens)
    xf, _ = K.rmsnorm_forward(x, params.final_norm, params.cfg.norm_eps)
    return xf @ params.classifier.t()
