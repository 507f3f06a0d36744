"""Hugging Face ``LlamaForCausalLM`` and ``Qwen3ForCausalLM`` directories: ``config.json`` + safetensors.

Tensor names map one to one (``model.layers.N.self_attn.q_proj.weight`` is our
``layers.N.attention.wq.weight``, ``mlp.gate_proj``/``up_proj``/``down_proj`` are w1/w3/w2,
``input_layernorm``/``post_attention_layernorm`` the two norms, Qwen3's ``self_attn.q_norm``/``k_norm`` our
``attention.q_norm``/``k_norm``, ``lm_head.weight`` the untied classifier). One real difference: HF rotates
*half-split* pairs (i, i + dh/2) inside each head, llama2.c and anetrain *interleaved* pairs (2i, 2i+1). So
the rows of wq (per query head) and of wk (per key/value head) are permuted on export, as llama2.c's
``export.py`` does, and back on import; attention scores, and so the model, are unchanged. Qwen3's QK-norm
gains ([dh], one element per row of a head) get the same permutation: RMSNorm over a head does not care
about the order of its elements, only that each gain meets its element. A residual scale is folded into wo
and w2.

Reading accepts a sharded checkpoint (``model.safetensors.index.json`` naming the shard files) and
float16/bfloat16 tensors (converted to float32), tensor by tensor. A config that needs something anetrain does
not implement (RoPE scaling, sliding-window attention, biases, mixture of experts, another activation) is
refused with one line saying which, never approximated. Only safetensors is read: never pickle.

Writing produces the architecture that was read: Qwen3 for a QK-norm model, Llama otherwise; given the source
directory's config (``source``), its token ids and other non-architecture fields are kept, and its tokenizer
files and generation_config.json are copied, so transformers loads the result with its tokenizer.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
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
    "attention.q_norm.weight": "self_attn.q_norm.weight",
    "attention.k_norm.weight": "self_attn.k_norm.weight",
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
#: model_type -> the architecture class transformers builds
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
#: files of a source directory that an export copies beside the weights (tokenizer, generation defaults)
COMPANION_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)
#: config.json fields an export takes from the source model (they are not part of anetrain's ModelConfig)
_KEPT_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "use_cache")


def hf_name(name: str) -> str:
    """Our parameter name -> the HF LlamaForCausalLM name."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _LAYER_RE.fullmatch(name)
    if not m or m.group(2) not in _LAYER_NAMES:
        raise KeyError(name)
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"


def to_hf_layout(name: str, t: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """A tensor of ours in HF's layout: q/k rows (and the QK-norm gains) permuted to half-split pairs."""
    if name.endswith("attention.wq.weight"):
        return interleaved_to_half(t, cfg.n_heads)
    if name.endswith("attention.wk.weight"):
        return interleaved_to_half(t, cfg.n_kv_heads)
    if name.endswith(("attention.q_norm.weight", "attention.k_norm.weight")):
        return interleaved_to_half(t[:, None], 1)[:, 0]
    return t


def from_hf_layout(name: str, t: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """The inverse of :func:`to_hf_layout`."""
    if name.endswith("attention.wq.weight"):
        return half_to_interleaved(t, cfg.n_heads)
    if name.endswith("attention.wk.weight"):
        return half_to_interleaved(t, cfg.n_kv_heads)
    if name.endswith(("attention.q_norm.weight", "attention.k_norm.weight")):
        return half_to_interleaved(t[:, None], 1)[:, 0]
    return t


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


def model_type(cfg: ModelConfig) -> str:
    """The HF model_type that expresses ``cfg``: qwen3 with QK-norm, llama otherwise."""
    return "qwen3" if cfg.qk_norm else "llama"


def hf_config(cfg: ModelConfig, source: dict[str, Any] | None = None) -> dict[str, Any]:
    """config.json for ``cfg`` (whose residual scale must already be 1); ``source``: the config.json of the
    model it came from, whose token ids and other non-architecture fields are kept."""
    mt = model_type(cfg)
    out: dict[str, Any] = {"bos_token_id": 1, "eos_token_id": 2}
    if source:
        out.update({k: source[k] for k in _KEPT_FIELDS if k in source})
    extra: dict[str, Any] = {}
    if mt == "qwen3":
        extra = {"use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.n_layers}
    else:
        extra = {"mlp_bias": False}
    return {
        "architectures": [ARCHITECTURES[mt]],
        "model_type": mt,
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
        "attention_dropout": 0.0,
        **extra,
        "torch_dtype": "float32",
        **out,
    }


def hf_tensors(params: ModelParams) -> dict[str, torch.Tensor]:
    """HF-named float32 tensors (q/k rows permuted; the residual scale folded; the tied classifier once)."""
    if params.cfg.residual_scale != 1.0:
        params = fold_residual_scale(params)
    cfg = params.cfg
    out: dict[str, torch.Tensor] = {}
    for name, t in params.named():
        out[hf_name(name)] = to_hf_layout(name, t.detach(), cfg).to(torch.float32).contiguous().clone()
    return out


def write_hf(
    path: str | os.PathLike[str],
    params: ModelParams,
    source: dict[str, Any] | None = None,
    extra_files: Callable[[Path], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Write a HF directory (config.json, model.safetensors, tokenizer files) as a whole: a directory already
    there is replaced atomically (a kill leaves the old model or the new one, never a mixture), and only if it
    is a model directory; returns notes.

    ``source`` (``{"dir": ..., "config": {...}}``, what :func:`read_hf` records in its extras) names the model
    this one came from: its config's token ids are kept and its tokenizer files copied beside the weights.
    Otherwise ``extra_files(directory)`` adds files (the run's tokenizer, as a ``tokenizer.json``).
    """
    d = Path(path)
    check_replaceable(d)
    cfg = params.cfg
    notes: dict[str, Any] = {"architecture": ARCHITECTURES[model_type(cfg)]}
    if cfg.residual_scale != 1.0:
        notes["folded_residual_scale"] = cfg.residual_scale
    tensors = hf_tensors(params)
    src_cfg = source.get("config") if source else None
    with atomic_directory(d) as tmp:
        atomic_write_bytes(tmp / WEIGHTS, safetensors_save(tensors, metadata={"format": "pt"}))
        config = hf_config(cfg.with_(residual_scale=1.0), src_cfg if isinstance(src_cfg, dict) else None)
        atomic_write_text(tmp / CONFIG, json.dumps(config, indent=2) + "\n")
        copied = copy_companions(source.get("dir") if source else None, tmp)
        if copied:
            notes["copied"] = ", ".join(copied)
        elif extra_files is not None:
            notes.update(extra_files(tmp))
    return notes


def copy_companions(src: str | os.PathLike[str] | None, dst: Path) -> list[str]:
    """Copy the tokenizer files and generation_config.json of ``src`` (a HF directory) into ``dst``, each
    atomically; the names copied (none when ``src`` is None or no longer exists)."""
    if not src or not Path(src).is_dir() or Path(src).resolve() == dst.resolve():
        return []
    copied = []
    for name in COMPANION_FILES:
        f = Path(src) / name
        if f.is_file():
            tmp = dst / f".{name}.tmp-{os.getpid()}"
            shutil.copyfile(f, tmp)  # follows the HF cache's symlinks
            os.replace(tmp, dst / name)
            copied.append(name)
    return copied


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
    """Validate a LlamaForCausalLM or Qwen3ForCausalLM config.json (already parsed) and turn it into a
    :class:`ModelConfig`; anything anetrain does not implement is refused with one line naming it.

    Missing optional fields take transformers' defaults (rms_norm_eps 1e-6, rope_theta 10000,
    tie_word_embeddings false, max_position_embeddings 2048).
    """
    if not isinstance(data, dict):
        raise InputError(path, "must hold a JSON object")
    mt = data.get("model_type")
    if mt not in ARCHITECTURES:
        raise InputError(
            path,
            f"model_type is {mt!r}; only 'llama' (Llama 2/3, SmolLM2, TinyLlama, ...) and 'qwen3' "
            "can be read",
        )
    act = data.get("hidden_act", "silu")
    if act != "silu":
        raise InputError(path, f"hidden_act {act!r} is not supported (only 'silu')")
    for key in ("attention_bias", "mlp_bias"):
        if data.get(key, False) is not False:
            raise InputError(path, f"field {key} must be false (biases are not supported)")
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if data.get(key):
            raise InputError(
                path, f"field {key} is {data[key]!r}: mixture-of-experts models are not supported"
            )
    if data.get("use_sliding_window"):
        raise InputError(path, "use_sliding_window is true: sliding-window attention is not supported")
    layer_types = data.get("layer_types")
    if isinstance(layer_types, list) and any(t != "full_attention" for t in layer_types):
        raise InputError(
            path, "layer_types has non-full attention layers: sliding-window attention is not supported"
        )
    if data.get("rope_scaling") not in (None, {}):
        raise InputError(
            path, f"rope_scaling {data['rope_scaling']!r} is not supported (only plain RoPE, no scaling)"
        )
    theta = data.get("rope_theta", 10000.0)
    rope = data.get("rope_parameters")
    if rope is not None:
        if not isinstance(rope, dict) or rope.get("rope_type", "default") != "default":
            raise InputError(
                path, f"rope_parameters {rope!r} is not supported (only rope_type 'default': no RoPE scaling)"
            )
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise InputError(path, "rope_parameters.partial_rotary_factor must be 1")
        theta = rope.get("rope_theta", theta)
    if data.get("partial_rotary_factor", 1.0) != 1.0:
        raise InputError(path, "partial_rotary_factor must be 1 (RoPE on the whole head)")
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
        qk_norm=mt == "qwen3",
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


def _tensor_index(files: list[Path]) -> dict[str, Path]:
    """Every tensor name of the safetensors files -> the file holding it (headers only, nothing loaded)."""
    out: dict[str, Path] = {}
    for f in files:
        if not f.is_file():
            raise InputError(f, "is missing (named by the safetensors index)")
        try:
            with safe_open(os.fspath(f), framework="pt") as st:
                for key in st.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    out[key] = f
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise wrap_input_error(f, e) from None
    return out


def read_config(d: Path) -> tuple[ModelConfig, dict[str, Any]]:
    """The ModelConfig and the raw config.json of a HF directory."""
    cfg_path = d / CONFIG
    if not cfg_path.is_file():
        raise InputError(d, f"is not a Hugging Face model directory (no {CONFIG})")
    try:
        data = json.loads(read_capped(cfg_path, CONFIG_LIMIT, "model config"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(cfg_path, f"not valid JSON ({e})") from None
    return config_from_hf(cfg_path, data, name=d.resolve().name), data


def read_hf(path: str | os.PathLike[str], dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Read a HF LlamaForCausalLM/Qwen3ForCausalLM directory (or the directory of a given safetensors file)
    into ``dtype`` parameters (float32 by default), one tensor at a time."""
    d = Path(path)
    if d.is_file():
        d = d.parent
    cfg, raw = read_config(d)
    files = _weight_files(d)
    index = _tensor_index(files)
    where = files[0] if len(files) == 1 else d
    # the config's model is allocated only if the files are big enough to hold it (at least a byte per
    # parameter; a file a few tensors short gets the precise message below)
    require_file_holds(d / CONFIG, cfg, sum(f.stat().st_size for f in set(index.values())))
    params = ModelParams.zeros(cfg, dtype)
    expected = {hf_name(n): n for n in params.tensors}
    kind = "Qwen3" if cfg.qk_norm else "Llama"
    for key in index:
        if key in expected or key.endswith("rotary_emb.inv_freq"):
            continue
        if key == "lm_head.weight" and cfg.tied_classifier:
            continue  # transformers ties it to the embedding on load anyway
        raise InputError(
            where, f"has unexpected tensor {key} (not part of a {cfg.shape_line()} {kind} model)"
        )
    for key, name in expected.items():
        if key not in index:
            raise InputError(where, f"is missing tensor {key}")
        try:
            with safe_open(os.fspath(index[key]), framework="pt") as st:
                t = st.get_tensor(key)
        except Exception as e:
            raise wrap_input_error(index[key], e) from None
        if t.dtype not in _FLOAT_DTYPES:
            raise InputError(where, f"tensor {key} has dtype {t.dtype}, expected a floating-point type")
        if tuple(t.shape) != tuple(params[name].shape):
            raise InputError(
                where,
                f"tensor {key} has shape {tuple(t.shape)}, config.json implies {tuple(params[name].shape)}",
            )
        if not bool(torch.isfinite(t).all()):
            raise InputError(where, f"tensor {key} contains NaN or infinite weights")
        params[name].copy_(from_hf_layout(name, t, cfg))
        del t
    require_finite(where, params.flat)
    source = {"dir": str(d.resolve()), "config": raw}
    return LoadedModel(
        cfg=cfg, params=params, format="hf", extras={"weight_files": len(files)}, source=source
    )
