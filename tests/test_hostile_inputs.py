"""Small hostile inputs must not allocate what they claim before they are checked (issue 15, case 3).

Each case is a file of a few bytes or kilobytes whose header or config claims a huge model (or a device with
no end, /dev/zero): every reader checks sizes against the file, and sane bounds, before allocating, and text
inputs are read with a size cap. One child process runs every case through the CLI and reports, after each,
its exit status, stderr and its peak resident memory: each must exit 2 with one line while the peak stays
within 200 MB of what the process held before the case (an address-space limit keeps a regression from
taking the machine's memory). A model whose seq_len is 2^24 trains with --seq 32 in that budget too: the
RoPE tables cover the sequence trained on, not the model's seq_len.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from anetrain.checkpoint import MANIFEST, save_checkpoint
from anetrain.config import make_config
from anetrain.formats import save_model
from anetrain.formats.llama2c import GROUP_SIZE, HEADER_SIZE, MAGIC, V12_PREFIX
from anetrain.params import init_params
from helpers.train import TINY, valid_head_tokens, write_model

BUDGET_MB = 200

CHILD = textwrap.dedent(
    """
    import contextlib, io, json, resource, sys
    import psutil
    from anetrain.cli import main

    def rss_mb():
        return psutil.Process().memory_info().rss / 2**20

    def start_peak():
        # Linux: reset the peak resident size (VmHWM) to the current one; ru_maxrss cannot be used, as it
        # keeps the parent's size from before exec
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def peak_mb():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024

    cases = json.loads(sys.argv[1])
    with contextlib.redirect_stderr(io.StringIO()):
        main(["info", "/nonexistent"])
    import anetrain.pipeline.optimized, anetrain.train, anetrain.tokenizer  # what the cases import
    vms = psutil.Process().memory_info().vms
    resource.setrlimit(resource.RLIMIT_AS, (vms + (3 << 30), resource.RLIM_INFINITY))
    out = []
    for argv in cases:
        err = io.StringIO()
        base = rss_mb()
        start_peak()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                rc = main(argv)
            except BaseException as e:  # a crash is a result here, not the end of the survey
                rc = f"{type(e).__name__}: {e}"[:300]
        out.append({"argv": argv, "rc": rc, "err": err.getvalue(), "peak_mb": peak_mb() - base})
    print(json.dumps(out))
    """
)


def _llama2c_v2_header(path: Path, n_layers: int) -> Path:
    """256 bytes: a llama2.c v2 header claiming ``n_layers`` layers, and nothing else."""
    prefix = V12_PREFIX.pack(MAGIC, 2, 64, 172, n_layers, 8, 4, 512, 512, 1) + GROUP_SIZE.pack(64)
    path.write_bytes(prefix.ljust(HEADER_SIZE, b"\0"))
    return path


def _hf_claiming_layers(directory: Path, n_layers: int) -> Path:
    """A real 2-layer HF export whose config.json then claims ``n_layers`` layers."""
    cfg = make_config(**{**TINY, "dim": 128, "hidden_dim": 384})
    save_model(directory, init_params(cfg, "llama2c", 0), "hf")
    doc = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**doc, "num_hidden_layers": n_layers}))
    return directory


def _checkpoint_claiming_layers(run_dir: Path, n_layers: int) -> Path:
    """A real checkpoint whose manifest (which has no checksum of itself) then claims ``n_layers``."""
    path = save_checkpoint(
        run_dir, "step_00000001", init_params(make_config(**TINY), "llama2c", 0), None, {"step": 1}
    )
    doc = json.loads((path / MANIFEST).read_text())
    doc["model"]["n_layers"] = n_layers
    (path / MANIFEST).write_text(json.dumps(doc))
    return path


@pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="peak memory is measured with Linux's clear_refs"
)
def test_hostile_files_are_refused_before_allocating_what_they_claim(tmp_path):
    data = str(valid_head_tokens())
    hf_dir = _hf_claiming_layers(tmp_path / "hf5000", 5000)
    zero_config_hf = tmp_path / "hfzero"
    zero_config_hf.mkdir()
    (zero_config_hf / "config.json").symlink_to("/dev/zero")
    (zero_config_hf / "model.safetensors").write_bytes((hf_dir / "model.safetensors").read_bytes())
    zero_toml = tmp_path / "zero.toml"
    zero_toml.symlink_to("/dev/zero")
    huge_seq = tmp_path / "seq1e9.toml"
    huge_seq.write_text("".join(f"{k} = {v}\n" for k, v in {**TINY, "seq_len": "1e9"}.items()))
    long_model = write_model(tmp_path, "seq2p24", seq_len=1 << 24)
    train = ["--data", data, "--seq", "32", "--batch", "2", "--steps", "2", "--eval-every", "0"]
    train += ["--peak-tflops", "1", "--threads", "1", "--dtype", "bf16"]
    refused = {
        "llama2.c v2 header claiming 10**6 layers": [
            "info",
            str(_llama2c_v2_header(tmp_path / "v2.bin", 10**6)),
        ],
        "HF config claiming 5000 layers": ["info", str(hf_dir)],
        "manifest claiming 100,000 layers": [
            "info",
            str(_checkpoint_claiming_layers(tmp_path / "run", 100_000)),
        ],
        "seq_len = 1e9": ["train", "--model", str(huge_seq), "--out", str(tmp_path / "r1"), *train],
        "/dev/zero as tokenizer": ["tokenizer", "info", "/dev/zero"],
        "/dev/zero as a config file": [
            "train",
            "--model",
            str(zero_toml),
            "--out",
            str(tmp_path / "r2"),
            *train,
        ],
        "/dev/zero as an HF config.json": ["info", str(zero_config_hf)],
    }
    trained = {
        "seq_len 2^24 trained with --seq 32": [
            "train",
            "--model",
            str(long_model),
            "--out",
            str(tmp_path / "r3"),
            *train,
        ]
    }
    cases = list(refused.values()) + list(trained.values())
    env = {k: v for k, v in os.environ.items() if k != "ANETRAIN_DEBUG"}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(cases)], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, res in zip([*refused, *trained], results, strict=True):
        lines = res["err"].strip().splitlines()
        if name in refused:
            assert res["rc"] == 2 and len(lines) == 1 and lines[0].startswith("anetrain: error: "), (
                name,
                res,
            )
        else:
            assert res["rc"] == 0, (name, res)
        assert res["peak_mb"] < BUDGET_MB, (name, f"{res['peak_mb']:.0f} MB", res["err"][-500:])
