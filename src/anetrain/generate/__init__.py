"""Text generation with llama2.c ``run.c``'s semantics, at C speed.

``generate(model, tokenizer, prompt="", steps=256, temperature=1.0, top_p=0.9, top_k=0, seed=None,
dtype=None, num_samples=1, backend="auto", threads=None) -> GenerationResult``; ``stream(...)`` yields the
tokens as they come (``GeneratedToken(token, piece, from_prompt, stream)``). ``model`` is a
:class:`~anetrain.params.ModelParams` or :class:`DecodeWeights` (a precision: fp32, bf16, int8 Q8_0, fp64).

Modules: ``weights.py`` (the weights in a decode precision), ``native.py`` + ``native/decode.c`` (the CPU
decoder, built at first use), ``decoder.py`` (the same forward pass in torch operators), ``quant.py``
(runq.c's int8 arithmetic), ``backend.py`` (which decoder runs), ``sampling.py`` (run.c's sampler),
``loop.py`` (the loop: prefill, then batched decode of N streams), ``source.py`` (model + tokenizer from a
file or a run directory).
"""

from .backend import BACKENDS, make_decoder
from .decoder import TorchDecoder
from .loop import (
    GeneratedToken,
    Generation,
    GenerationResult,
    GenerationStats,
    SampleResult,
    generate,
    stream,
)
from .native import NativeDecoder, NativeUnavailable, native_status
from .sampling import Sampler, XorShiftRng, stream_seed
from .weights import DTYPE_ALIASES, DTYPES, DecodeWeights, dtype_name

__all__ = [
    "BACKENDS",
    "DTYPES",
    "DTYPE_ALIASES",
    "DecodeWeights",
    "GeneratedToken",
    "Generation",
    "GenerationResult",
    "GenerationStats",
    "NativeDecoder",
    "NativeUnavailable",
    "SampleResult",
    "Sampler",
    "TorchDecoder",
    "XorShiftRng",
    "dtype_name",
    "generate",
    "make_decoder",
    "native_status",
    "stream",
    "stream_seed",
]
