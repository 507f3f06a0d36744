"""The native CPU decoder: ``native/decode.c`` compiled at first use and called through ctypes.

Building: the C compiler (``$CC``, else ``cc``/``gcc``/``clang``) compiles the one source file into a shared
library in ``$ANETRAIN_CACHE_DIR`` (default ``~/.cache/anetrain``)/``native/``, named by a hash of everything
that decides its contents: the source, the compiler's identity, the flags, and the CPU (``-march=native``
targets the machine it is built on, so a library built for another CPU is never loaded). The flags are
fixed, so a build is reproducible; it is written to a temporary file and renamed into place, so concurrent
first uses are safe. Flag sets are tried in order (OpenMP and ``-march=native`` first) and the first that
compiles wins. Without a working compiler :func:`native_status` says why and generation uses the torch path.

Variants: ``native`` (AVX-512 kernels where the CPU has them) and ``generic`` (the portable loops; the tests
check both against each other and against the torch path).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import AnetrainError
from ..kernels import Rope
from .weights import DecodeWeights, Matrix

SOURCE = Path(__file__).with_name("native") / "decode.c"
ABI = 1
WTYPES = {"fp32": 0, "bf16": 1, "int8": 2}
VARIANTS = ("native", "generic")
_BASE_FLAGS = ["-O3", "-std=c11", "-shared", "-fPIC", "-fno-math-errno", "-fno-trapping-math"]
_FLAG_SETS = (
    ["-march=native", "-fopenmp"],
    ["-mcpu=native", "-fopenmp"],
    ["-fopenmp"],
    ["-march=native", "-fopenmp-simd"],
    ["-mcpu=native", "-fopenmp-simd"],
    [],
)


class NativeUnavailable(AnetrainError):
    """The native decoder cannot be built or loaded here (the reason is the message)."""


def cache_dir() -> Path:
    root = os.environ.get("ANETRAIN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "anetrain"
    )
    return Path(root) / "native"


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's model and feature flags (Linux), else what platform says."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
        keep = [
            ln for ln in text.splitlines() if ln.split(":")[0].strip() in ("model name", "flags", "Features")
        ]
        return "\n".join(sorted(set(keep)))
    except OSError:
        return f"{platform.machine()} {platform.processor()} {platform.platform()}"


def _compiler_identity(cc: str) -> str:
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
        return f"{shutil.which(cc)}\n{out.stdout}"
    except (OSError, subprocess.SubprocessError) as e:
        return f"{cc}: {e}"


@functools.cache
def build_library(variant: str = "native") -> Path:
    """The path of the compiled library for ``variant``, building it if the cache has none."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown native variant {variant!r}")
    cc = _compiler()
    if cc is None:
        raise NativeUnavailable("no C compiler found (set CC, or install gcc or clang)")
    source = SOURCE.read_bytes()
    ident = _compiler_identity(cc)
    cpu = _cpu_signature()
    out_dir = cache_dir()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise NativeUnavailable(f"cannot create the build cache {out_dir} ({e.strerror or e})") from None
    extra = ["-DANET_GENERIC"] if variant == "generic" else []
    errors = []
    for flags in _FLAG_SETS:
        cmd_flags = [*_BASE_FLAGS, *flags, *extra]
        key = hashlib.sha256(b"\0".join([source, ident.encode(), " ".join(cmd_flags).encode(), cpu.encode()]))
        target = out_dir / f"decode-{variant}-{key.hexdigest()[:20]}.so"
        if target.exists():
            return target
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
        try:
            proc = subprocess.run(
                [cc, *cmd_flags, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True, timeout=300
            )
            if proc.returncode == 0:
                os.replace(tmp, target)
                return target
            first = next((ln for ln in proc.stderr.splitlines() if "error" in ln), proc.stderr.strip()[:200])
            errors.append(f"{' '.join(flags) or 'no flags'}: {first}")
        except (OSError, subprocess.SubprocessError) as e:
            errors.append(f"{' '.join(flags)}: {e}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise NativeUnavailable(f"{cc} could not build {SOURCE.name}: {errors[0] if errors else '?'}")


class _Mat(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("s", ctypes.c_void_p)]


_INT_FIELDS = (
    "dim",
    "hidden_dim",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "head_dim",
    "vocab_size",
    "cache_len",
    "n_streams",
    "max_rows",
    "wtype",
    "group_size",
    "n_threads",
)
_PTR = ctypes.c_void_p


class _Model(ctypes.Structure):
    _fields_ = [
        *((name, ctypes.c_int32) for name in _INT_FIELDS),
        ("norm_eps", ctypes.c_float),
        *((n, _PTR) for n in ("rms_att", "rms_ffn", "rms_final", "rope_cos", "rope_sin")),
        ("emb", _Mat),
        *((n, ctypes.POINTER(_Mat)) for n in ("wq", "wk", "wv", "wo", "w1", "w2", "w3")),
        ("cls", _Mat),
        *(
            (n, _PTR)
            for n in ("key_cache", "value_cache", "x", "q", "ob", "hb", "att", "xn", "ab", "aq", "as_")
        ),
        ("sort", _PTR),
    ]


@functools.cache
def load_library(variant: str = "native") -> ctypes.CDLL:
    """The native library, built if needed; raises :class:`NativeUnavailable`."""
    path = build_library(variant)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise NativeUnavailable(f"cannot load {path} ({e})") from None
    if lib.anet_abi() != ABI or lib.anet_sizeof_model() != ctypes.sizeof(_Model):
        raise NativeUnavailable(f"{path} does not match this anetrain (stale build?)")
    i32p, u64p, f32p, p = (ctypes.c_void_p,) * 4
    mp = ctypes.POINTER(_Model)
    lib.anet_features.restype = ctypes.c_char_p
    lib.anet_forward.argtypes = [mp, ctypes.c_int, i32p, i32p, i32p, ctypes.c_int, i32p, f32p]
    lib.anet_forward.restype = None
    sampling = [ctypes.c_float, ctypes.c_float, ctypes.c_int, u64p]
    lib.anet_sample_rows.argtypes = [mp, ctypes.c_int, f32p, i32p, *sampling, i32p]
    lib.anet_sample_rows.restype = None
    lib.anet_decode.argtypes = [mp, ctypes.c_int, i32p, i32p, i32p, f32p, *sampling, i32p]
    lib.anet_decode.restype = None
    lib.anet_copy_stream.argtypes = [mp, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.anet_copy_stream.restype = None
    lib.anet_sample_logits.argtypes = [ctypes.c_int, ctypes.c_int, f32p, *sampling, i32p]
    lib.anet_sample_logits.restype = None
    int_ = ctypes.c_int
    lib.anet_linear.argtypes = [mp, ctypes.POINTER(_Mat), int_, int_, int_, f32p, f32p]
    lib.anet_linear.restype = None
    del p
    return lib


def native_status(variant: str = "native") -> tuple[bool, str]:
    """(usable, the library's features or why it is not)."""
    try:
        return True, load_library(variant).anet_features().decode()
    except NativeUnavailable as e:
        return False, str(e)


def _ptr(t: torch.Tensor | np.ndarray | None) -> int | None:
    if t is None:
        return None
    if isinstance(t, np.ndarray):
        return t.ctypes.data
    return t.data_ptr()


def sample_logits_native(
    logits: np.ndarray, temperature: float, top_p: float, top_k: int, states: np.ndarray
) -> list[int]:
    """The C sampler on rows of ``logits`` [R, V] (copied), row r drawing from ``states[r]`` (updated)."""
    lib = load_library()
    x = np.array(logits, dtype=np.float32, order="C", copy=True).reshape(len(states), -1)
    out = np.zeros(len(states), dtype=np.int32)
    lib.anet_sample_logits(
        len(states), x.shape[1], x.ctypes.data, temperature, top_p, top_k, states.ctypes.data, out.ctypes.data
    )
    return out.tolist()


class NativeDecoder:
    """A batch of streams decoded by the native library. Weights must be fp32, bf16 or int8 on the CPU."""

    backend = "native"

    def __init__(
        self,
        weights: DecodeWeights,
        n_streams: int = 1,
        cache_len: int | None = None,
        threads: int | None = None,
        max_rows: int = 64,
        variant: str = "native",
    ) -> None:
        if weights.dtype not in WTYPES:
            raise NativeUnavailable(f"the native decoder runs fp32, bf16 and int8, not {weights.dtype}")
        if weights.device.type != "cpu":
            raise NativeUnavailable(
                f"the native decoder runs on the CPU, the weights are on {weights.device}"
            )
        cfg = weights.cfg
        self.lib = load_library(variant)
        self.features = self.lib.anet_features().decode()
        self.weights, self.cfg, self.dtype = weights, cfg, weights.dtype
        self.n_streams = n_streams
        self.cache_len = min(cache_len or cfg.seq_len, cfg.seq_len)
        self.threads = threads or torch.get_num_threads()
        self.max_rows = max(max_rows, n_streams)
        self.device = torch.device("cpu")
        self.description = f"native kernels ({self.features})"
        if cfg.n_heads % cfg.n_kv_heads or cfg.head_dim % 2:
            raise AnetrainError(f"unsupported attention shape: {cfg.shape_line()}")

        R, C, L = self.max_rows, self.cache_len, cfg.n_layers
        width = max(cfg.dim, cfg.q_dim, cfg.hidden_dim)
        gs = weights.group_size or 1
        f32 = torch.float32
        rope = Rope.build(C, cfg.head_dim, cfg.rope_theta)
        self._keep: list[object] = []  # everything the C side points into

        def keep(t: torch.Tensor) -> torch.Tensor:
            t = t.contiguous()
            self._keep.append(t)
            return t

        self.key_cache = keep(torch.zeros(L, n_streams, C, cfg.kv_dim, dtype=f32))
        self.value_cache = keep(torch.zeros(L, n_streams, C, cfg.kv_dim, dtype=f32))
        T = self.threads
        ws = {  # shared by the threads, then each thread's own
            "x": torch.zeros(R, cfg.dim, dtype=f32),
            "q": torch.zeros(R, cfg.q_dim, dtype=f32),
            "ob": torch.zeros(R, cfg.q_dim, dtype=f32),
            "hb": torch.zeros(R, cfg.hidden_dim, dtype=f32),
            "att": torch.zeros(T, C, dtype=f32),
            "xn": torch.zeros(T, R, width, dtype=f32),
            "ab": torch.zeros(T, R, width, dtype=torch.int16),
            "aq": torch.zeros(T, R, width, dtype=torch.int8),
            "as_": torch.zeros(T, R, width // gs, dtype=f32),
            "sort": torch.zeros(R, cfg.vocab_size, 2, dtype=torch.int32),
        }

        def mat(m: Matrix) -> _Mat:
            w = keep(m.w.view(torch.int16) if m.w.dtype == torch.bfloat16 else m.w)
            s = keep(m.s) if m.s is not None else None
            return _Mat(_ptr(w), _ptr(s))

        def mats(name: str) -> ctypes.Array[_Mat]:
            arr = (_Mat * L)(*(mat(getattr(layer, name)) for layer in weights.layers))
            self._keep.append(arr)
            return arr

        model = _Model(
            dim=cfg.dim,
            hidden_dim=cfg.hidden_dim,
            n_layers=L,
            n_heads=cfg.n_heads,
            n_kv_heads=cfg.n_kv_heads,
            head_dim=cfg.head_dim,
            vocab_size=cfg.vocab_size,
            cache_len=C,
            n_streams=n_streams,
            max_rows=R,
            wtype=WTYPES[weights.dtype],
            group_size=weights.group_size,
            n_threads=self.threads,
            norm_eps=cfg.norm_eps,
            rms_att=_ptr(keep(weights.attention_norm.to(f32))),
            rms_ffn=_ptr(keep(weights.ffn_norm.to(f32))),
            rms_final=_ptr(keep(weights.final_norm.to(f32))),
            rope_cos=_ptr(keep(rope.cos)),
            rope_sin=_ptr(keep(rope.sin)),
            emb=mat(weights.embedding),
            cls=mat(weights.classifier),
            key_cache=_ptr(self.key_cache),
            value_cache=_ptr(self.value_cache),
            **{name: _ptr(keep(t)) for name, t in ws.items()},
        )
        for name in ("wq", "wk", "wv", "wo", "w1", "w2", "w3"):
            setattr(model, name, mats(name))
        self._model = model
        self._mp = ctypes.byref(model)
        self._rows = np.zeros((3, R), dtype=np.int32)  # tokens, streams, positions of one call
        self._logit_rows = np.zeros(R, dtype=np.int32)
        self._logits = np.zeros((R, cfg.vocab_size), dtype=np.float32)
        # their addresses, taken once (numpy's .ctypes.data costs a microsecond per use)
        self._p_tokens, self._p_streams, self._p_pos = (self._rows[i].ctypes.data for i in range(3))
        self._p_logit_rows, self._p_logits = self._logit_rows.ctypes.data, self._logits.ctypes.data

    # ---- the decoder interface (shared with TorchDecoder) ----------------------------------------------

    def forward(
        self,
        tokens: Sequence[int],
        streams: Sequence[int],
        positions: Sequence[int],
        logit_rows: Sequence[int] = (),
    ) -> np.ndarray:
        """Feed rows (token, stream, position) in order; logits [len(logit_rows), V] of the rows asked for."""
        n = len(tokens)
        self._check_rows(tokens, streams, positions)
        want = np.asarray(logit_rows, dtype=np.int64)
        out = np.zeros((len(want), self.cfg.vocab_size), dtype=np.float32)
        for start in range(0, n, self.max_rows):
            stop = min(n, start + self.max_rows)
            r = stop - start
            self._rows[0, :r] = tokens[start:stop]
            self._rows[1, :r] = streams[start:stop]
            self._rows[2, :r] = positions[start:stop]
            sel = np.flatnonzero((want >= start) & (want < stop))
            k = len(sel)
            self._logit_rows[:k] = want[sel] - start
            buf = self._logits if k else self._logits[:0]
            self.lib.anet_forward(
                self._mp,
                r,
                self._p_tokens,
                self._p_streams,
                self._p_pos,
                k,
                self._p_logit_rows,
                buf.ctypes.data,
            )
            if k:
                out[sel] = self._logits[:k]
        return out

    def sample(
        self,
        logits: np.ndarray,
        streams: Sequence[int],
        temperature: float,
        top_p: float,
        top_k: int,
        states: np.ndarray,
    ) -> list[int]:
        """One token per row of ``logits`` [R, V], row r with stream streams[r]'s generator in ``states``."""
        r = len(streams)
        if states.dtype != np.uint64 or len(states) < self.n_streams or not states.flags.c_contiguous:
            raise ValueError("states must be a contiguous uint64 array with one state per stream")
        if r > self.max_rows or logits.shape != (r, self.cfg.vocab_size):
            raise ValueError(f"logits must be [rows <= {self.max_rows}, {self.cfg.vocab_size}]")
        x = np.ascontiguousarray(logits, dtype=np.float32).copy()
        self._rows[1, :r] = streams
        out = np.zeros(r, dtype=np.int32)
        self.lib.anet_sample_rows(
            self._mp, r, x.ctypes.data, self._p_streams, temperature, top_p, top_k, states.ctypes.data,
            out.ctypes.data,
        )  # fmt: skip
        return out.tolist()

    def decode(
        self,
        tokens: Sequence[int],
        streams: Sequence[int],
        positions: Sequence[int],
        temperature: float,
        top_p: float,
        top_k: int,
        states: np.ndarray,
    ) -> list[int]:
        """Feed one token per stream and sample each stream's next token (one call into C)."""
        r = len(tokens)
        if r > self.max_rows:
            raise AnetrainError(f"{r} rows exceed the decoder's {self.max_rows}")
        self._check_rows(tokens, streams, positions)
        self._rows[0, :r] = tokens
        self._rows[1, :r] = streams
        self._rows[2, :r] = positions
        if states.dtype != np.uint64 or len(states) < self.n_streams or not states.flags.c_contiguous:
            raise ValueError("states must be a contiguous uint64 array with one state per stream")
        self.lib.anet_decode(
            self._mp, r, self._p_tokens, self._p_streams, self._p_pos, self._p_logits, temperature, top_p,
            top_k, states.ctypes.data, self._p_logit_rows,
        )  # fmt: skip
        return self._rows[0, :r].tolist()

    def copy_stream(self, src: int, dst: int, n_pos: int) -> None:
        self.lib.anet_copy_stream(self._mp, src, dst, n_pos)

    def linear(self, m: Matrix, x: np.ndarray) -> np.ndarray:
        """x [R, in] times ``m`` [out, in]^T with this decoder's kernels, the inputs prepared as in a forward
        pass (for checking the kernels). R <= max_rows, in <= the model's widest matrix input."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        r, n = x.shape
        d, n_w = m.w.shape
        if n != n_w or r > self.max_rows or n > max(self.cfg.dim, self.cfg.q_dim, self.cfg.hidden_dim):
            raise ValueError(f"cannot multiply [{r}, {n}] by [{d}, {n_w}]^T here")
        w = m.w.contiguous().view(torch.int16) if m.w.dtype == torch.bfloat16 else m.w.contiguous()
        s = m.s.contiguous() if m.s is not None else None
        mat = _Mat(_ptr(w), _ptr(s))
        out = np.zeros((r, d), dtype=np.float32)
        self.lib.anet_linear(self._mp, ctypes.byref(mat), d, n, r, x.ctypes.data, out.ctypes.data)
        return out

    def _check_rows(self, tokens: Sequence[int], streams: Sequence[int], positions: Sequence[int]) -> None:
        """Bounds the C code trusts: token ids, streams and positions inside the buffers."""
        if not len(tokens) == len(streams) == len(positions):
            raise ValueError("tokens, streams and positions differ in length")
        if len(tokens) == 0:
            return
        if len(tokens) > 16:  # a prompt: numpy is quicker
            tokens, streams, positions = (np.asarray(a) for a in (tokens, streams, positions))
        if int(max(positions)) >= self.cache_len:
            raise AnetrainError(f"the context is full: position {int(max(positions))} >= {self.cache_len}")
        lo, hi = int(min(tokens)), int(max(tokens))
        if lo < 0 or hi >= self.cfg.vocab_size:
            bad = lo if lo < 0 else hi
            raise AnetrainError(
                f"token {bad} is outside the model's vocabulary (0..{self.cfg.vocab_size - 1})"
            )
        if int(min(streams)) < 0 or int(max(streams)) >= self.n_streams or int(min(positions)) < 0:
            raise ValueError("stream or position out of range")
