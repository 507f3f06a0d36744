"""Generation: the decoders against full recomputation, run.c's sampler and loop, the golden text.

Both decoders are checked: the native CPU kernels (``NativeDecoder``, built at first use) and the torch
operators (``TorchDecoder``, the fallback, and the only one for float64)."""

from __future__ import annotations

import statistics
import time

import numpy as np
import pytest
import torch

from anetrain.config import deepnet_alpha, make_config
from anetrain.errors import AnetrainError, InputError
from anetrain.formats import load_model
from anetrain.generate import (
    DecodeWeights,
    NativeDecoder,
    Sampler,
    TorchDecoder,
    XorShiftRng,
    generate,
    make_decoder,
    stream,
)
from anetrain.generate.native import sample_logits_native
from anetrain.params import ModelParams, init_params
from anetrain.reference import ReferenceModel
from anetrain.tokenizer import load_tokenizer
from conftest import shared_file

# llama2.c test_all.py's expected_stdout (run.c's output without its final "\n") for
# stories260K.bin + tok512.bin, -t 0.0 -n 200.
EXPECTED = (
    b"Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day,"
    b" she saw a big, red ball. She wanted to play with it, but it was too high.\nLily's mom said, \"Lily, "
    b"let's go to the park.\" Lily was sad and didn't know what to do. She said, \"I want to play with your"
    b" ball, but I can't find it.\"\nLily was sad and didn't know what to do. She said, \"I'm sorry, Lily. I"
    b" didn't know what to do.\"\nLily didn't want to help her mom, so she"
)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The torch decoder on one thread: tiny models on two threads of a busy machine crawl (native: see
    test_threads_give_identical_results for two threads)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def stories260k():
    return load_model(str(shared_file("stories260K.bin")))


@pytest.fixture(scope="module")
def tok512():
    return load_tokenizer(shared_file("tok512.bin"), 512)


def random_params(seed: int = 0, **cfg) -> ModelParams:
    """Random weights large enough that attention is far from uniform (a meaningful cache check)."""
    p = init_params(make_config(**cfg))
    g = torch.Generator().manual_seed(seed)
    p.decay.copy_(torch.randn(p.decay.shape, generator=g) * 0.25)
    p.no_decay.copy_(1 + 0.2 * torch.randn(p.no_decay.shape, generator=g))
    return p


SMALL_MODELS = {
    "gqa-alpha": dict(
        dim=48, hidden_dim=96, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=64, seq_len=40,
        residual_scale=0.5,
    ),
    "mha-untied": dict(
        dim=32, hidden_dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=64, seq_len=40,
        tied_classifier=False,
    ),
    "head-dim-gqa-deepnet": dict(
        dim=32, hidden_dim=80, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=64, seq_len=40,
        tied_classifier=False, residual_scale=deepnet_alpha(3),
    ),
}  # fmt: skip


# ---- the forward pass with a KV cache ---------------------------------------------------------------

DECODERS = ["native", "native-generic", "torch"]


def make(
    params: ModelParams,
    kind: str,
    dtype: str = "fp32",
    n_streams: int = 1,
    cache_len: int | None = None,
    threads: int = 1,
):
    w = DecodeWeights.from_params(params, dtype)
    if kind == "torch":
        return TorchDecoder(w, n_streams, cache_len)
    variant = "generic" if kind == "native-generic" else "native"
    return NativeDecoder(w, n_streams, cache_len, threads=threads, variant=variant)


def one_at_a_time(dec, tokens: list[int]) -> np.ndarray:
    return np.concatenate([dec.forward([t], [0], [p], [0]) for p, t in enumerate(tokens)])


@pytest.mark.parametrize("name", list(SMALL_MODELS))
def test_kv_cache_equals_full_recompute_float64(name: str) -> None:
    params = random_params(**SMALL_MODELS[name])
    tokens = torch.randint(0, 64, (40,), generator=torch.Generator().manual_seed(1))
    ref = ReferenceModel.from_params(params, dtype=torch.float64)
    with torch.no_grad():
        full = ref(tokens[None])[0].numpy()  # [S, V]: position t sees tokens 0..t
    assert np.abs(full).max() > 1.0  # logits are not trivially small
    dec = TorchDecoder(DecodeWeights.from_params(params, "fp64"))
    np.testing.assert_allclose(one_at_a_time(dec, tokens.tolist()), full, rtol=0, atol=1e-9)
    dec = TorchDecoder(DecodeWeights.from_params(params, "fp64"))  # the prompt in one pass: the same
    np.testing.assert_allclose(dec.forward(tokens.tolist(), [0] * 40, range(40), range(40)), full, atol=1e-9)


@pytest.mark.parametrize("kind", DECODERS)
@pytest.mark.parametrize("name", list(SMALL_MODELS))
def test_float32_decoders_equal_full_recompute(name: str, kind: str) -> None:
    """GQA, head_dim != D/H, untied classifier, residual scale: token by token and as one prefill, the float32
    decoders (native AVX-512, native portable, torch) agree with float64 recomputation."""
    params = random_params(**SMALL_MODELS[name])
    tokens = torch.randint(0, 64, (40,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = ReferenceModel.from_params(params, dtype=torch.float64)(tokens[None])[0].numpy()
    np.testing.assert_allclose(one_at_a_time(make(params, kind), tokens.tolist()), full, rtol=0, atol=2e-5)
    prefill = make(params, kind).forward(tokens.tolist(), [0] * 40, list(range(40)), list(range(40)))
    np.testing.assert_allclose(prefill, full, rtol=0, atol=2e-5)


def test_long_prompts_are_fed_in_chunks() -> None:
    """A prompt longer than the native decoder's 64-row workspace is fed in chunks: same logits as torch's."""
    params = random_params(**{**SMALL_MODELS["mha-untied"], "seq_len": 160})
    tokens = np.random.default_rng(9).integers(0, 64, 150).tolist()
    rows = list(range(150))
    native = make(params, "native").forward(tokens, [0] * 150, rows, [0, 63, 64, 127, 128, 149])
    torch_ = make(params, "torch").forward(tokens, [0] * 150, rows, [0, 63, 64, 127, 128, 149])
    np.testing.assert_allclose(native, torch_, rtol=0, atol=2e-5)


@pytest.mark.parametrize("kind", DECODERS)
def test_streams_are_independent(kind: str) -> None:
    """A batch of streams at different positions gives each stream what it would get alone."""
    params = random_params(**SMALL_MODELS["gqa-alpha"])
    rng = np.random.default_rng(3)
    seqs = [rng.integers(0, 64, n).tolist() for n in (7, 12, 3)]
    alone = [one_at_a_time(make(params, kind), s) for s in seqs]
    dec = make(params, kind, n_streams=3)
    for s, seq in enumerate(seqs):  # prefill each stream but its last token
        dec.forward(seq[:-1], [s] * (len(seq) - 1), list(range(len(seq) - 1)))
    last = dec.forward([q[-1] for q in seqs], [0, 1, 2], [len(q) - 1 for q in seqs], [0, 1, 2])
    np.testing.assert_allclose(last, np.stack([a[-1] for a in alone]), rtol=0, atol=1e-5)
    dec.copy_stream(2, 0, 2)  # stream 0 continues stream 2's first two positions
    np.testing.assert_allclose(dec.forward([seqs[2][2]], [0], [2], [0])[0], alone[2][2], rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_threads_give_identical_results(dtype: str) -> None:
    """Two threads split the work differently but compute every number the same way: bitwise equal."""
    params = random_params(**SMALL_MODELS["head-dim-gqa-deepnet"])
    tokens = np.random.default_rng(5).integers(0, 64, 30).tolist()
    out = []
    for threads in (1, 2):
        dec = make(params, "native", dtype, n_streams=2, threads=threads)
        first = dec.forward(tokens, [0] * 30, list(range(30)), list(range(30)))
        dec.copy_stream(0, 1, 30)
        out.append(np.concatenate([first, dec.forward([3, 4], [0, 1], [30, 30], [0, 1])]))
    assert np.array_equal(out[0], out[1])


def test_stories260k_float32_is_accurate_well_inside_the_near_tie(stories260k) -> None:
    """On the greedy path, top-1 beats top-2 by 0.0042 at one step; float32 must stay far below that."""
    tokens = generate(stories260k.params, load_tokenizer(shared_file("tok512.bin")), steps=200, temperature=0)
    seq = torch.tensor(tokens.tokens[:200])
    with torch.no_grad():
        exact = ReferenceModel.from_params(stories260k.params, dtype=torch.float64)(seq[None])[0]
    top2 = exact.topk(2, dim=-1).values
    margin = top2[:, 0] - top2[:, 1]
    assert 0.003 < float(margin.min()) < 0.005 and int(margin.argmin()) == 185
    for kind in DECODERS:
        approx = torch.from_numpy(one_at_a_time(make(stories260k.params, kind), seq.tolist())).double()
        assert float((approx - exact).abs().max()) < 1e-4, kind
        assert torch.equal(approx.argmax(-1), exact.argmax(-1)), kind


@pytest.mark.parametrize("kind", DECODERS)
def test_context_is_limited_to_seq_len(kind: str) -> None:
    params = random_params(**{**SMALL_MODELS["gqa-alpha"], "seq_len": 4})
    dec = make(params, kind)
    for t in range(4):
        dec.forward([t], [0], [t])
    with pytest.raises(AnetrainError, match="context is full"):
        dec.forward([0], [0], [4])
    with pytest.raises(AnetrainError, match="outside the model's vocabulary"):
        make(params, kind).forward([64], [0], [0])


def test_per_token_time_does_not_grow_with_position() -> None:
    """Tokens 200..210 cost about what tokens 10..20 cost (full recomputation would be ~20x slower)."""
    params = random_params(
        dim=256, hidden_dim=512, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=256, seq_len=256
    )
    ratios = []
    for _attempt in range(3):
        dec = make_decoder(DecodeWeights.from_params(params), 1, 256)
        times = []
        for pos in range(211):
            t0 = time.perf_counter()
            dec.forward([pos % 256], [0], [pos], [0])
            times.append(time.perf_counter() - t0)
        ratios.append(statistics.median(times[200:211]) / statistics.median(times[10:21]))
        if ratios[-1] < 3:
            break
    assert min(ratios) < 3, ratios


# ---- run.c's sampler ------------------------------------------------------------------------------------


def test_xorshift_matches_runc() -> None:
    """Values printed by run.c's random_u32 / random_f32 compiled with gcc."""
    rng = XorShiftRng(42)
    assert [rng.u32() for _ in range(5)] == [1456360119, 3359763283, 3393612768, 4054632243, 3283045847]
    rng = XorShiftRng(1234567890123)
    assert [float(rng.f32()) for _ in range(3)] == pytest.approx(
        [0.936711371, 0.709576666, 0.291406035], abs=1e-9
    )
    with pytest.raises(AnetrainError, match="must not be 0"):
        XorShiftRng(0)


# run.c's sample() (transcribed to C and compiled with gcc), 20 draws over fixed logits.
SMALL_LOGITS = np.array([2.0, 1.5, 0.3, -1.0, 1.9, 0.0, -0.5, 1.0], dtype=np.float32)
C_DRAWS = {
    (1.0, 0.9, 42): [4, 1, 1, 2, 1, 7, 0, 4, 0, 1, 4, 4, 7, 0, 0, 4, 0, 0, 2, 4],
    (1.0, 0.0, 42): [1, 4, 4, 7, 4, 5, 0, 1, 1, 4, 1, 1, 6, 0, 0, 4, 1, 1, 7, 1],
    (0.7, 0.5, 7): [4, 4, 0, 0, 0, 0, 4, 0, 0, 4, 4, 4, 4, 4, 0, 0, 4, 4, 0, 4],
    (1.5, 0.95, 123456789): [5, 1, 4, 0, 1, 4, 1, 1, 4, 5, 2, 1, 1, 4, 6, 4, 0, 5, 4, 0],
}


@pytest.mark.parametrize("key", list(C_DRAWS), ids=[f"t{t}-p{p}-s{s}" for t, p, s in C_DRAWS])
def test_sampler_matches_runc(key) -> None:
    temperature, top_p, seed = key
    sampler = Sampler(temperature=temperature, top_p=top_p, seed=seed)
    assert [sampler.sample(SMALL_LOGITS) for _ in range(20)] == C_DRAWS[key]
    state = np.array([seed], dtype=np.uint64)  # the native sampler, one draw at a time
    assert [
        sample_logits_native(SMALL_LOGITS, temperature, top_p, 0, state)[0] for _ in range(20)
    ] == C_DRAWS[key]


@pytest.mark.parametrize(
    "settings", [(1.0, 0.9, 0), (0.8, 0.0, 0), (1.2, 0.95, 40), (0.7, 1.0, 5), (0.0, 0.9, 0)]
)
def test_native_sampler_equals_python_sampler(settings) -> None:
    """Over vocabulary-sized logits (with ties), the C sampler draws what the Python one does."""
    temperature, top_p, top_k = settings
    rng = np.random.default_rng(11)
    logits = rng.normal(0, 3, (200, 2000)).astype(np.float32)
    logits[:, 100:110] = logits[:, 5:6]  # equal logits: top-k and sorting keep index order
    seeds = rng.integers(1, 2**63, 200, dtype=np.uint64)
    want = [
        Sampler(temperature, top_p, top_k, int(s)).sample(row) for row, s in zip(logits, seeds, strict=True)
    ]
    assert sample_logits_native(logits, temperature, top_p, top_k, seeds.copy()) == want


def test_temperature_zero_is_first_argmax() -> None:
    assert Sampler(temperature=0, seed=1).sample(np.array([0.5, 2.0, 2.0, 1.0], dtype=np.float32)) == 1


def test_top_k_and_top_p_restrict_the_candidates() -> None:
    logits = np.random.default_rng(0).normal(0, 2, 300).astype(np.float32)
    order = np.argsort(-logits)
    top3 = set(order[:3].tolist())
    k_draws = {Sampler(top_k=3, top_p=0, seed=s).sample(logits) for s in range(1, 400)}
    assert k_draws <= top3 and len(k_draws) == 3
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    nucleus = set(order[: int(np.searchsorted(np.cumsum(probs[order]), 0.5)) + 1].tolist())
    p_draws = {Sampler(top_p=0.5, seed=s).sample(logits) for s in range(1, 400)}
    assert p_draws <= nucleus and len(p_draws) > 1


def test_bad_sampling_settings_are_refused() -> None:
    for kwargs, msg in [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 1.5}, "top-p"),
        ({"top_k": -2}, "top-k"),
    ]:
        with pytest.raises(AnetrainError, match=msg):
            Sampler(seed=1, **kwargs)


# ---- the generation loop -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "backend"), [(torch.float32, "native"), (torch.float32, "torch"), (torch.float64, "auto")]
)
def test_greedy_golden_text(stories260k, tok512, dtype, backend) -> None:
    r = generate(stories260k.params, tok512, steps=200, temperature=0, dtype=dtype, backend=backend)
    assert r.stats is not None and r.stats.backend.startswith("native" if backend == "native" else "torch")
    assert r.text.encode("utf-8") == EXPECTED
    assert len(r.tokens) == 201 and r.tokens[0] == 1 and 1 not in r.tokens[1:]
    assert r.tokens_per_s > 0


def test_prompt_is_forced_and_printed(stories260k, tok512) -> None:
    prompt_ids = tok512.encode("Once upon a time")
    r = generate(stories260k.params, tok512, prompt="Once upon a time", steps=30, temperature=0)
    assert r.tokens[: len(prompt_ids)] == prompt_ids and len(r.tokens) == 31
    # The greedy path from BOS starts with these very tokens, so the text is the golden's beginning.
    assert EXPECTED.startswith(r.text.encode()) and r.text.startswith("Once upon a time, there")
    pieces = list(stream(stories260k.params, tok512, prompt="Once upon a time", steps=8, temperature=0))
    assert [p.from_prompt for p in pieces] == [True] * 4 + [False] * 4
    assert pieces[0].piece == b"Once"  # the space after BOS is dropped, as run.c prints it


def test_sampling_is_reproducible_with_a_seed(stories260k, tok512) -> None:
    kw = dict(steps=60, temperature=1.0, top_p=0.9, top_k=40)
    a = generate(stories260k.params, tok512, seed=1234, **kw)
    b = generate(stories260k.params, tok512, seed=1234, **kw)
    c = generate(stories260k.params, tok512, seed=1235, **kw)
    assert a.tokens == b.tokens and a.text == b.text and a.seed == 1234
    assert a.tokens != c.tokens
    greedy = generate(stories260k.params, tok512, steps=60, temperature=0)
    assert generate(stories260k.params, tok512, steps=60, top_k=1, seed=9).tokens == greedy.tokens


def test_steps_are_clamped_to_seq_len(stories260k, tok512) -> None:
    short = ModelParams(stories260k.cfg.with_(seq_len=24), stories260k.params.flat)
    for steps in (0, 24, 1000):
        gen = stream(short, tok512, steps=steps, temperature=0)
        list(gen)
        assert gen.positions == 24 and len(gen.tokens) == 25
    text = generate(short, tok512, steps=0, temperature=0).text.encode()
    assert len(text) > 50 and EXPECTED.startswith(text)  # the golden's first 24 positions


def test_generation_stops_when_bos_is_sampled(stories260k, tok512) -> None:
    gen = stream(stories260k.params, tok512, steps=0, temperature=0)
    text = b"".join(t.piece for t in gen)
    assert gen.positions == 346 < stories260k.cfg.seq_len  # the 346th step produced BOS
    assert len(gen.tokens) == 346 and 1 not in gen.tokens[1:]
    assert text.endswith(b'You are a good friend."')


def test_tokenizers_that_do_not_fit_the_model_are_refused(stories260k) -> None:
    small = load_tokenizer(shared_file("tok512.bin"), vocab_size=300)
    with pytest.raises(InputError, match="fewer than the model's vocabulary of 512"):
        generate(stories260k.params, small, steps=5)
    big = load_tokenizer(shared_file("tokenizer.bin"))  # 32000 entries: prompts can exceed the model's 512
    with pytest.raises(AnetrainError, match="outside the model's vocabulary of 512"):
        generate(stories260k.params, big, prompt="Zebras", steps=5)
