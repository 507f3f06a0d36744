"""bf16 and int8 generation against float32, and the int8 format against runq.c's rules.

Quality, on stories260K: teacher-forced cross-entropy over validation text within 1% (bf16) / 2% (int8) of
float32's, and the first 50 greedy tokens equal to float32's, on the native kernels and the torch path.
Format: matmul inputs quantized as runq.c's quantize() does (scale = max|x| / 127, halves away from zero),
weights quantized on load as llama2.c's export.py does (the same scale, halves to even), group sizes as the
exporter picks them, llama2.c v2 files used as stored; the int8 and bf16 kernels against plain references.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anetrain.config import make_config
from anetrain.errors import ConfigError, InputError
from anetrain.formats import load_model
from anetrain.formats.llama2c import HEADER_SIZE, write_llama2c
from anetrain.formats.q80 import quantize_q80
from anetrain.generate import DecodeWeights, NativeDecoder, TorchDecoder, generate, make_decoder
from anetrain.generate.quant import q8_linear, quantize_rows
from anetrain.generate.weights import Matrix, q8_group_size
from anetrain.params import init_params
from anetrain.tokenizer import load_tokenizer
from conftest import shared_file

VARIANTS = ["native", "generic"]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def stories260k():
    return load_model(str(shared_file("stories260K.bin")))


def cross_entropy(decoder_for, tokens: np.ndarray, windows: int = 4, length: int = 256) -> float:
    """Mean next-token cross-entropy over ``windows`` consecutive windows of ``length`` tokens."""
    total = 0.0
    for k in range(windows):
        seq = tokens[k * length : (k + 1) * length + 1].astype(np.int64).tolist()
        logits = decoder_for().forward(seq[:-1], [0] * length, list(range(length)), list(range(length)))
        lg = logits.astype(np.float64)
        top = lg.max(axis=1, keepdims=True)
        lse = np.log(np.exp(lg - top).sum(axis=1)) + top[:, 0]
        total += float((lse - lg[np.arange(length), seq[1:]]).sum())
    return total / (windows * length)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_bf16_and_int8_cross_entropy_stay_close_to_float32(stories260k, backend: str) -> None:
    tokens = np.fromfile(shared_file("derived/tinystories_valid_head.tok512.bin"), dtype=np.uint16)
    ce = {}
    for dtype in ("fp32", "bf16", "int8"):
        w = DecodeWeights.from_params(stories260k.params, dtype)
        ce[dtype] = cross_entropy(lambda w=w: make_decoder(w, 1, 256, backend, threads=1), tokens)
    assert 1.2 < ce["fp32"] < 1.7  # a trained model on its own kind of text (1.4296 measured)
    assert abs(ce["bf16"] - ce["fp32"]) / ce["fp32"] < 0.01, ce
    assert abs(ce["int8"] - ce["fp32"]) / ce["fp32"] < 0.02, ce


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_first_50_greedy_tokens_equal_float32s(stories260k, backend: str) -> None:
    tok = load_tokenizer(shared_file("tok512.bin"), 512)
    ref = generate(stories260k.params, tok, steps=50, temperature=0, dtype="fp32").tokens
    assert len(ref) == 51
    for dtype in ("bf16", "int8"):
        got = generate(
            stories260k.params, tok, steps=50, temperature=0, dtype=dtype, backend=backend, threads=1
        )
        assert got.tokens == ref, dtype  # no divergence to justify: equal on all 50


# ---- the int8 format ------------------------------------------------------------------------------------


def test_inputs_are_quantized_as_runq_does() -> None:
    """scale = max|x| / 127 per group; q = round(x / scale) with C's round(): halves away from zero."""
    x = torch.tensor([[127.0, 2.5, -2.5, 0.5, -0.5, 1.5, -1.5, 0.0], [0.0] * 8, [-3.0, 1.0, 0.0, 0.0] * 2])
    q, s = quantize_rows(x, 8)
    assert q.tolist() == [
        [127, 3, -3, 1, -1, 2, -2, 0],  # scale 127 / 127 = 1: every half goes away from zero
        [0] * 8,  # an all-zero group: scale 0 and q 0 (runq.c would divide by zero)
        [-127, 42, 0, 0, -127, 42, 0, 0],  # 1 / (3 / 127) = 42.33
    ]
    assert s[:, 0].tolist() == [1.0, 0.0, float(np.float32(3.0) / np.float32(127.0))]


@pytest.mark.parametrize("variant", VARIANTS)
def test_native_kernels_quantize_inputs_as_runq_does(variant: str) -> None:
    """W = the identity in Q8_0 (q = 1, scale 1) returns each input's quantized value times its scale."""
    n = 64
    cfg = make_config(dim=n, hidden_dim=n, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=16, seq_len=8)
    dec = NativeDecoder(DecodeWeights.from_params(init_params(cfg), "int8", 32), threads=1, variant=variant)
    eye = Matrix(torch.eye(n, dtype=torch.int8), torch.ones(n, n // 32))
    x = np.zeros((2, n), dtype=np.float32)
    x[0, :8] = [127.0, 2.5, -2.5, 0.5, -0.5, 1.5, -1.5, 100.25]  # scale 1: ties and a plain value
    x[1, 32:36] = [3.0, -1.0, 1.0, 0.0]  # scale 3/127 in the second group; the first group all zero
    out = dec.linear(eye, x)
    q, s = quantize_rows(torch.from_numpy(x), 32)
    assert out[0, :8].tolist() == [127, 3, -3, 1, -1, 2, -2, 100]
    np.testing.assert_array_equal(out, (q.float().view(2, 2, 32) * s[:, :, None]).view(2, n).numpy())


def test_weights_are_quantized_on_load_as_llama2c_exports() -> None:
    cfg = make_config(dim=64, hidden_dim=128, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=32, seq_len=8)
    params = init_params(cfg, "llama2c", 3)
    params.layers[0].wq[0, :4] = torch.tensor([127.0, 2.5, -2.5, 0.5]) * 1e-3  # max of its group: 0.127
    w = DecodeWeights.from_params(params, "int8")
    assert w.group_size == 64
    q, s, _ = quantize_q80(params.layers[0].wq, 64)
    assert torch.equal(w.layers[0].wq.w, q.view(64, 64)) and torch.equal(w.layers[0].wq.s, s.view(64, 1))
    assert w.layers[0].wq.s[0, 0] == np.float32(0.127) / np.float32(127.0)
    assert w.layers[0].wq.w[0, :4].tolist() == [127, 2, -2, 0]  # export.py's torch.round: halves to even


def test_group_sizes_are_the_exporters() -> None:
    shapes = {(288, 288, 768): 32, (768, 768, 2048): 64, (64, 64, 172): 4, (96, 128, 256): 32}
    for (dim, q_dim, hidden), gs in shapes.items():
        cfg = make_config(
            dim=dim, hidden_dim=hidden, n_layers=1, n_heads=4, n_kv_heads=4, head_dim=q_dim // 4,
            vocab_size=32, seq_len=8,
        )  # fmt: skip
        assert q8_group_size(cfg) == gs
    with pytest.raises(ConfigError, match="does not divide hidden_dim"):
        DecodeWeights.from_params(init_params(make_config(
            dim=64, hidden_dim=96, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=32, seq_len=8
        )), "int8", 64)  # fmt: skip


def test_a_v2_file_runs_as_stored(tmp_path) -> None:
    cfg = make_config(dim=64, hidden_dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, seq_len=32)
    params = init_params(cfg, "llama2c", 5)
    path = tmp_path / "m.v2.bin"
    write_llama2c(path, params, 2)
    w = DecodeWeights.from_llama2c_v2(path)
    raw = path.read_bytes()
    emb = raw[HEADER_SIZE + 4 * (2 * 2 + 1) * 64 :][
        : 512 * 64
    ]  # after the norms: the embedding's int8 values
    assert w.embedding.w.numpy().tobytes() == emb and w.group_size == 64
    assert "as stored" in w.origin
    tok = load_tokenizer(shared_file("tok512.bin"), 512)
    from_file = generate(w, tok, steps=32, temperature=0.9, seed=3).tokens
    on_load = generate(params, tok, steps=32, temperature=0.9, seed=3, dtype="int8").tokens
    assert from_file == on_load  # the same rules give the same bytes


def test_a_v2_file_with_minus_128_is_refused(tmp_path) -> None:
    cfg = make_config(dim=64, hidden_dim=128, n_layers=1, n_heads=4, n_kv_heads=4, vocab_size=32, seq_len=8)
    path = tmp_path / "bad.v2.bin"
    write_llama2c(path, init_params(cfg), 2)
    raw = bytearray(path.read_bytes())
    raw[HEADER_SIZE + 4 * 3 * 64] = 0x80  # the first int8 of the embedding: -128
    path.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="-128"):
        DecodeWeights.from_llama2c_v2(path)


def test_a_v2_file_runq_cannot_run_is_refused(stories260k, tmp_path) -> None:
    """stories260K's hidden_dim 172 is not a whole number of the exporter's groups of 64."""
    path = tmp_path / "s.v2.bin"
    write_llama2c(path, stories260k.params, 2)
    with pytest.raises(InputError, match="group size 64 does not divide hidden_dim = 172"):
        DecodeWeights.from_llama2c_v2(path)


# ---- the kernels against references -----------------------------------------------------------------------


def runq_matmul(x: np.ndarray, wq: np.ndarray, ws: np.ndarray, gs: int) -> np.ndarray:
    """runq.c's matmul in exact arithmetic: integer group sums times both scales, summed in float64."""
    xq, xs = quantize_rows(torch.from_numpy(x), gs)
    xq, xs = xq.numpy().astype(np.int64), xs.numpy().astype(np.float64)
    r = x.shape[0]
    sums = np.einsum("rgk,dgk->rdg", xq.reshape(r, -1, gs), wq.astype(np.int64).reshape(len(wq), -1, gs))
    return (sums * ws.astype(np.float64)[None] * xs[:, None, :]).sum(axis=2)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("gs", "n"), [(32, 288), (64, 256), (128, 384), (8, 96)])
def test_int8_kernels_compute_runq_arithmetic(variant: str, gs: int, n: int) -> None:
    cfg = make_config(dim=n, hidden_dim=n, n_layers=1, n_heads=4, n_kv_heads=4, vocab_size=16, seq_len=8)
    dec = NativeDecoder(DecodeWeights.from_params(init_params(cfg), "int8", gs), threads=1, variant=variant)
    g = torch.Generator().manual_seed(gs)
    wq, ws, _ = quantize_q80(torch.randn(37, n, generator=g), gs)  # 37 rows: a partial block of 4
    m = Matrix(wq.view(37, n), ws.view(37, -1))
    for rows in (1, 3, 6):
        x = torch.randn(rows, n, generator=g).numpy()
        want = runq_matmul(x, m.w.numpy(), m.s.numpy(), gs)
        np.testing.assert_allclose(dec.linear(m, x), want, rtol=2e-6, atol=2e-6 * np.abs(want).max())
        torch_path = q8_linear(torch.from_numpy(x), m.w, m.s, gs).numpy()
        np.testing.assert_allclose(torch_path, want, rtol=2e-6, atol=2e-6 * np.abs(want).max())


@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_kernels_sum_bfloat16_products_in_float32(variant: str) -> None:
    n = 200  # not a multiple of 32: a masked tail
    cfg = make_config(dim=n, hidden_dim=n, n_layers=1, n_heads=4, n_kv_heads=4, vocab_size=16, seq_len=8)
    dec = NativeDecoder(DecodeWeights.from_params(init_params(cfg), "bf16"), threads=1, variant=variant)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(21, n, generator=g).to(torch.bfloat16)
    x = torch.randn(5, n, generator=g)
    want = (x.to(torch.bfloat16).double() @ w.double().t()).numpy()  # exact products, float64 sums
    np.testing.assert_allclose(
        dec.linear(Matrix(w), x.numpy()), want, rtol=1e-5, atol=1e-5 * np.abs(want).max()
    )


def test_torch_path_runs_every_precision(stories260k) -> None:
    """The fallback decoder takes the same weights (what CUDA and compiler-less machines run)."""
    for dtype in ("bf16", "int8"):
        w = DecodeWeights.from_params(stories260k.params, dtype)
        native = NativeDecoder(w, threads=1).forward([1, 400, 300], [0] * 3, [0, 1, 2], [0, 1, 2])
        torch_ = TorchDecoder(w).forward([1, 400, 300], [0] * 3, [0, 1, 2], [0, 1, 2])
        assert np.abs(native - torch_).max() < 0.02 * np.abs(native).max(), dtype
