"""LoRA adapters as a ``peft`` adapter directory: ``adapter_model.safetensors`` + ``adapter_config.json``.

``peft.PeftModel.from_pretrained(base, DIR)`` loads it onto the transformers model of the base (the
directory's ``base_model_name_or_path``: the --model the run started from). Tensor names are peft's for a
``*ForCausalLM``::

    base_model.model.model.layers.{l}.self_attn.q_proj.lora_A.weight   [r, in]    (our ...wq.lora_A)
    base_model.model.model.layers.{l}.self_attn.q_proj.lora_B.weight   [out, r]   (our ...wq.lora_B)

and likewise k_proj, v_proj, o_proj, mlp.gate_proj (w1), mlp.up_proj (w3), mlp.down_proj (w2). As for the
weights themselves (``formats/hf.py``), the output rows of q_proj and k_proj are permuted from anetrain's
interleaved RoPE pairs to HF's half-split ones: only lora_B has output rows. A residual scale (a
llama2.c-style base) is folded into the B's of o_proj and down_proj, as into wo and w2. Written atomically,
nothing pickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_save

from ..errors import ConfigError
from ..fsutil import atomic_write_bytes, atomic_write_text
from ..lora import LoraParams, adapter_name
from .hf import copy_companions, interleaved_to_half

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
HF_MODULES = {
    "wq": "self_attn.q_proj",
    "wk": "self_attn.k_proj",
    "wv": "self_attn.v_proj",
    "wo": "self_attn.o_proj",
    "w1": "mlp.gate_proj",
    "w3": "mlp.up_proj",
    "w2": "mlp.down_proj",
}


def peft_tensors(adapters: LoraParams) -> dict[str, torch.Tensor]:
    """peft-named float32 adapter tensors in HF's layout."""
    cfg = adapters.cfg
    alpha = cfg.residual_scale
    out: dict[str, torch.Tensor] = {}
    for layer in range(cfg.n_layers):
        for target in adapters.lora.targets:
            prefix = f"base_model.model.model.layers.{layer}.{HF_MODULES[target]}"
            a = adapters[adapter_name(layer, target, "A")].detach().float()
            b = adapters[adapter_name(layer, target, "B")].detach().float()
            if target == "wq":
                b = interleaved_to_half(b, cfg.n_heads)
            elif target == "wk":
                b = interleaved_to_half(b, cfg.n_kv_heads)
            elif target in ("wo", "w2") and alpha != 1.0:
                b = b * alpha
            out[prefix + ".lora_A.weight"] = a.contiguous().clone()
            out[prefix + ".lora_B.weight"] = b.contiguous().clone()
    return out


def peft_config(adapters: LoraParams, base: str | None) -> dict[str, Any]:
    lc = adapters.lora
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": lc.rank,
        "lora_alpha": int(lc.alpha) if float(lc.alpha).is_integer() else lc.alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(HF_MODULES[t].split(".")[1] for t in lc.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


def write_peft(
    path: str | os.PathLike[str],
    adapters: LoraParams | None,
    base: str | None = None,
    source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write a peft adapter directory; ``base``: the base model's name or path for adapter_config.json;
    ``source``: the base's HF directory, whose tokenizer files are copied beside the adapter."""
    if adapters is None:
        raise ConfigError(
            "--format peft writes LoRA adapters, and this model has none (export a LoRA run's directory, "
            "or use --format hf)"
        )
    d = Path(path)
    if d.exists() and not d.is_dir():
        raise ConfigError(f"{d}: exists and is not a directory (the peft format writes a directory)")
    tensors = peft_tensors(adapters)
    d.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(d / WEIGHTS, safetensors_save(tensors, metadata={"format": "pt"}))
    atomic_write_text(d / CONFIG, json.dumps(peft_config(adapters, base), indent=2) + "\n")
    notes: dict[str, Any] = {"lora": f"rank {adapters.lora.rank}, alpha {adapters.lora.alpha:g}"}
    if base:
        notes["base_model"] = base
    if adapters.cfg.residual_scale != 1.0:
        notes["folded_residual_scale"] = adapters.cfg.residual_scale
    copied = copy_companions(source.get("dir") if source else None, d)
    if copied:
        notes["copied"] = ", ".join(copied)
    return notes
