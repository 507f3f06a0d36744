"""Model configurations: the presets and small TOML/JSON config files. Pure data, validated once.

A configuration fixes every shape of a Llama-2-family decoder:

    dim         D    width of the residual stream
    hidden_dim  F    SwiGLU hidden width (w1, w3: [F, D]; w2: [D, F])
    n_layers    L
    n_heads     H    query heads
    n_kv_heads  Hkv  key/value heads (GQA when Hkv < H; query head h reads kv head h // (H/Hkv))
    head_dim    dh   per-head width; Dq = H*dh and Dkv = Hkv*dh need not equal D (Qwen3-shaped: 128)
    vocab_size  V
    seq_len     S    the longest context the model is meant for (RoPE positions 0..S-1)

plus the numerics that a file format may or may not be able to express: rope_theta, norm_eps, whether the
classifier is tied to the token embedding, the residual scale alpha applied to both residual branches
(the original's dynamic pipeline uses alpha = 1/sqrt(2L), "DeepNet" scaling), and ``qk_norm``: Qwen3's
per-head RMSNorm of the queries and keys (gains q_norm, k_norm: [dh] each, eps = norm_eps) applied after the
q/k projections and before RoPE.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .errors import ConfigError, InputError


@dataclass(frozen=True)
class ModelConfig:
    """Every hyper-parameter that fixes the model's math. Construct through :func:`make_config`."""

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    head_dim: int = 0  # 0 means dim // n_heads
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tied_classifier: bool = True
    residual_scale: float = 1.0
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before RoPE
    name: str = field(default="custom", compare=False)

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        """Dq = H * dh, the width of the query projection."""
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Dkv = Hkv * dh, the width of the key and value projections."""
        return self.n_kv_heads * self.head_dim

    @property
    def gqa_ratio(self) -> int:
        """R = H / Hkv: how many query heads share one key/value head."""
        return self.n_heads // self.n_kv_heads

    def layer_norm_count(self) -> int:
        """Elements of one layer's norm gains: the two RMSNorms (and q_norm, k_norm with QK-norm)."""
        return 2 * self.dim + (2 * self.head_dim if self.qk_norm else 0)

    def layer_param_count(self) -> int:
        d, f = self.dim, self.hidden_dim
        return self.q_dim * d + 2 * self.kv_dim * d + d * self.q_dim + 3 * f * d + self.layer_norm_count()

    def param_count(self) -> int:
        """All trainable parameters (the tied classifier counted once)."""
        n = self.vocab_size * self.dim + self.n_layers * self.layer_param_count() + self.dim
        if not self.tied_classifier:
            n += self.vocab_size * self.dim
        return n

    def shape_line(self) -> str:
        kv = f"/{self.n_kv_heads}kv" if self.n_kv_heads != self.n_heads else ""
        hd = f" head_dim={self.head_dim}" if self.head_dim != self.dim // self.n_heads else ""
        qk = " qk_norm" if self.qk_norm else ""
        return (
            f"dim={self.dim} hidden={self.hidden_dim} layers={self.n_layers} heads={self.n_heads}{kv}{hd} "
            f"vocab={self.vocab_size} seq={self.seq_len}{qk}"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed, validated again."""
        return make_config(**{**self.to_dict(), **changes})


_FIELD_NAMES = {f.name for f in fields(ModelConfig)}

# Alternative spellings accepted in config files (HF / llama2.c names).
_ALIASES = {
    "hidden": "hidden_dim",
    "intermediate_size": "hidden_dim",
    "layers": "n_layers",
    "num_hidden_layers": "n_layers",
    "heads": "n_heads",
    "num_attention_heads": "n_heads",
    "kv_heads": "n_kv_heads",
    "num_key_value_heads": "n_kv_heads",
    "vocab": "vocab_size",
    "seq": "seq_len",
    "max_seq_len": "seq_len",
    "hidden_size": "dim",
    "rms_norm_eps": "norm_eps",
    "tie_word_embeddings": "tied_classifier",
    "tied": "tied_classifier",
    "alpha": "residual_scale",
}


#: the largest value of any size field (dim, layers, vocabulary, seq_len...): 16.7M, far above any real model
MAX_SIZE = 1 << 24


def deepnet_alpha(n_layers: int) -> float:
    """The original dynamic pipeline's residual scale, 1/sqrt(2L)."""
    return 1.0 / math.sqrt(2 * n_layers)


def make_config(**values: Any) -> ModelConfig:
    """Build and validate a :class:`ModelConfig`; raises :class:`ConfigError` naming the bad field."""
    norm: dict[str, Any] = {}
    for key, value in values.items():
        key = _ALIASES.get(key, key)
        if key not in _FIELD_NAMES:
            raise ConfigError(
                f"unknown model config field {key!r} (known: {', '.join(sorted(_FIELD_NAMES))})"
            )
        norm[key] = value
    missing = [
        k for k in ("dim", "hidden_dim", "n_layers", "n_heads", "vocab_size", "seq_len") if k not in norm
    ]
    if missing:
        raise ConfigError(f"model config is missing {', '.join(missing)}")
    norm.setdefault("n_kv_heads", norm["n_heads"])
    if norm.get("residual_scale") == "deepnet":
        norm["residual_scale"] = deepnet_alpha(int(norm["n_layers"]))
    for key in (
        "dim",
        "hidden_dim",
        "n_layers",
        "n_heads",
        "n_kv_heads",
        "vocab_size",
        "seq_len",
        "head_dim",
    ):
        if key in norm:
            v = norm[key]
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or int(v) != v:
                raise ConfigError(f"model config field {key} must be an integer, got {v!r}")
            norm[key] = int(v)
    for key in ("rope_theta", "norm_eps", "residual_scale"):
        if key in norm:
            v = norm[key]
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise ConfigError(f"model config field {key} must be a number, got {v!r}")
            norm[key] = float(v)
    for key in ("tied_classifier", "qk_norm"):
        if key in norm and not isinstance(norm[key], bool):
            raise ConfigError(f"model config field {key} must be true or false, got {norm[key]!r}")
    for key in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"):
        if norm[key] <= 0:
            raise ConfigError(f"model config field {key} must be positive, got {norm[key]}")
        if norm[key] > MAX_SIZE:  # a damaged or hostile header, not a model: refused before any allocation
            raise ConfigError(f"model config field {key} is {norm[key]:,}, above the limit of {MAX_SIZE:,}")
    if norm.get("head_dim", 0) == 0:
        if norm["dim"] % norm["n_heads"]:
            raise ConfigError(
                f"dim {norm['dim']} is not divisible by n_heads {norm['n_heads']}; give head_dim explicitly"
            )
        norm["head_dim"] = norm["dim"] // norm["n_heads"]
    if norm["head_dim"] < 0:
        raise ConfigError(f"model config field head_dim must be positive, got {norm['head_dim']}")
    if norm["head_dim"] % 2:
        raise ConfigError(
            f"head_dim must be even for rotary embeddings (RoPE rotates pairs), got {norm['head_dim']}"
        )
    if norm["n_heads"] % norm["n_kv_heads"]:
        raise ConfigError(
            f"n_heads {norm['n_heads']} is not divisible by n_kv_heads {norm['n_kv_heads']} "
            "(each key/value head must serve a whole group of query heads)"
        )
    for key in ("rope_theta", "norm_eps", "residual_scale"):
        if key in norm and not (norm[key] > 0 and math.isfinite(norm[key])):
            raise ConfigError(f"model config field {key} must be a positive finite number, got {norm[key]}")
    return ModelConfig(**norm)


PRESETS: dict[str, ModelConfig] = {
    "stories260K": make_config(
        name="stories260K",
        dim=64,
        hidden_dim=172,
        n_layers=5,
        n_heads=8,
        n_kv_heads=4,
        vocab_size=512,
        seq_len=512,
    ),
    "stories15M": make_config(
        name="stories15M",
        dim=288,
        hidden_dim=768,
        n_layers=6,
        n_heads=6,
        n_kv_heads=6,
        vocab_size=32000,
        seq_len=256,
    ),
    "stories42M": make_config(
        name="stories42M",
        dim=512,
        hidden_dim=1376,
        n_layers=8,
        n_heads=8,
        n_kv_heads=8,
        vocab_size=32000,
        seq_len=1024,
    ),
    "stories110M": make_config(
        name="stories110M",
        dim=768,
        hidden_dim=2048,
        n_layers=12,
        n_heads=12,
        n_kv_heads=12,
        vocab_size=32000,
        seq_len=1024,
    ),
    # stories110M as the original's dynamic pipeline trains it (its Neural Engine reference configuration):
    # sequences of 256, both residual branches scaled by 1/sqrt(2L).
    "stories110M-original": make_config(
        name="stories110M-original",
        dim=768,
        hidden_dim=2048,
        n_layers=12,
        n_heads=12,
        n_kv_heads=12,
        vocab_size=32000,
        seq_len=256,
        residual_scale="deepnet",
    ),
    # Shape only, as in the original: no QK-norm, interleaved RoPE with theta 1e4, eps 1e-5.
    "qwen3-0.6b-shaped": make_config(
        name="qwen3-0.6b-shaped",
        dim=1024,
        hidden_dim=3072,
        n_layers=28,
        n_heads=16,
        n_kv_heads=8,
        head_dim=128,
        vocab_size=151936,
        seq_len=256,
    ),
    # The architecture of Qwen/Qwen3-0.6B exactly (its config.json): QK-norm, RoPE theta 1e6 on half-split
    # pairs in HF's layout (anetrain's interleaved pairs after the import's row permutation), eps 1e-6, tied.
    # As a preset it starts from random weights (benchmarks); fine-tuning loads the real ones with --model.
    "qwen3-0.6b": make_config(
        name="qwen3-0.6b",
        dim=1024,
        hidden_dim=3072,
        n_layers=28,
        n_heads=16,
        n_kv_heads=8,
        head_dim=128,
        vocab_size=151936,
        seq_len=40960,
        rope_theta=1000000.0,
        norm_eps=1e-6,
        qk_norm=True,
    ),
}


def preset(name: str) -> ModelConfig:
    """A preset by its exact name; raises :class:`ConfigError` listing the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})") from None


def load_config_file(path: str | Path) -> ModelConfig:
    """Read a model config from a ``.toml`` or ``.json`` file.

    The file holds the fields of :class:`ModelConfig` at top level (or under a ``[model]`` table), e.g.::

        dim = 128
        hidden_dim = 344
        n_layers = 4
        n_heads = 8
        n_kv_heads = 2
        vocab_size = 512
        seq_len = 256
        residual_scale = "deepnet"   # or a number; default 1.0
    """
    from .fsutil import CONFIG_LIMIT, read_capped

    p = Path(path)
    raw = read_capped(p, CONFIG_LIMIT, "model config file")
    try:
        text = raw.decode("utf-8")
        data = tomllib.loads(text) if p.suffix.lower() == ".toml" else json.loads(text)
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise InputError(p, f"not a valid {p.suffix.lstrip('.').upper() or 'config'} file ({e})") from None
    if not isinstance(data, dict):
        raise InputError(p, "config file must hold a table of fields")
    if isinstance(data.get("model"), dict):
        data = data["model"]
    data = dict(data)
    data.setdefault("name", p.stem)
    try:
        return make_config(**data)
    except ConfigError as e:
        raise InputError(p, str(e)) from None


def resolve_config(spec: str) -> ModelConfig:
    """A preset name or a path to a ``.toml``/``.json`` config file."""
    if spec in PRESETS:
        return PRESETS[spec]
    if spec.lower().endswith((".toml", ".json")):
        return load_config_file(spec)
    raise ConfigError(
        f"unknown preset {spec!r} (known: {', '.join(PRESETS)}; or give a .toml/.json config file)"
    )


__all__ = [
    "PRESETS",
    "ModelConfig",
    "deepnet_alpha",
    "load_config_file",
    "make_config",
    "preset",
    "replace",
    "resolve_config",
]
