"""What a run trains and on what: the model (preset, config file or weights file) and the train/validation
token data."""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import PRESETS, ModelConfig, deepnet_alpha, load_config_file
from ..data.sampler import WindowSampler, eval_windows, make_sampler
from ..data.tokens import TokenFile, check_tokens, open_tokens
from ..distributed import World
from ..errors import ConfigError, InputError
from ..optim import AdamState
from ..params import ModelParams, init_params
from .options import TrainOptions

# ------------------------------------------------------------------------------------------------
# Model and data resolution


def _named_config(spec: str, alpha: str | None) -> ModelConfig | None:
    """The config a preset name or a .toml/.json config file gives (with --residual-scale applied), or None
    when ``spec`` names something else (a weights file)."""
    if not (spec in PRESETS or (spec.lower().endswith((".toml", ".json")) and not Path(spec).is_dir())):
        return None
    cfg = PRESETS[spec] if spec in PRESETS else load_config_file(spec)
    if alpha is not None:
        cfg = cfg.with_(residual_scale=deepnet_alpha(cfg.n_layers) if alpha == "deepnet" else float(alpha))
    return cfg


def config_of_spec(spec: str, alpha: str | None = None) -> ModelConfig:
    """The config a --model spec describes (a weights file is read for its header)."""
    cfg = _named_config(spec, alpha)
    if cfg is not None:
        return cfg
    from ..formats import load_model

    return load_model(spec).cfg


def resolve_model(opts: TrainOptions) -> tuple[ModelConfig, ModelParams, AdamState | None, str]:
    """(config, fresh or pretrained fp32 params, optimizer state if the file has one, description)."""
    spec, alpha = opts.model, opts.residual_scale
    cfg = _named_config(spec, alpha)
    if cfg is not None:
        return (
            cfg,
            init_params(cfg, opts.init, opts.seed),
            None,
            f"{cfg.name} from scratch ({opts.init} init)",
        )
    if not Path(spec).exists():
        raise ConfigError(
            f"--model {spec!r} is neither a preset ({', '.join(PRESETS)}), a .toml/.json config nor "
            "an existing weights file"
        )
    if alpha is not None:
        raise ConfigError("--residual-scale applies to new models only; a weights file carries its own")
    from ..formats import load_model

    loaded = load_model(spec)
    return loaded.cfg, loaded.params, loaded.optimizer, f"{spec} ({loaded.format})"


@dataclass
class DataSplit:
    """The training tokens (the first ``n_train`` of ``train``) and the validation region, if any."""

    train: TokenFile
    n_train: int
    val: TokenFile | None
    val_range: tuple[int, int] | None

    def sampler(self, opts: TrainOptions, world: World) -> WindowSampler:
        """This rank's training windows (--sampler)."""
        return make_sampler(
            opts.sampler,
            self.train.tokens,
            self.n_train,
            opts.seq,
            opts.batch,
            opts.seed,
            world.rank,
            world.world_size,
        )

    def eval_windows(self, opts: TrainOptions) -> list[torch.Tensor]:
        """The fixed validation batches (none without validation data or with evaluation off)."""
        if self.val is None or self.val_range is None or opts.eval_every <= 0 or opts.eval_batches <= 0:
            return []
        lo, hi = self.val_range
        distinct = hi - lo - opts.seq  # window starts in the validation region
        if opts.batch * opts.eval_batches > distinct:
            raise ConfigError(
                f"--eval-batches {opts.eval_batches} x --batch {opts.batch} validation windows are more than "
                f"the {distinct:,} different windows of {opts.seq + 1} tokens the validation data holds; "
                f"use --eval-batches {max(1, distinct // opts.batch)} or fewer"
            )
        return eval_windows(self.val.tokens, lo, hi, opts.seq, opts.batch, opts.eval_batches)


#: inputs of `anetrain prepare`, not token files
TEXT_SUFFIXES = (".txt", ".text", ".md", ".jsonl", ".json", ".csv", ".parquet")


def _looks_like_text(p: Path) -> bool:
    """UTF-8 without a zero byte in its first 4 KB: text (a uint16 token file's ids below 256 have a zero
    high byte, and random ids are not valid UTF-8)."""
    try:
        with open(p, "rb") as f:
            head = f.read(4096)
        codecs.getincrementaldecoder("utf-8")().decode(head)  # a character cut at 4 KB is fine
    except (OSError, UnicodeDecodeError):
        return False
    return bool(head) and b"\0" not in head


def refuse_text(path: str, flag: str) -> None:
    """A text file given where a token file belongs: say how to make one (one line)."""
    p = Path(path)
    if p.is_file() and (p.suffix.lower() in TEXT_SUFFIXES or _looks_like_text(p)):
        tok = "TOKENIZER.model"
        raise InputError(
            p,
            f"{flag} takes a token file, and this looks like text: tokenize it first, e.g. `anetrain prepare "
            f"{p} --tokenizer {tok} --out {p.with_suffix('.bin')}` (or train without --data for the "
            "embedded default)",
        )


def resolve_data(opts: TrainOptions, cfg: ModelConfig, tokenizer_fp: str | None) -> DataSplit:
    assert opts.data is not None
    window = opts.seq + 1
    refuse_text(opts.data, "--data")
    if opts.val_data:
        refuse_text(opts.val_data, "--val-data")
    train = open_tokens(opts.data)
    if opts.val_data:
        val = open_tokens(opts.val_data)
        check_tokens(train, vocab_size=cfg.vocab_size, window=window, tokenizer_fingerprint=tokenizer_fp)
        check_tokens(
            val,
            vocab_size=cfg.vocab_size,
            window=window,
            tokenizer_fingerprint=tokenizer_fp,
            what="validation",
        )
        return DataSplit(train, train.n, val, (0, val.n))
    n_val = int(train.n * opts.val_fraction)
    n_train = train.n - n_val
    check_tokens(
        train,
        vocab_size=cfg.vocab_size,
        window=window,
        tokenizer_fingerprint=tokenizer_fp,
        region=(0, n_train),
    )
    if n_val == 0:
        return DataSplit(train, n_train, None, None)
    if n_val < window:
        raise InputError(
            train.path,
            f"the held-out validation tail ({n_val} tokens, --val-fraction "
            f"{opts.val_fraction}) is shorter than one window of {window} tokens",
        )
    return DataSplit(train, n_train, train, (n_train, train.n))
