"""Hugging Face ``LlamaForCausalLM`` directories: ``config.json`` + ``model.safetensors``, read and write.

Tensor names map one to one (``model.layers.N.self_attn.q_proj.weight`` is our
``layers.N.attention.wq.weight``, ``mlp.gate_proj``/``up_proj``/``down_proj`` are w1/w3/w2,
``input_layernorm``/``post_attention_layernorm`` the two norms, ``lm_head.weight`` the untied classifier).
One real difference: HF rotates *half-split* pairs (i, i + dh/2) inside each head, llama2.c and anetrain
*interleaved* pairs (2i, 2i+1). So the rows of wq (per query head) and of wk (per key/value head) are
permuted on export, as llama2.c's ``export.py`` does, and back on import; attention scores, and so the
model, are unchanged. A residual scale is folded into wo and w2.

Reading also accepts a sharded checkpoint (``model.safetensors.index.json`` naming the shard files) and
float16/bfloat16 tensors (converted to float32). Only safetensors is read: never pickle.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save

from ..config import ModelConfig, make_config
from ..errors import ConfigError, InputError
from ..fsutil import CONFIG_LIMIT, atomic_directory, atomic_write_bytes, atomic_write_text, read_capped
from ..params import ModelParams, fold_residual_scale, require_file_holds
from .common import LoadedModel, require_finite, wrap_input_error

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"

_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_GLOBAL_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"layers\.(\d+)\.(.+)")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def hf_name(name: str) -> str:
    """Our parameter name -> the HF LlamaForCausalLM name."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _LAYER_RE.fullmatch(name)
    if not m or m.group(2) not in _LAYER_NAMES:
        raise KeyError(name)
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Permute the rows of a q/k projection from interleaved RoPE pairs to HF's half-split pairs.

    In each head, row 2i + j (pair i, member j) moves to row j * dh/2 + i (llama2.c ``export.py``).
    """
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of :func:`interleaved_to_half`."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


# ------------------------------------------------------------------------------------------------
# Writing


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """config.json for ``cfg`` (whose residual scale must already be 1)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "num_hidden_layers": cfg.n_layers,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        # transformers >= 5 reads RoPE settings from here; older versions read rope_theta above.
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_scaling": None,
        "tie_word_embeddings": cfg.tied_classifier,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def hf_tensors(params: ModelParams) -> dict[str, torch.Tensor]:
    """HF-named float32 tensors (q/k rows permuted; the residual scale folded; the tied classifier once)."""
    if params.cfg.residual_scale != 1.0:
        params = fold_residual_scale(params)
    cfg = params.cfg
    out: dict[str, torch.Tensor] = {}
    for name, t in params.named():
        if name.endswith("attention.wq.weight"):
            t = interleaved_to_half(t, cfg.n_heads)
        elif name.endswith("attention.wk.weight"):
            t = interleaved_to_half(t, cfg.n_kv_heads)
        out[hf_name(name)] = t.detach().to(torch.float32).contiguous().clone()
    return out


def write_hf(
    path: str | os.PathLike[str],
    params: ModelParams,
    extra_files: Callable[[Path], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Write a HF directory (config.json, model.safetensors, and what ``extra_files(directory)`` adds: the
    tokenizer's files) as a whole: a directory already there is replaced atomically (a kill leaves the
    old model or the new one, never a mixture), and only if it is a model directory; returns notes."""
    d = Path(path)
    check_replaceable(d)
    cfg = params.cfg
    notes: dict[str, Any] = {}
    if cfg.residual_scale != 1.0:
        notes["folded_residual_scale"] = cfg.residual_scale
    tensors = hf_tensors(params)
    with atomic_directory(d) as tmp:
        atomic_write_bytes(tmp / WEIGHTS, safetensors_save(tensors, metadata={"format": "pt"}))
        atomic_write_text(tmp / CONFIG, json.dumps(hf_config(cfg.with_(residual_scale=1.0)), indent=2) + "\n")
        if extra_files is not None:
            notes.update(extra_files(tmp))
    return notes


def check_replaceable(d: Path) -> None:
    """Refuse to write a HF directory over a file, or over a non-empty directory that is not a Hugging Face
    model directory (a run directory, a data folder): it would be replaced as a whole."""
    if d.exists() and not d.is_dir():
        raise ConfigError(f"{d}: exists and is not a directory (the hf format writes a directory)")
    if not d.is_dir() or not any(d.iterdir()):
        return
    try:
        doc = json.loads(read_capped(d / CONFIG, CONFIG_LIMIT, "model config"))
    except (InputError, UnicodeDecodeError, json.JSONDecodeError):
        doc = None
    if not (isinstance(doc, dict) and "model_type" in doc and "train" not in doc):
        raise ConfigError(
            f"{d}: is a non-empty directory that is not a Hugging Face model directory; it would be replaced "
            "as a whole: choose a new directory"
        )


# ------------------------------------------------------------------------------------------------
# Reading


def _int_field(path: Path, data: dict[str, Any], key: str, default: int | None = None) -> int:
    value = data.get(key)
    if value is None:  # absent or null: transformers' default
        value = default
    if value is None:
        raise InputError(path, f"field {key} is missing")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InputError(path, f"field {key} must be a positive integer, got {value!r}")
    return value


def _float_field(path: Path, data: dict[str, Any], key: str, default: float) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not (0 < value < math.inf):
        raise InputError(path, f"field {key} must be a positive number, got {value!r}")
    return float(value)


def config_from_hf(path: Path, data: Any, name: str = "hf") -> ModelConfig:
    """Validate a LlamaForCausalLM config.json (already parsed) and turn it into a :class:`ModelConfig`.

    Missing optional fields take transformers' LlamaConfig defaults (rms_norm_eps 1e-6, rope_theta 10000,
    tie_word_embeddings false, max_position_embeddings 2048).
    """
    if not isinstance(data, dict):
        raise InputError(path, "must hold a JSON object")
    if data.get("model_type") != "llama":
        raise InputError(path, f"model_type is {data.get('model_type')!r}; only 'llama' can be read")
    act = data.get("hidden_act", "silu")
    if act != "silu":
        raise InputError(path, f"hidden_act {act!r} is not supported (only 'silu')")
    for key in ("attention_bias", "mlp_bias"):
        if data.get(key, False) is not False:
            raise InputError(path, f"field {key} must be false (biases are not supported)")
    if data.get("rope_scaling") not in (None, {}):
        raise InputError(path, f"rope_scaling {data['rope_scaling']!r} is not supported")
    theta = data.get("rope_theta", 10000.0)
    rope = data.get("rope_parameters")
    if rope is not None:
        if not isinstance(rope, dict) or rope.get("rope_type", "default") != "default":
            raise InputError(path, f"rope_parameters {rope!r} is not supported (only rope_type 'default')")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise InputError(path, "rope_parameters.partial_rotary_factor must be 1")
        theta = rope.get("rope_theta", theta)
    tied = data.get("tie_word_embeddings", False)
    if not isinstance(tied, bool):
        raise InputError(path, f"field tie_word_embeddings must be true or false, got {tied!r}")
    heads = _int_field(path, data, "num_attention_heads")
    dim = _int_field(path, data, "hidden_size")
    values = dict(
        dim=dim,
        hidden_dim=_int_field(path, data, "intermediate_size"),
        n_layers=_int_field(path, data, "num_hidden_layers"),
        n_heads=heads,
        n_kv_heads=_int_field(path, data, "num_key_value_heads", heads),
        vocab_size=_int_field(path, data, "vocab_size"),
        seq_len=_int_field(path, data, "max_position_embeddings", 2048),
        head_dim=_int_field(path, data, "head_dim", dim // heads),
        rope_theta=_float_field(path, {"rope_theta": theta}, "rope_theta", 10000.0),
        norm_eps=_float_field(path, data, "rms_norm_eps", 1e-6),
        tied_classifier=tied,
        name=name,
    )
    try:
        return make_config(**values)
    except ConfigError as e:
        raise InputError(path, f"inconsistent config ({e})") from None


def _weight_files(d: Path) -> list[Path]:
    """The safetensors file(s) of directory ``d``: model.safetensors, or the shards its index names."""
    if (d / WEIGHTS).is_file():
        return [d / WEIGHTS]
    index = d / INDEX
    if not index.is_file():
        raise InputError(d, f"has no {WEIGHTS} (nor {INDEX})")
    try:
        weight_map = json.loads(read_capped(index, CONFIG_LIMIT, "safetensors index"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise InputError(index, f"not a valid safetensors index ({type(e).__name__}: {e})") from None
    for s in shards:
        if not isinstance(s, str) or Path(s).name != s or not s.endswith(".safetensors"):
            raise InputError(
                index, f"names an invalid shard {s!r} (must be a .safetensors file in the directory)"
            )
    return [d / s for s in shards]


def _read_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise InputError(f, "is missing (named by the safetensors index)")
        try:
            with safe_open(os.fspath(f), framework="pt") as st:
                for key in st.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    out[key] = st.get_tensor(key)
        except InputError:
            raise
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise wrap_input_error(f, e) from None
    return out


def read_hf(path: str | os.PathLike[str]) -> LoadedModel:
    """Read a HF LlamaForCausalLM directory (or the directory of a given ``model.safetensors``)."""
    d = Path(path)
    if d.is_file():
        d = d.parent
    cfg_path = d / CONFIG
    if not cfg_path.is_file():
        raise InputError(d, f"is not a Hugging Face model directory (no {CONFIG})")
    try:
        data = json.loads(read_capped(cfg_path, CONFIG_LIMIT, "model config"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(cfg_path, f"not valid JSON ({e})") from None
    cfg = config_from_hf(cfg_path, data, name=d.resolve().name)
    files = _weight_files(d)
    tensors = _read_tensors(files)
    where = files[0] if len(files) == 1 else d
    # the config's model is allocated only if that is in proportion to what the files hold (a file a few
    # tensors short gets the precise message below)
    require_file_holds(cfg_path, cfg, sum(t.numel() for t in tensors.values()), per_param=0.5, unit="values")
    params = ModelParams.zeros(cfg)
    expected = {hf_name(n): n for n in params.tensors}
    if cfg.tied_classifier:
        tensors.pop("lm_head.weight", None)  # transformers ties it to the embedding on load anyway
    for key in tensors:
        if key not in expected and not key.endswith("rotary_emb.inv_freq"):
            raise InputError(
                where, f"has unexpected tensor {key} (not part of a {cfg.shape_line()} Llama model)"
            )
    for key, name in expected.items():
        if key not in tensors:
            raise InputError(where, f"is missing tensor {key}")
        t = tensors[key]
        if t.dtype not in _FLOAT_DTYPES:
            raise InputError(where, f"tensor {key} has dtype {t.dtype}, expected a floating-point type")
        if tuple(t.shape) != tuple(params[name].shape):
            raise InputError(
                where,
                f"tensor {key} has shape {tuple(t.shape)}, config.json implies {tuple(params[name].shape)}",
            )
        t = t.to(torch.float32)
        if name.endswith("attention.wq.weight"):
            t = half_to_interleaved(t, cfg.n_heads)
        elif name.endswith("attention.wk.weight"):
            t = half_to_interleaved(t, cfg.n_kv_heads)
        params[name].copy_(t)
    require_finite(where, params.flat)
    return LoadedModel(cfg=cfg, params=params, format="hf", extras={"weight_files": len(files)})
