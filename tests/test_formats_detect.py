"""Format detection and reading anetrain's own checkpoints through load_model."""

from __future__ import annotations

import pytest
import torch

from anetrain.checkpoint import save_checkpoint
from anetrain.config import make_config
from anetrain.errors import InputError
from anetrain.formats import detect_format, load_model, save_model
from anetrain.optim import AdamState
from anetrain.params import ModelParams

CFG = make_config(dim=16, hidden_dim=24, n_layers=2, n_heads=4, vocab_size=32, seq_len=8)


def random_params(cfg, seed: int = 0) -> ModelParams:
    g = torch.Generator().manual_seed(seed)
    p = ModelParams.zeros(cfg)
    p.flat.normal_(0.0, 0.1, generator=g)
    p.no_decay.add_(1.0)
    return p


def test_detects_every_written_format(tmp_path):
    p = random_params(CFG)
    expected = {
        "llama2c-v0": "llama2c-v0",
        "llama2c-v1": "llama2c-v1",
        "llama2c-v2": "llama2c-v2",
        "hf": "hf",
        "blzt-v2": "blzt",
        "blzt-v4": "blzt",
    }
    for fmt, detected in expected.items():
        path = tmp_path / fmt
        save_model(path, p, fmt)
        assert detect_format(path) == detected
        assert load_model(path).format == fmt


def test_reads_anetrain_checkpoints_and_run_directories(tmp_path):
    p = random_params(CFG.with_(residual_scale=0.5))
    adam = AdamState(p.like(), p.like(), 7)
    adam.m.flat.fill_(0.25)
    run = tmp_path / "run"
    save_checkpoint(run, "step_00000010", p, adam, {"step": 10, "loss": 2.5})
    ckpt = run / "checkpoints" / "step_00000010"
    for path, fmt in ((ckpt, "anetrain-checkpoint"), (run, "anetrain-run")):
        assert detect_format(path) == fmt
        m = load_model(path)
        assert m.format == "anetrain-checkpoint" and m.cfg == p.cfg
        assert torch.equal(m.params.flat, p.flat)
        assert m.optimizer is not None and m.optimizer.t == 7 and torch.equal(m.optimizer.m.flat, adam.m.flat)
        assert m.extras["step"] == 10 and m.extras["loss"] == 2.5
        assert m.extras["checkpoint"] == str(ckpt)


def test_run_directory_without_checkpoint(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(InputError, match="run directory without a complete checkpoint"):
        load_model(tmp_path)
