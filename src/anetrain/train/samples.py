"""Generated text in the run's records ("sample"): every --sample-every steps, at the end of the run, and when
the dashboard asks (it creates RUN_DIR/control/generate). Rank 0 writes them, with the run's --tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..distributed import World
from ..lora import LoraParams, merge
from ..params import ModelParams
from ..pipeline.base import Pipeline
from ..tokenizer.base import Tokenizer
from .rundir import RunFiles

TEMPERATURE, TOP_P = 0.8, 0.9


class SampleWriter:
    """Writes "sample" records from the pipeline's current weights (nothing without a tokenizer)."""

    def __init__(
        self,
        pipe: Pipeline,
        tokenizer: Tokenizer | None,
        world: World,
        run_dir: Path,
        every: int,
        tokens: int,
        files: RunFiles,
        log: Any,
    ) -> None:
        self.pipe = pipe
        self.tokenizer = tokenizer
        self.active = world.is_main
        self.request_file = run_dir / "control" / "generate"
        self.every = every
        self.tokens = tokens
        self.files = files
        self.log = log
        self.written_at: int | None = None  # the step of the last sample (one per step at most)
        self.last_line = ""

    def due(self, step: int) -> bool:
        """Every ``every`` steps, or when the dashboard asked for one (the request is taken)."""
        if not self.active:
            return False
        asked = self.request_file.exists()
        if asked:
            self.request_file.unlink(missing_ok=True)
        return asked or (self.every > 0 and step % self.every == 0)

    def write(self, step: int, final: bool = False) -> None:
        """A sample from the current weights (``final``: the run's last, part of its result on stdout)."""
        if self.tokenizer is None or not self.active:
            return
        if self.written_at == step:  # one sample per step: the one written (the result says it again)
            if final and self.last_line:
                self.log.result(self.last_line)
            return
        self.written_at = step
        from ..generate import generate

        params = self.pipe.params
        if isinstance(params, LoraParams):  # the frozen base with the adapters folded in (float32)
            assert params.base is not None
            params = merge(params.base.to(device="cpu"), params.to(device="cpu"))
        if params.flat.device.type != "cpu":
            params = params.to(device="cpu")
        if params.cfg.seq_len > self.tokens:  # the decoder's cache: the sample's length, not the model's
            params = ModelParams(params.cfg.with_(seq_len=self.tokens), params.flat)
        res = generate(
            params,
            self.tokenizer,
            prompt="",
            steps=self.tokens,
            temperature=TEMPERATURE,
            top_p=TOP_P,
            seed=step,
        )
        self.files.write("sample", step=step, text=res.text)
        self.last_line = f"sample at step {step}:\n{res.text.strip()}"
        self.log.result(self.last_line) if final else self.log(self.last_line)
