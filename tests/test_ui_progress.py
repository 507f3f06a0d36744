"""Console progress: plain lines when not on a terminal, a rich bar when on one."""

from __future__ import annotations

import io
import re

from anetrain.ui.progress import ConsoleProgress


def test_plain_mode_prints_every_log_every_steps_and_the_last_step() -> None:
    out = io.StringIO()
    with ConsoleProgress(25, stream=out, log_every=10) as p:
        assert not p.tty
        for step in range(1, 24):
            p.update(step, loss=10.0 - step * 0.1, tokens_per_s=35210.0, lr=5e-4, ms_per_step=58.17)
            if step == 15:
                p.log("eval step 15: val_loss=8.7000")
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("step 10/25 | loss 9.0000 | lr 5.00e-04 | 35.2k tok/s | 58.2 ms/step | eta ")
    assert lines[1] == "eval step 15: val_loss=8.7000"
    assert lines[2].startswith("step 20/25 | loss 8.0000 |")
    assert lines[3].startswith("step 23/25 | loss 7.7000 |")  # the last update, printed by close()
    assert len(lines) == 4


def test_plain_mode_on_resume_counts_eta_from_the_start_step() -> None:
    out = io.StringIO()
    p = ConsoleProgress(100, start_step=90, stream=out, log_every=5)
    p.update(95, loss=2.5, val_loss=2.6)
    p.update(100, loss=2.4)
    p.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("step 95/100 | loss 2.5000 | val 2.6000 | eta ")
    assert re.fullmatch(r"step 100/100 \| loss 2\.4000 \| eta (0\.0s)", lines[1])
    assert len(lines) == 2


def test_terminal_mode_draws_a_bar_and_logs_above_it() -> None:
    out = io.StringIO()
    p = ConsoleProgress(50, stream=out, tty=True)
    p.update(20, loss=3.25, tokens_per_s=1.5e6, lr=1e-3)
    p.log("checkpoint step 20")
    p.close()
    text = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", out.getvalue())
    assert "checkpoint step 20" in text
    assert "20/50" in text
    assert "loss 3.2500" in text and "1.50M tok/s" in text
    assert "━" in text  # the bar


def test_update_from_a_step_record() -> None:
    out = io.StringIO()
    p = ConsoleProgress(4, stream=out, log_every=2)
    for step in (1, 2):
        p.update_record(
            {"type": "step", "step": step, "loss": 3.0, "lr": 1e-3, "ms": 12.5, "tokens_per_s": 8192.0}
        )
    (line,) = out.getvalue().splitlines()
    expected = r"step 2/4 \| loss 3\.0000 \| lr 1\.00e-03 \| 8\.19k tok/s \| 12\.5 ms/step \| eta \d+\.\ds"
    assert re.fullmatch(expected, line), line
