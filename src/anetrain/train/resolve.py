"""What a run trains and on what: the model (preset, config file or weights file) and the train/validation
token data."""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import PRESETS, ModelConfig, deepnet_alpha, load_config_file
from ..data.sampler import WindowSampler, eval_starts, eval_windows, gather_masks, make_sampler
from ..data.tokens import TokenFile, check_tokens, open_tokens
from ..distributed import World
from ..errors import ConfigError, InputError
from ..optim import AdamState
from ..params import ModelParams, init_params
from .options import TrainOptions

# ------------------------------------------------------------------------------------------------
# Model and data resolution


def is_config_spec(spec: str) -> bool:
    """A preset or a model config file (a new model), as opposed to weights to start from."""
    return spec in PRESETS or (spec.lower().endswith((".toml", ".json")) and not Path(spec).is_dir())


def _named_config(spec: str, alpha: str | None) -> ModelConfig | None:
    """The config a preset name or a .toml/.json config file gives (with --residual-scale applied), or None
    when ``spec`` names something else (a weights file)."""
    if not is_config_spec(spec):
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


@dataclass
class ResolvedModel:
    """What --model names: the config, fresh or pretrained params, the optimizer state if the file has one,
    a description for the log, and for weights read from disk their local path and (Hugging Face) source."""

    cfg: ModelConfig
    params: ModelParams
    optimizer: AdamState | None
    what: str
    path: Path | None = None
    source: dict | None = None


def resolve_model(opts: TrainOptions, hf_dtype: torch.dtype = torch.float32) -> ResolvedModel:
    """The model --model names (``hf_dtype``: the dtype a Hugging Face model is read into)."""
    spec, alpha = opts.model, opts.residual_scale
    cfg = _named_config(spec, alpha)
    if cfg is not None:
        return ResolvedModel(
            cfg, init_params(cfg, opts.init, opts.seed), None, f"{cfg.name} from scratch ({opts.init} init)"
        )
    from ..formats.hub import local_path, looks_like_repo_id

    if not Path(spec).exists() and not looks_like_repo_id(spec):
        raise ConfigError(
            f"--model {spec!r} is neither a preset ({', '.join(PRESETS)}), a .toml/.json config, "
            "an existing weights file nor a Hugging Face Hub id (owner/name)"
        )
    if alpha is not None:
        raise ConfigError("--residual-scale applies to new models only; a weights file carries its own")
    from ..formats import load_model

    path = local_path(spec)
    loaded = load_model(path, hf_dtype=hf_dtype)
    return ResolvedModel(
        loaded.cfg, loaded.params, loaded.optimizer, f"{spec} ({loaded.format})", path, loaded.source
    )


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

    def eval_batches(self, opts: TrainOptions) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """The validation batches with their loss masks (None where the validation data has no mask)."""
        windows = self.eval_windows(opts)
        if not windows or self.val is None or self.val.mask is None or self.val_range is None:
            return [(w, None) for w in windows]
        lo, hi = self.val_range
        starts = eval_starts(lo, hi, opts.seq, opts.batch, opts.eval_batches)
        return [(w, gather_masks(self.val.mask, s, opts.seq)) for w, s in zip(windows, starts, strict=True)]

    @property
    def masked(self) -> bool:
        """Whether the training data has a loss mask (instruction data)."""
        return self.train.mask is not None

    def loss_mask(self, sampler: WindowSampler, seq: int) -> torch.Tensor | None:
        """The loss mask of the sampler's last batch ([B, S] bool), None for unmasked data."""
        if self.train.mask is None:
            return None
        return gather_masks(self.train.mask, sampler.last_positions, seq)


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
