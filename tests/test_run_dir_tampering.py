"""A run directory is not trusted (issue 15, case 4): checkpoints resolve only inside their run's
checkpoints/ directory (a `latest` pointing elsewhere or a symbolic link is ignored, with a warning), a
manifest must list every file of its checkpoint by plain name with size and sha256, and falling back past a
damaged checkpoint says so."""

from __future__ import annotations

import json
import shutil

import pytest

from anetrain.checkpoint import MANIFEST, find_checkpoint, verify_checkpoint
from anetrain.errors import InputError
from helpers.train import dirs, resume_argv, run_cli, train_argv, valid_head_tokens, write_model


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished runs: "a" (checkpoints at steps 2 and 4) and "b" (steps 2, 4 and 6)."""
    root = tmp_path_factory.mktemp("runs")
    model = write_model(root)
    for name, steps in (("a", 4), ("b", 6)):
        argv = train_argv(
            model,
            valid_head_tokens(),
            root / name,
            steps=steps,
            ckpt_every=2,
            keep_checkpoints=10,
            eval_every=0,
        )
        assert run_cli(argv).rc == 0
    return root


@pytest.fixture
def run_a(runs, tmp_path):
    """A fresh copy of run "a" next to run "b", to tamper with."""
    shutil.copytree(runs / "a", tmp_path / "a")
    shutil.copytree(runs / "b", tmp_path / "b")
    return tmp_path / "a"


def _warnings(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if "warning:" in line]


@pytest.mark.parametrize(
    "pointer", ["../../b/checkpoints/step_00000006", "{b}/checkpoints/step_00000006", "..", "../checkpoints"]
)
def test_a_latest_pointing_outside_the_run_is_ignored_with_a_warning(run_a, capsys, pointer):
    b = run_a.parent / "b"
    (run_a / "checkpoints" / "latest").write_text(pointer.format(b=b) + "\n")
    assert find_checkpoint(run_a) == run_a / "checkpoints" / "step_00000004"
    (warning,) = _warnings(capsys)
    assert "checkpoints/latest names" in warning and "not a checkpoint of this run; ignored" in warning


def test_a_symlinked_checkpoint_is_not_resumed_and_the_runs_own_are_not_pruned(run_a, capsys):
    root = run_a / "checkpoints"
    (root / "step_00000009").symlink_to(run_a.parent / "b" / "checkpoints" / "step_00000006")
    (root / "latest").write_text("step_00000009\n")
    assert find_checkpoint(run_a) == root / "step_00000004"
    assert any("step_00000009" in w for w in _warnings(capsys))
    res = run_cli(resume_argv(run_a, steps=6, keep_checkpoints=1))  # resumes from a's own step 4
    assert res.rc == 0, res.err
    assert f"resuming from {root / 'step_00000004'} (step 4)" in res.err
    assert verify_checkpoint(find_checkpoint(run_a))["step"] == 6
    assert dirs(run_a.parent / "b" / "checkpoints", "step_") == [
        "step_00000002",
        "step_00000004",
        "step_00000006",
    ]


def _edit_manifest(path, edit) -> None:
    doc = json.loads((path / MANIFEST).read_text())
    edit(doc)
    (path / MANIFEST).write_text(json.dumps(doc))


def test_manifest_file_names_must_be_the_checkpoints_own_files(run_a):
    ckpt, older = run_a / "checkpoints" / "step_00000004", run_a / "checkpoints" / "step_00000002"
    entry = json.loads((older / MANIFEST).read_text())["files"]["model.safetensors"]  # true size and sha256

    def point_outside(doc):
        doc["files"]["../step_00000002/model.safetensors"] = entry

    _edit_manifest(ckpt, point_outside)
    with pytest.raises(
        InputError, match=r"lists '\.\./step_00000002/model\.safetensors', which is not a checkpoint"
    ):
        verify_checkpoint(ckpt)


def test_a_manifest_must_list_every_file_with_its_size_and_sha256(run_a):
    ckpt = run_a / "checkpoints" / "step_00000004"
    original = (ckpt / MANIFEST).read_text()
    cases = [
        (lambda doc: doc.pop("files"), "does not list the checkpoint's files"),
        (lambda doc: doc["files"].pop("optimizer.safetensors"), "optimizer.safetensors: is not listed"),
        (
            lambda doc: doc["files"]["model.safetensors"].pop("sha256"),
            "needs its size in bytes and its sha256",
        ),
        (lambda doc: doc.update(files=[]), "does not list the checkpoint's files"),
    ]
    for edit, problem in cases:
        (ckpt / MANIFEST).write_text(original)
        _edit_manifest(ckpt, edit)
        with pytest.raises(InputError, match=problem):
            verify_checkpoint(ckpt)


def test_falling_back_past_a_damaged_newest_checkpoint_prints_a_warning(run_a, capsys):
    model = run_a / "checkpoints" / "step_00000004" / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF
    model.write_bytes(bytes(data))
    assert find_checkpoint(run_a) == run_a / "checkpoints" / "step_00000002"
    (warning,) = _warnings(capsys)
    assert "skipping the damaged checkpoint" in warning and "step_00000004" in warning
    assert "checksum does not match" in warning
    res = run_cli(["info", str(run_a)])  # the commands that read a run say it too
    assert res.rc == 0 and "skipping the damaged checkpoint" in res.err
    assert str(run_a / "checkpoints" / "step_00000002") in res.out
