"""The generation loop of llama2.c's ``run.c``, with the prompt fed in one pass and N streams decoded at once.

The prompt is encoded with BOS. Positions are counted as run.c counts them: feeding the token at position
``pos`` gives the next token, the following prompt token while the prompt lasts, else a sampled one; ``steps``
is the number of positions fed, prompt included (0, or more than the model's seq_len, means seq_len).
Generation stops early when the next token is BOS (the story delimiter of the training data). Every token
after the first is reported with the bytes ``run.c`` prints for it, so the prompt's pieces come out too.

Unlike run.c, the prompt is fed in one batched forward pass (prefill), and ``num_samples`` streams continue it
together, one batched decode step per position: stream 0 draws from the seed itself (so one sample is exactly
run.c's), stream s > 0 from ``sampling.stream_seed(seed, s)``. A stream that reaches BOS leaves the batch.

Timing: ``prefill_s`` covers the prompt's forward pass and the first draw; ``decode_s`` everything after it,
including the consumer's handling of the yielded tokens (as run.c's timer includes its printing). With a
one-token prompt, the decode rate is run.c's "achieved tok/s".
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import AnetrainError
from ..params import ModelParams
from ..tokenizer import Tokenizer
from .backend import Decoder, make_decoder
from .sampling import Sampler, stream_seed
from .weights import DecodeWeights, dtype_name


@dataclass(frozen=True)
class GeneratedToken:
    token: int
    piece: bytes  # what run.c prints for it (tokenizer.decode_piece(previous, token))
    from_prompt: bool  # forced by the prompt rather than sampled
    stream: int = 0  # which of the num_samples streams


@dataclass
class SampleResult:
    """One stream's outcome."""

    stream: int
    seed: int  # its xorshift seed
    tokens: list[int]  # BOS, the prompt's tokens, then the generated ones
    pieces: list[bytes] = field(default_factory=list)  # what run.c prints, token by token
    positions: int = 0  # positions fed (run.c's pos at the end)
    stopped_at_bos: bool = False

    @property
    def text(self) -> str:
        """Every piece (prompt included), as UTF-8 with invalid bytes replaced; see GenerationResult.text."""
        return b"".join(self.pieces).decode("utf-8", errors="replace")


@dataclass
class GenerationStats:
    dtype: str
    backend: str  # the decoder's description
    threads: int
    streams: int
    prompt_tokens: int = 0  # fed in the prefill
    prefill_s: float = 0.0
    decode_steps: int = 0  # batched decode steps (positions fed after the prefill)
    decode_tokens: int = 0  # tokens those steps produced, all streams together
    decode_s: float = 0.0
    note: str = ""  # why the native kernels were not used, if they were not

    @property
    def decode_tokens_per_s(self) -> float:
        """All streams together."""
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def stream_tokens_per_s(self) -> float:
        """Per stream: decode steps per second."""
        return self.decode_steps / self.decode_s if self.decode_s > 0 else 0.0

    def line(self) -> str:
        """One line for stderr."""
        per = f", {self.stream_tokens_per_s:.1f} tok/s per stream" if self.streams > 1 else ""
        s = (
            f"prefill: {self.prompt_tokens} tokens in {1e3 * self.prefill_s:.1f} ms; "
            f"decode: {self.decode_tokens} tokens in {self.decode_s:.3f} s, "
            f"{self.decode_tokens_per_s:.1f} tok/s"
            f" ({self.streams} stream{'s' if self.streams > 1 else ''}{per}); dtype {self.dtype}, "
            f"{self.threads} thread{'s' if self.threads > 1 else ''}, {self.backend}"
        )
        return s + (f"; {self.note}" if self.note else "")


@dataclass
class GenerationResult:
    # Stream 0's printed pieces (prompt included), as UTF-8 with invalid bytes replaced. Unlike the CLI's
    # stdout, single-byte pieces that run.c's safe_printf would skip (control bytes, lone UTF-8 bytes of
    # byte-fallback characters) are kept, so that byte-fallback characters come out whole.
    text: str
    tokens: list[int]  # stream 0: BOS, the prompt's tokens, then the generated ones
    tokens_per_s: float  # decode tokens/s of all streams (one stream: run.c's measure)
    seed: int  # the sampler's seed (useful when it came from the clock)
    samples: list[SampleResult] = field(default_factory=list)  # every stream, stream 0 first
    stats: GenerationStats | None = None


def decode_weights(model: ModelParams | DecodeWeights, dtype: str | torch.dtype | None) -> DecodeWeights:
    """``model`` in the precision ``dtype`` (None: fp32, or the weights' own)."""
    if isinstance(model, DecodeWeights):
        if dtype is not None and dtype_name(dtype) != model.dtype:
            raise AnetrainError(f"the weights are {model.dtype}, not {dtype_name(dtype)}")
        return model
    return DecodeWeights.from_params(model, "fp32" if dtype is None else dtype)


class Generation:
    """An iterable over the tokens of one generation (all streams, in order of position then stream).

    Afterwards ``tokens``, ``positions`` and ``tokens_per_s`` describe stream 0, ``samples`` every stream and
    ``stats`` the timings."""

    def __init__(
        self,
        model: ModelParams | DecodeWeights,
        tokenizer: Tokenizer,
        prompt: str = "",
        steps: int = 256,
        temperature: float = 1.0,
        top_p: float = 0.9,
        top_k: int = 0,
        seed: int | None = None,
        dtype: str | torch.dtype | None = None,
        num_samples: int = 1,
        backend: str = "auto",
        threads: int | None = None,
        decoder: Decoder | None = None,
    ) -> None:
        weights = decode_weights(model, dtype)
        cfg = weights.cfg
        tokenizer.check_covers(cfg.vocab_size)
        if num_samples < 1:
            raise AnetrainError(f"--num-samples must be at least 1, got {num_samples}")
        self.sampler = Sampler(temperature, top_p, top_k, seed)
        self.prompt_tokens = tokenizer.encode(prompt, bos=True)
        bad = [t for t in self.prompt_tokens if not 0 <= t < cfg.vocab_size]
        if bad:
            raise AnetrainError(
                f"the prompt has token {bad[0]}, outside the model's vocabulary of {cfg.vocab_size}"
            )
        self.steps = cfg.seq_len if steps <= 0 or steps > cfg.seq_len else steps
        self.tokenizer = tokenizer
        self.num_samples = num_samples
        self.decoder = decoder or make_decoder(weights, num_samples, self.steps, backend, threads)
        base = int(self.sampler.seed or 0)
        self.states = np.array([stream_seed(base, s) for s in range(num_samples)], dtype=np.uint64)
        self.samples = [
            SampleResult(s, int(self.states[s]), self.prompt_tokens[:1]) for s in range(num_samples)
        ]
        self.stats = GenerationStats(
            dtype=weights.dtype,
            backend=self.decoder.description,
            threads=self.decoder.threads,
            streams=num_samples,
            note=getattr(self.decoder, "note", ""),
        )
        self._started = False

    @property
    def seed(self) -> int:
        return int(self.sampler.seed or 0)

    @property
    def tokens(self) -> list[int]:
        return self.samples[0].tokens

    @property
    def positions(self) -> int:
        return self.samples[0].positions

    @property
    def tokens_per_s(self) -> float:
        return self.stats.decode_tokens_per_s

    def _emit(self, s: int, nxt: int, from_prompt: bool) -> GeneratedToken | None:
        """Record stream s's next token; None when it is BOS (the stream stops)."""
        sample = self.samples[s]
        sample.positions += 1
        if nxt == self.tokenizer.bos_id:
            sample.stopped_at_bos = True
            return None
        piece = self.tokenizer.decode_piece(sample.tokens[-1], nxt)
        sample.tokens.append(nxt)
        sample.pieces.append(piece)
        return GeneratedToken(nxt, piece, from_prompt, s)

    def __iter__(self) -> Iterator[GeneratedToken]:
        if self._started:
            raise RuntimeError("a Generation can be iterated once")
        self._started = True
        dec, smp, st = self.decoder, self.sampler, self.stats
        prompt, steps, n = self.prompt_tokens, self.steps, self.num_samples
        streams = list(range(n))

        # Prefill: the prompt's positions in one pass (only as many as steps allows), then the first draw.
        n_feed = min(len(prompt), steps)
        sample_first = len(prompt) <= steps
        t0 = time.perf_counter()
        logits = dec.forward(
            prompt[:n_feed], [0] * n_feed, list(range(n_feed)), [n_feed - 1] if sample_first else []
        )
        for s in streams[1:]:
            dec.copy_stream(0, s, n_feed)
        first = (
            dec.sample(
                np.repeat(logits, n, axis=0), streams, smp.temperature, smp.top_p, smp.top_k, self.states
            )
            if sample_first
            else []
        )
        st.prompt_tokens = n_feed
        st.prefill_s = time.perf_counter() - t0

        # The prompt's own tokens come out first (run.c prints them as it forces them).
        for i in range(1, n_feed):
            if prompt[i] == self.tokenizer.bos_id:
                for s in streams:
                    self._emit(s, prompt[i], True)
                return
            for s in streams:
                tok = self._emit(s, prompt[i], True)
                assert tok is not None
                yield tok
        if not sample_first:
            return
        t1 = time.perf_counter()
        active = []
        for s in streams:
            tok = self._emit(s, first[s], False)
            if tok is not None:
                active.append(s)
                yield tok
        pos = len(prompt)  # where the tokens just drawn are fed
        while active and pos < steps:
            current = [self.samples[s].tokens[-1] for s in active]
            nxt = dec.decode(
                current, active, [pos] * len(active), smp.temperature, smp.top_p, smp.top_k, self.states
            )
            pos += 1
            st.decode_steps += 1
            st.decode_tokens += len(active)
            still = []
            for s, t in zip(active, nxt, strict=True):
                tok = self._emit(s, t, False)
                if tok is not None:
                    still.append(s)
                    yield tok
            active = still
            st.decode_s = time.perf_counter() - t1
        st.decode_s = time.perf_counter() - t1

    def result(self) -> GenerationResult:
        """Run to the end (if not yet) and collect the outcome."""
        if not self._started:
            for _ in self:
                pass
        first = self.samples[0]
        return GenerationResult(
            text=first.text,
            tokens=first.tokens,
            tokens_per_s=self.tokens_per_s,
            seed=self.seed,
            samples=self.samples,
            stats=self.stats,
        )


def stream(
    model: ModelParams | DecodeWeights,
    tokenizer: Tokenizer,
    prompt: str = "",
    steps: int = 256,
    temperature: float = 1.0,
    top_p: float = 0.9,
    top_k: int = 0,
    seed: int | None = None,
    dtype: str | torch.dtype | None = None,
    num_samples: int = 1,
    backend: str = "auto",
    threads: int | None = None,
) -> Generation:
    """Tokens one at a time as they are produced (see :class:`Generation`)."""
    return Generation(
        model, tokenizer, prompt, steps, temperature, top_p, top_k, seed, dtype, num_samples, backend, threads
    )


def generate(
    model: ModelParams | DecodeWeights,
    tokenizer: Tokenizer,
    prompt: str = "",
    steps: int = 256,
    temperature: float = 1.0,
    top_p: float = 0.9,
    top_k: int = 0,
    seed: int | None = None,
    dtype: str | torch.dtype | None = None,
    num_samples: int = 1,
    backend: str = "auto",
    threads: int | None = None,
) -> GenerationResult:
    """Generate text as ``run.c`` does (module docstring); ``seed`` None or <= 0 seeds from the clock."""
    gen = stream(
        model, tokenizer, prompt, steps, temperature, top_p, top_k, seed, dtype, num_samples, backend, threads
    )
    return gen.result()
