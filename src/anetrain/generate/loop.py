"""The generation loop of llama2.c's ``run.c``: prompt, then sampled tokens, streamed piece by piece.

The prompt is encoded with BOS. Starting from that BOS at position 0, each step feeds one token and picks
the next: the following prompt token while the prompt lasts, else a sampled one. ``steps`` counts
positions including the prompt's (0, or more than the model's seq_len, means seq_len). Generation stops
early when the next token is BOS (the story delimiter of the training data). Every token after the first
is reported with the bytes ``run.c`` prints for it, so the prompt's pieces come out too.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..errors import AnetrainError
from ..params import ModelParams
from ..tokenizer import Tokenizer
from .decoder import KVCacheDecoder
from .sampling import Sampler


@dataclass(frozen=True)
class GeneratedToken:
    token: int
    piece: bytes  # what run.c prints for it (tokenizer.decode_piece(previous, token))
    from_prompt: bool  # forced by the prompt rather than sampled


@dataclass
class GenerationResult:
    # Every piece run.c prints (prompt included), as UTF-8 with invalid bytes replaced. Unlike the CLI's
    # stdout, single-byte pieces that run.c's safe_printf would skip (control bytes, lone UTF-8 bytes of
    # byte-fallback characters) are kept, so that byte-fallback characters come out whole.
    text: str
    tokens: list[int]  # the whole sequence: BOS, the prompt's tokens, then the generated ones
    tokens_per_s: float  # run.c's measure: positions after the first, over the time since the first
    seed: int  # the sampler's seed (useful when it came from the clock)


class Generation:
    """An iterable over the tokens of one generation; afterwards ``tokens`` and ``tokens_per_s`` are set."""

    def __init__(
        self,
        params: ModelParams,
        tokenizer: Tokenizer,
        prompt: str = "",
        steps: int = 256,
        temperature: float = 1.0,
        top_p: float = 0.9,
        top_k: int = 0,
        seed: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        cfg = params.cfg
        tokenizer.check_covers(cfg.vocab_size)
        self.sampler = Sampler(temperature, top_p, top_k, seed)
        self.prompt_tokens = tokenizer.encode(prompt, bos=True)
        bad = [t for t in self.prompt_tokens if not 0 <= t < cfg.vocab_size]
        if bad:
            raise AnetrainError(
                f"the prompt has token {bad[0]}, outside the model's vocabulary of {cfg.vocab_size}"
            )
        self.steps = cfg.seq_len if steps <= 0 or steps > cfg.seq_len else steps
        self.tokenizer = tokenizer
        self.decoder = KVCacheDecoder(params, dtype, self.steps)
        self.tokens: list[int] = self.prompt_tokens[:1]
        self.positions = 0
        self.tokens_per_s = 0.0
        self._started = False

    @property
    def seed(self) -> int:
        return int(self.sampler.seed or 0)

    def __iter__(self) -> Iterator[GeneratedToken]:
        if self._started:
            raise RuntimeError("a Generation can be iterated once")
        self._started = True
        prompt, n_prompt = self.prompt_tokens, len(self.prompt_tokens)
        token = prompt[0]
        pos = 0
        start = 0.0
        while pos < self.steps:
            in_prompt = pos < n_prompt - 1
            logits = self.decoder.step(token, logits=not in_prompt)
            if in_prompt:
                nxt = prompt[pos + 1]
            else:
                assert logits is not None
                nxt = self.sampler.sample(logits.float().cpu().numpy())
            pos += 1
            self.positions = pos
            if nxt == self.tokenizer.bos_id:
                break
            piece = self.tokenizer.decode_piece(token, nxt)
            self.tokens.append(nxt)
            token = nxt
            if start == 0.0:
                start = time.perf_counter()
            else:
                self.tokens_per_s = (pos - 1) / max(time.perf_counter() - start, 1e-9)
            yield GeneratedToken(nxt, piece, in_prompt)
        if start and pos > 1:
            self.tokens_per_s = (pos - 1) / max(time.perf_counter() - start, 1e-9)


def stream(
    params: ModelParams,
    tokenizer: Tokenizer,
    prompt: str = "",
    steps: int = 256,
    temperature: float = 1.0,
    top_p: float = 0.9,
    top_k: int = 0,
    seed: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> Generation:
    """Tokens one at a time as they are produced (see :class:`Generation`)."""
    return Generation(params, tokenizer, prompt, steps, temperature, top_p, top_k, seed, dtype)


def generate(
    params: ModelParams,
    tokenizer: Tokenizer,
    prompt: str = "",
    steps: int = 256,
    temperature: float = 1.0,
    top_p: float = 0.9,
    top_k: int = 0,
    seed: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> GenerationResult:
    """Generate text as ``run.c`` does (module docstring); ``seed`` None or <= 0 seeds from the clock."""
    gen = stream(params, tokenizer, prompt, steps, temperature, top_p, top_k, seed, dtype)
    printed = b"".join(t.piece for t in gen)
    return GenerationResult(
        text=printed.decode("utf-8", errors="replace"),
        tokens=gen.tokens,
        tokens_per_s=gen.tokens_per_s,
        seed=gen.seed,
    )
