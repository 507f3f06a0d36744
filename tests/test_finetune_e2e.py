"""Fine-tuning end to end, through the CLI: a tiny random Qwen3 and a tiny random Llama made by transformers,
text tokenized with a tokenizer.json, LoRA training whose validation loss falls, export merged (hf) and as
peft adapters, and both loaded back by transformers/peft with anetrain's logits; instruction data with a loss
mask; uint32 token files; resume; refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from anetrain.formats import load_model
from helpers.data import shared_file
from helpers.hf import (
    anetrain_logits,
    llama_tokenizer,
    logits_of,
    qwen_tokenizer,
    save,
    tiny_model,
    transformers_or_skip,
    wide_tokenizer,
)
from helpers.train import error_line, records, run_cli, train_argv

TOKENS = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))

LORA_RUN = {
    "lora_rank": 8,
    "lr": 1e-2,
    "steps": 30,
    "warmup": 3,
    "batch": 4,
    "seq": 64,
    "eval_every": 30,
    "eval_batches": 4,
    "val_fraction": 0.1,
}


def _model_dir(tmp_path, arch):
    """A tiny random model and its tokenizer in one directory, and the token file of the TinyStories head."""
    d = tmp_path / arch
    tok = (qwen_tokenizer if arch == "qwen3" else llama_tokenizer)(d)
    from anetrain.tokenizer import load_tokenizer

    vocab = load_tokenizer(tok).vocab_size + 8  # embedding rows beyond the tokenizer's ids, as Qwen3 has
    save(tiny_model(arch, vocab, tied=arch == "qwen3", init_range=0.1), d)
    data = tmp_path / f"{arch}.bin"
    res = run_cli(
        ["prepare", str(shared_file("tinystories_valid_head.txt")), "--tokenizer", str(d), "--out", str(data)]
    )
    assert res.rc == 0, res.err
    return d, data


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_lora_finetune_export_and_load_back(tmp_path, arch):
    transformers = transformers_or_skip()
    peft = pytest.importorskip("peft", reason="peft is not installed (optional extra 'test')")
    d, data = _model_dir(tmp_path, arch)
    side = json.loads((tmp_path / f"{arch}.bin.json").read_text())
    tok = json.loads((d / "tokenizer.json").read_text())
    ids = np.fromfile(data, dtype="<u2")
    if arch == "qwen3":  # no BOS; every document ends with <|endoftext|>
        eot = next(t["id"] for t in tok["added_tokens"] if t["content"] == "<|endoftext|>")
        assert ids[0] != eot and int((ids == eot).sum()) == side["n_documents"]
    else:  # <s> text </s>
        assert ids[0] == 1 and int((ids == 1).sum()) == side["n_documents"] == int((ids == 2).sum())
    run = tmp_path / "run"
    res = run_cli([*train_argv(d, data, run, **LORA_RUN), "--tokenizer", str(d), "--sample-tokens", "8"])
    assert res.rc == 0, res.err
    log = (run / "train.log").read_text()
    assert "LoRA: rank 8, alpha 16" in log and "the base is frozen" in log
    evals = [r["val_loss"] for r in records(run, "eval")]
    assert evals[-1] < evals[0] - 0.3, evals  # validation loss falls
    run_rec = records(run, "run")[0]
    assert run_rec["trainable_params"] < run_rec["params"] / 5
    assert records(run, "sample")  # generation from the merged model with the tokenizer.json
    manifest = json.loads(next((run / "checkpoints").glob("step_*/manifest.json")).read_text())
    assert manifest["lora"]["rank"] == 8 and manifest["base"]["path"] == str(d.resolve())
    # the checkpoint holds the adapters only
    from safetensors import safe_open

    with safe_open(next((run / "checkpoints").glob("step_*/model.safetensors")), "pt") as f:
        assert all(".lora_" in k for k in f.keys())  # noqa: SIM118

    # merged export: transformers loads the architecture it was read from, with anetrain's logits
    merged = load_model(run)
    assert merged.adapters is not None
    ours = anetrain_logits(merged.params, TOKENS)
    base_logits = logits_of(transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32), TOKENS)
    assert (ours - base_logits).abs().max() > 1e-3  # the adapters changed the model
    res = run_cli(["export", str(run), str(tmp_path / "merged"), "--format", "hf"])
    assert res.rc == 0, res.err
    assert "merged" in res.out and "copied tokenizer.json" in res.out
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert type(hf).__name__ == {"qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}[arch]
    torch.testing.assert_close(logits_of(hf, TOKENS), ours, rtol=0, atol=1e-4)

    # peft export: the adapters on the transformers base give the same logits
    res = run_cli(["export", str(run), str(tmp_path / "adapter"), "--format", "peft"])
    assert res.rc == 0, res.err
    base = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    with_adapter = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    torch.testing.assert_close(logits_of(with_adapter, TOKENS), ours, rtol=0, atol=1e-4)
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and cfg["base_model_name_or_path"] == str(d)


def test_full_finetuning_of_qwen3_and_resume_with_lora(tmp_path):
    """--lora-rank 0 trains every weight (the export differs from the base everywhere); a LoRA run stopped and
    resumed continues with the same adapters and base."""
    d, data = _model_dir(tmp_path, "qwen3")
    run = tmp_path / "full"
    res = run_cli(
        train_argv(d, data, run, **{**LORA_RUN, "lora_rank": 0, "lr": 3e-3, "steps": 6, "eval_every": 3})
    )
    assert res.rc == 0, res.err
    full = load_model(run)
    base = load_model(d)
    assert full.adapters is None and full.cfg.qk_norm
    changed = (full.params.flat - base.params.flat).abs() > 0
    assert changed.float().mean() > 0.9
    lora_run = tmp_path / "lora"
    res = run_cli(train_argv(d, data, lora_run, **{**LORA_RUN, "steps": 6, "eval_every": 3, "stop_at": 3}))
    assert res.rc == 0, res.err
    res = run_cli(["train", "--resume", str(lora_run)])
    assert res.rc == 0, res.err
    assert max(r["step"] for r in records(lora_run, "step")) == 6
    assert "resuming from" in (lora_run / "train.log").read_text()


def test_chat_data_trains_on_completions_only(tmp_path):
    d, _ = _model_dir(tmp_path, "qwen3")
    lines = []
    for i in range(60):
        if i % 2:
            lines.append(
                {
                    "prompt": f"Tell me story {i}.",
                    "completion": f"Once upon a time there was a cat named {i}.",
                }
            )
        else:
            lines.append(
                {
                    "messages": [
                        {"role": "system", "content": "You tell short stories."},
                        {"role": "user", "content": f"A story about {i} dogs?"},
                        {"role": "assistant", "content": f"{i} dogs ran in the park."},
                        {"role": "user", "content": "And then?"},
                        {"role": "assistant", "content": "They slept."},
                    ]
                }
            )
    src = tmp_path / "chat.jsonl"
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "chat.bin"
    res = run_cli(["prepare", str(src), "--tokenizer", str(d), "--out", str(out), "--format", "chat"])
    assert res.rc == 0, res.err
    side = json.loads((tmp_path / "chat.bin.json").read_text())
    ids, mask = np.fromfile(out, dtype="<u2"), np.fromfile(tmp_path / "chat.bin.mask", dtype=np.uint8)
    assert side["loss_mask"] == "chat.bin.mask" and len(mask) == len(ids) == side["n_tokens"]
    assert side["chat_format"] == "the tokenizer's chat template" and side["records"] == 60
    from anetrain.tokenizer import load_tokenizer

    tok = load_tokenizer(d)
    # record 0's scored text is exactly its two assistant turns (each with its <|im_end|> and newline)
    first_end = int(np.flatnonzero(ids == tok.eos_id)[0])
    scored = tok.tk.decode(
        [int(t) for t in ids[:first_end][mask[:first_end] == 1]], skip_special_tokens=False
    )
    assert scored == "0 dogs ran in the park.<|im_end|>\nThey slept.<|im_end|>\n"
    run = tmp_path / "run"
    opts = {**LORA_RUN, "seq": 32, "batch": 2, "steps": 8, "eval_every": 4, "val_fraction": 0.2}
    res = run_cli(train_argv(d, out, run, **opts))
    assert res.rc == 0, res.err
    log = (run / "train.log").read_text()
    assert "loss mask: the loss covers only the completion/assistant tokens" in log
    assert "completion tokens only" in log
    report = json.loads((run / "report.json").read_text())
    assert report["loss_masked"] is True
    assert all(r["loss_masked"] for r in records(run, "eval"))


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ('{"prompt": "hi"}', 'line 2: missing field "completion"'),
        ('{"prompt": "hi", "completion": 3}', 'line 2: field "completion" must be a string'),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "line 2: no assistant message"),
        ('{"messages": [{"role": "robot", "content": "hi"}]}', "line 2: message 0 has role 'robot'"),
        ("not json", "line 2: not valid JSON"),
        (
            '{"prompt": "hi", "completion": "' + "word " * 300 + '"}',
            "line 2: the record has .* more than --max-tokens 100",
        ),
    ],
)
def test_bad_chat_records_name_file_and_line_and_write_nothing(tmp_path, record, message):
    tok_dir = tmp_path / "tok"
    qwen_tokenizer(tok_dir)
    src = tmp_path / "chat.jsonl"
    src.write_text('{"prompt": "a", "completion": "b"}\n' + record + "\n")
    out = tmp_path / "chat.bin"
    line = error_line(
        run_cli(
            [
                "prepare",
                str(src),
                "--tokenizer",
                str(tok_dir),
                "--out",
                str(out),
                "--format",
                "chat",
                "--max-tokens",
                "100",
            ]
        )
    )
    assert str(src) in line
    import re

    assert re.search(message, line), line
    assert not list(tmp_path.glob("chat.bin*"))


def test_wide_vocabulary_gives_uint32_tokens_that_training_reads(tmp_path):
    tok = wide_tokenizer(tmp_path / "tok")
    out = tmp_path / "wide.bin"
    res = run_cli(
        [
            "prepare",
            str(shared_file("tinystories_sample.txt")),
            "--tokenizer",
            str(tok),
            "--out",
            str(out),
            "--separator",
            "endoftext",
        ]
    )
    assert res.rc == 0, res.err
    side = json.loads((tmp_path / "wide.bin.json").read_text())
    assert side["dtype"] == "uint32" and "uint32" in res.err
    ids = np.fromfile(out, dtype="<u4")
    assert len(ids) == side["n_tokens"] and ids.min() >= 70000 and ids.max() == 70256
    assert out.stat().st_size == 4 * side["n_tokens"]
    from anetrain.data.tokens import open_tokens

    tf = open_tokens(out)
    assert tf.tokens.dtype == np.dtype("<u4") and int(tf.tokens[0]) == int(ids[0])
    cfg = tmp_path / "wide.json"
    cfg.write_text(
        json.dumps(
            {"dim": 16, "hidden_dim": 32, "n_layers": 1, "n_heads": 2, "vocab_size": 70257, "seq_len": 32}
        )
    )
    run = tmp_path / "run"
    res = run_cli(train_argv(cfg, out, run, steps=2, seq=16, eval_every=1, tokenizer=str(tok)))
    assert res.rc == 0, res.err
    assert records(run, "step")[-1]["loss"] > 0


def test_lora_needs_a_pretrained_model_and_the_ane_refuses(tmp_path):
    from helpers.train import valid_head_tokens, write_model

    line = error_line(
        run_cli(train_argv(write_model(tmp_path), valid_head_tokens(), tmp_path / "r", lora_rank=4))
    )
    assert "--lora-rank adapts a pretrained model" in line
    d = save(tiny_model("qwen3", 512), tmp_path / "q")
    line = error_line(
        run_cli(train_argv(d, valid_head_tokens(), tmp_path / "r2", backend="ane-sim", dtype="fp16")),
        after_log=True,
    )
    assert "the Neural Engine programs do not implement QK-norm" in line
