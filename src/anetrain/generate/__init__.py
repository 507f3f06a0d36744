"""Text generation from a :class:`~anetrain.params.ModelParams`, with llama2.c ``run.c``'s semantics.

``generate(params, tokenizer, prompt="", steps=256, temperature=1.0, top_p=0.9, top_k=0, seed=None,
dtype=torch.float32) -> GenerationResult(text, tokens, tokens_per_s, seed)``; ``stream(...)`` yields the
tokens as they come (``GeneratedToken(token, piece, from_prompt)``). The forward pass keeps a key/value
cache (``decoder.py``), the sampler is run.c's (``sampling.py``), the loop is run.c's (``loop.py``).
"""

from .decoder import KVCacheDecoder
from .loop import GeneratedToken, Generation, GenerationResult, generate, stream
from .sampling import Sampler, XorShiftRng

__all__ = [
    "GeneratedToken",
    "Generation",
    "GenerationResult",
    "KVCacheDecoder",
    "Sampler",
    "XorShiftRng",
    "generate",
    "stream",
]
