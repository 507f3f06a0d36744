"""`anetrain info` and `anetrain export` through the CLI entry point: output, conversions, exit codes."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from anetrain.cli import main
from anetrain.config import make_config
from anetrain.formats import load_model, save_model
from anetrain.params import ModelParams
from helpers.data import shared_file

CONFIG_FIELDS = (
    "dim",
    "hidden_dim",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "vocab_size",
    "seq_len",
    "head_dim",
    "rope_theta",
    "norm_eps",
    "tied_classifier",
    "residual_scale",
)


def random_params(cfg, seed: int = 0) -> ModelParams:
    g = torch.Generator().manual_seed(seed)
    p = ModelParams.zeros(cfg)
    p.flat.normal_(0.0, 0.1, generator=g)
    p.no_decay.add_(1.0)
    return p


def test_info_on_stories260k(capsys):
    path = shared_file("stories260K.bin")
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "format      llama2c-v0" in out
    assert "parameters  260,032 (260.0K" in out
    assert "tied to the token embedding" in out
    for name in CONFIG_FIELDS:
        assert f"\n  {name} " in out
    assert main(["info", "--json", str(path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "llama2c-v0" and info["parameters"] == 260_032 and info["bytes"] == 1_056_540
    assert info["config"]["n_kv_heads"] == 4 and info["tied_classifier"] is True


def test_export_stories260k_to_every_format_and_back(tmp_path, capsys):
    src = shared_file("stories260K.bin")
    original = load_model(src)
    for fmt, out in [
        ("llama2c-v0", tmp_path / "v0.bin"),
        ("llama2c-v1", tmp_path / "v1.bin"),
        ("hf", tmp_path / "hf"),
        ("blzt", tmp_path / "ckpt.blzt"),
    ]:
        assert main(["export", str(src), str(out), "--format", fmt]) == 0
        assert f"wrote {out}" in capsys.readouterr().out
    assert (tmp_path / "v0.bin").read_bytes() == src.read_bytes()
    for name in ("v1.bin", "hf"):
        assert torch.equal(load_model(tmp_path / name).params.flat, original.params.flat)
    blzt = load_model(tmp_path / "ckpt.blzt")
    assert blzt.format == "blzt-v4"  # stories260K is GQA: v4 is the only BLZT it fits
    # back from BLZT (residual scale 1/sqrt(2L)) to llama2.c: folded, the original weights again
    assert (
        main(["export", str(tmp_path / "ckpt.blzt"), str(tmp_path / "back.bin"), "--format", "llama2c-v0"])
        == 0
    )
    assert "input's Adam state is not stored" in capsys.readouterr().out
    torch.testing.assert_close(load_model(tmp_path / "back.bin").params.flat, original.params.flat)


def test_export_int8_and_info_shows_group_size(tmp_path, capsys):
    src = shared_file("stories260K.bin")
    out = tmp_path / "q.bin"
    assert main(["export", str(src), str(out), "--int8"]) == 0
    assert "Q8_0 group size 64" in capsys.readouterr().out
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "format      llama2c-v2" in text and "group_size  64" in text


def test_info_shows_blzt_header_and_rope_note(tmp_path, capsys):
    cfg = make_config(dim=16, hidden_dim=24, n_layers=2, n_heads=4, vocab_size=32, seq_len=8)
    path = tmp_path / "c.bin"
    save_model(path, random_params(cfg), "blzt-v2", extras={"step": 40, "loss": 3.5, "lr": 3e-4})
    assert main(["info", str(path)]) == 0
    text = capsys.readouterr().out
    assert "format      blzt-v2" in text
    assert "  step " in text and " 40\n" in text
    assert "  lr " in text and "0.0003\n" in text
    assert "  loss " in text and " 3.5\n" in text
    assert "trained without RoPE" in text
    assert "Adam moments present (t = 0)" in text


def test_export_blzt_v2_when_expressible(tmp_path, capsys):
    cfg = make_config(dim=16, hidden_dim=24, n_layers=2, n_heads=4, vocab_size=32, seq_len=8)
    src = tmp_path / "m.bin"
    save_model(src, random_params(cfg), "llama2c-v0")
    out = tmp_path / "c.blzt"
    assert main(["export", str(src), str(out), "--format", "blzt", "--blzt-version", "2"]) == 0
    assert "trained without RoPE" in capsys.readouterr().out
    assert load_model(out).format == "blzt-v2"


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_export_refusal_is_one_line_exit_2(tmp_path, capsys):
    cfg = make_config(
        dim=32, hidden_dim=40, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=20, seq_len=8
    )
    src = tmp_path / "hf"
    save_model(src, random_params(cfg), "hf")
    out = tmp_path / "x.bin"
    assert main(["export", str(src), str(out), "--format", "llama2c-v0"]) == 2
    assert "llama2.c v0 cannot store head_dim 16 != dim/n_heads 8" in _one_error_line(capsys)
    assert not out.exists()
    assert main(["export", str(src), str(out), "--format", "blzt", "--blzt-version", "2"]) == 2
    assert "BLZT v2 cannot store" in _one_error_line(capsys)


def test_export_option_errors(tmp_path, capsys):
    src = str(tmp_path / "missing.bin")
    assert main(["export", src, str(tmp_path / "o")]) == 2
    assert "give the output format with --format" in _one_error_line(capsys)
    assert main(["export", src, str(tmp_path / "o"), "--int8", "--format", "hf"]) == 2
    assert "--int8 means --format llama2c-v2" in _one_error_line(capsys)


def _bad_files(tmp_path):
    """One corrupted input per reader, each with the problem its message must name."""
    cfg = make_config(dim=16, hidden_dim=24, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32, seq_len=8)
    p = random_params(cfg)
    out = []
    v0 = tmp_path / "v0.bin"
    save_model(v0, p, "llama2c-v0")
    v0.write_bytes(v0.read_bytes()[:-4])
    out.append((v0, "as llama2.c v0: size 1"))
    v1 = tmp_path / "v1.bin"
    save_model(v1, p, "llama2c-v1")
    v1.write_bytes(v1.read_bytes()[:4] + struct.pack("<i", 9) + v1.read_bytes()[8:])
    out.append((v1, "unknown llama2.c format version 9"))
    v2 = tmp_path / "v2.bin"
    save_model(v2, p, "llama2c-v2")
    v2.write_bytes(v2.read_bytes() + b"\0")
    out.append((v2, "does not match its llama2.c v2 header"))
    blzt = tmp_path / "c.blzt"
    save_model(blzt, p, "blzt-v4")
    blzt.write_bytes(blzt.read_bytes()[:200])
    out.append((blzt, "does not match its BLZT v4 header"))
    hf = tmp_path / "hf"
    save_model(hf, p, "hf")
    data = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**data, "hidden_size": 0}))
    out.append((hf / "config.json", "field hidden_size must be a positive integer"))
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    out.append((empty_dir, "directory without config.json"))
    return out


def test_bad_input_through_the_cli(tmp_path, capsys):
    for path, problem in _bad_files(tmp_path):
        target = path.parent if path.name == "config.json" else path
        assert main(["info", str(target)]) == 2, path
        line = _one_error_line(capsys)
        assert line.startswith(f"anetrain: error: {path}: "), line
        assert problem in line, line
        assert main(["export", str(target), str(tmp_path / "out.bin"), "--format", "llama2c-v1"]) == 2
        assert problem in _one_error_line(capsys)
    assert not (tmp_path / "out.bin").exists()


@pytest.mark.parametrize("command", ["info", "export"])
def test_help_documents_every_option(capsys, command):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    for option in ("--json",) if command == "info" else ("--format", "--blzt-version", "--int8"):
        assert option in out
