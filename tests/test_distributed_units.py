"""Data-parallel pieces that need no second process: how samplers deal one stream to the ranks and re-derive
their state for another world size, the report's data-parallel figures, the single-process World, the resume
rule for --accum across world sizes, and the train command's --ddp / torchrun refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from anetrain.commands.train import torchrun_argv
from anetrain.data.sampler import Drand48Sampler, RandomSampler, SharedSampler, make_sampler
from anetrain.distributed import DistributedError, World, init_world, launched_by_torchrun
from anetrain.errors import ConfigError
from anetrain.telemetry.report import build_report, format_report
from anetrain.train import TrainOptions, load_resume_options
from helpers.train import error_line, run_cli, train_argv, valid_head_tokens, write_model

N, SEQ, BATCH = 20000, 16, 3
TOKENS = np.arange(N)  # token value = position, so a window's first token is its start


def starts(sampler, batches: int) -> list[list[int]]:
    return [sampler.next_batch()[:, 0].tolist() for _ in range(batches)]


# ---- dealing one stream ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["shared", "drand48"])
def test_rank_r_gets_batch_i_times_world_plus_r_of_the_single_stream(kind):
    single = starts(make_sampler(kind, TOKENS, N, SEQ, BATCH, seed=7), 12)
    world = 3
    for rank in range(world):
        mine = starts(make_sampler(kind, TOKENS, N, SEQ, BATCH, seed=7, rank=rank, world_size=world), 4)
        assert mine == [single[i * world + rank] for i in range(4)]


def test_shared_with_one_rank_is_the_random_sampler():
    assert starts(SharedSampler(TOKENS, N, SEQ, BATCH, seed=11), 5) == starts(
        RandomSampler(TOKENS, N, SEQ, BATCH, seed=11), 5
    )


def test_random_sampler_ranks_draw_distinct_streams():
    a = starts(RandomSampler(TOKENS, N, SEQ, BATCH, seed=5, rank=0, world_size=2), 3)
    b = starts(RandomSampler(TOKENS, N, SEQ, BATCH, seed=5, rank=1, world_size=2), 3)
    assert a != b
    assert b == starts(RandomSampler(TOKENS, N, SEQ, BATCH, seed=5 + 1000), 3)  # seed + 1000 * rank


@pytest.mark.parametrize("cls", [SharedSampler, Drand48Sampler])
def test_one_stream_state_resumes_with_any_world_size(cls):
    """The state counts the job's windows; 2 ranks resumed by 3 continue the one stream exactly."""

    def make(rank=0, world=1):
        if cls is SharedSampler:
            return cls(TOKENS, N, SEQ, BATCH, 9, rank, world)
        return cls(TOKENS, N, SEQ, BATCH, rank=rank, world_size=world)

    reference = make()
    if cls is Drand48Sampler:  # the original reseeds on resume: compare with a run reseeded at the same count
        starts(reference, 4)
        reference.restore(reference.state())
    else:
        starts(reference, 4)
    expected = starts(reference, 6)
    two = [make(r, 2) for r in range(2)]
    for s in two:
        starts(s, 2)  # 2 micro-batches per rank = 4 of the stream
    state = two[0].job_state([s.state() for s in two])
    assert state["drawn"] == 4 * BATCH and state["world_size"] == 2
    three = [make(r, 3) for r in range(3)]
    for s in three:
        s.restore(json.loads(json.dumps(state)), step=2)
    got = [starts(s, 2) for s in three]
    assert [got[r][i] for i in range(2) for r in range(3)] == expected


def test_random_state_keeps_every_rank_and_resumes_exactly_with_the_same_world_size():
    ranks = [RandomSampler(TOKENS, N, SEQ, BATCH, seed=3, rank=r, world_size=2) for r in range(2)]
    for s in ranks:
        starts(s, 3)
    job = json.loads(json.dumps(ranks[0].job_state([s.state() for s in ranks])))
    assert job["world_size"] == 2 and [st["rank"] for st in job["ranks"]] == [0, 1]
    assert job["bit_generator"] == job["ranks"][0]["bit_generator"]  # rank 0's at the top, as before
    expected = [starts(s, 2) for s in ranks]
    resumed = [RandomSampler(TOKENS, N, SEQ, BATCH, seed=3, rank=r, world_size=2) for r in range(2)]
    for s in resumed:
        s.restore(job, step=3)
    assert [starts(s, 2) for s in resumed] == expected


def test_random_state_is_re_derived_from_seed_step_rank_for_another_world_size():
    one = RandomSampler(TOKENS, N, SEQ, BATCH, seed=3)
    starts(one, 4)
    job = one.job_state([one.state()])
    continued = starts(one, 2)

    def resumed(rank: int, step: int) -> list[list[int]]:
        s = RandomSampler(TOKENS, N, SEQ, BATCH, seed=3, rank=rank, world_size=2)
        s.restore(job, step=step)
        return starts(s, 2)

    r0, r1 = resumed(0, 4), resumed(1, 4)
    assert r0 == resumed(0, 4) and r1 == resumed(1, 4)  # deterministic
    assert r0 != r1 and r0 != continued and resumed(0, 5) != r0  # distinct per rank and per step
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([3, 4, 1])))
    assert r1[0] == rng.integers(0, N - SEQ, size=BATCH).tolist()


def test_old_single_process_state_still_resumes():
    s = RandomSampler(TOKENS, N, SEQ, BATCH, seed=1)
    starts(s, 2)
    old = {"name": "random", "bit_generator": s.rng.bit_generator.state, "drawn": s.drawn}  # no world_size
    expected = starts(s, 2)
    t = RandomSampler(TOKENS, N, SEQ, BATCH, seed=1)
    t.restore(old)
    assert starts(t, 2) == expected and t.drawn == 4 * BATCH


# ---- the report ------------------------------------------------------------------------------------------


def test_report_has_world_size_all_reduce_time_and_scaling_efficiency():
    rep = build_report(
        total_steps=10,
        wall_s=3.0,
        compile_s=0.0,
        train_s=2.0,
        phase_ms={"optimizer": 100.0},
        tokens=40960,
        flops=4e12,
        peak_tflops=1.0,
        best_val_loss=None,
        final_loss=2.5,
        world_size=4,
        global_batch=64,
        allreduce_ms=500.0,
        allreduce_total_ms=800.0,
    )
    assert rep["world_size"] == 4 and rep["global_batch"] == 64
    assert rep["allreduce_ms_per_step"] == 50.0 and rep["allreduce_total_ms_per_step"] == 80.0
    assert rep["scaling_efficiency"] == pytest.approx(0.75)  # 1 - 0.5 s waited / 2 s trained
    assert rep["tokens_per_s"] == 20480.0
    assert rep["utilization"] == pytest.approx(2.0 / 4.0)  # 2 TFLOPS of 4 devices x 1 TFLOPS
    text = format_report(rep)
    assert "4 ranks, global batch 64" in text and "50.00 ms/step waited" in text and "75%" in text


def test_single_process_report_has_no_communication():
    rep = build_report(
        total_steps=2,
        wall_s=1.0,
        compile_s=0.0,
        train_s=1.0,
        phase_ms={},
        tokens=10,
        flops=1e9,
        peak_tflops=1.0,
        best_val_loss=None,
        final_loss=None,
    )
    assert (rep["world_size"], rep["allreduce_ms_per_step"], rep["scaling_efficiency"]) == (1, 0.0, 1.0)
    assert "All-reduce" not in format_report(rep)


# ---- the World without torchrun --------------------------------------------------------------------------


def test_without_torchrun_the_world_is_one_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert not launched_by_torchrun()
    w = init_world(5.0)
    assert (w.rank, w.world_size, w.active, w.is_main) == (0, 1, False, True)
    assert w.from_main(lambda: {"a": 1}, "x") == {"a": 1}
    assert w.agree(lambda: 3, "x") == 3
    assert w.broadcast_json([1, "b"]) == [1, "b"] and w.gather_json({"k": 2}) == [{"k": 2}]
    assert w.sum_values([1.5, 2.0]) == [1.5, 2.0]


def test_a_world_of_one_under_torchrun_needs_no_process_group(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    w = init_world(5.0)
    assert not w.active and w.backend is None


def test_bad_torchrun_environment_is_one_error(monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DistributedError, match="RANK=2 does not fit WORLD_SIZE=2"):
        init_world(5.0)
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(DistributedError, match="WORLD_SIZE='two' is not an integer"):
        init_world(5.0)


def test_world_default_is_not_active():
    assert not World(rank=0, world_size=4).active  # no process group joined


# ---- resume options across world sizes ---------------------------------------------------------------------


def write_config(run_dir, world_size: int, accum: int):
    run_dir.mkdir()
    train = {**TrainOptions().__dict__, "accum": accum, "data": "d.bin"}
    (run_dir / "config.json").write_text(json.dumps({"train": train, "world_size": world_size}), "utf-8")


def test_accum_may_change_with_the_world_size_when_the_global_batch_stays(tmp_path):
    write_config(tmp_path / "r", world_size=2, accum=2)
    assert load_resume_options(tmp_path / "r", {"accum": 4}, world_size=1).accum == 4
    assert load_resume_options(tmp_path / "r", {"accum": 1}, world_size=4).accum == 1
    assert load_resume_options(tmp_path / "r", {}, world_size=4).accum == 2  # allowed; the batch grows
    with pytest.raises(ConfigError, match=r"with 1 rank.* an --accum of 4 keeps its global batch"):
        load_resume_options(tmp_path / "r", {"accum": 3}, world_size=1)
    with pytest.raises(ConfigError, match="--accum 4 differs"):
        load_resume_options(tmp_path / "r", {"accum": 4}, world_size=2)


def test_distributed_options_may_change_on_resume(tmp_path):
    write_config(tmp_path / "r", world_size=1, accum=1)
    given = {
        "dist_timeout": 7.0,
        "dist_backend": "gloo",
        "dist_check_every": 3,
        "ddp": True,
        "nproc_per_node": 2,
    }
    opts = load_resume_options(tmp_path / "r", given, world_size=1)
    assert (opts.dist_timeout, opts.dist_backend, opts.dist_check_every) == (7.0, "gloo", 3)


# ---- the train command ---------------------------------------------------------------------------------


def test_torchrun_command_line():
    argv = torchrun_argv(3, ["--steps", "5"])
    assert argv[1:] == [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=3",
        "-m",
        "anetrain",
        "train",
        "--steps",
        "5",
    ]


def test_ddp_without_cuda_needs_a_process_count(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 0)
    argv = train_argv(write_model(tmp_path), valid_head_tokens(), tmp_path / "r", ddp=True)
    assert "--nproc-per-node" in error_line(run_cli(argv))


def test_dashboard_is_refused_inside_torchrun(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = train_argv(write_model(tmp_path), valid_head_tokens(), tmp_path / "r", dashboard=True)
    assert "anetrain dashboard RUN_DIR" in error_line(run_cli(argv))


@pytest.mark.parametrize(
    ("option", "value", "problem"),
    [("dist_timeout", 0, "--dist-timeout must be positive"), ("dist_check_every", -1, "--dist-check-every")],
)
def test_bad_distributed_options_are_one_error_line(tmp_path, option, value, problem):
    argv = train_argv(write_model(tmp_path), valid_head_tokens(), tmp_path / "r", **{option: value})
    assert problem in error_line(run_cli(argv))
