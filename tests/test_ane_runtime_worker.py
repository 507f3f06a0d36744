"""The worker process that keeps the compile leak out of the user's process, tested with the simulator as its
device (the same code drives the Neural Engine on a Mac).

The simulator device emulates the leak: with ``leak_limit=n`` the (n+1)-th compile in a process fails, as
``_ANEInMemoryModel`` does after ~119. With a compile budget of n the executor replaces the worker before that
happens, recompiles on demand, and the results are bit-identical to the simulator's. A crash or a hang of the
worker is a one-line error within the timeout, and the next call starts a fresh worker.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time

import numpy as np
import pytest
import torch

from anetrain.ane.pipeline import AneSimPipeline
from anetrain.ane.programs import build_kernel_set
from anetrain.ane.runtime import make_runtime_pipeline
from anetrain.ane.runtime.device import AneRuntimeError, ProgramSpec
from anetrain.ane.runtime.ipc import Channel, IoArea, IoLayout, PeerTimeout, ProtocolError
from anetrain.ane.runtime.supervisor import WorkerExecutor
from anetrain.ane.sim import SimExecutor
from anetrain.ane.surfaces import Staging, TensorSpec
from anetrain.config import make_config
from anetrain.errors import AnetrainError
from anetrain.params import init_params
from anetrain.pipeline.dw import SerialDW

CFG = make_config(dim=64, hidden_dim=80, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=96, seq_len=32)


def staged(program, seed: int = 0) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    st = Staging(program)
    rng = np.random.default_rng(seed)
    for name, p in program.in_placements.items():
        st.write(name, rng.standard_normal((p.rows.n, p.cols.n)) / (8 if name.startswith("w") else 1))
    return st.arrays


# ------------------------------------------------------------------------------------------------
# The protocol


def test_frames_round_trip_and_a_closed_or_silent_peer_is_an_error() -> None:
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    a, b = Channel(r2, w1), Channel(r1, w2)
    payload = bytes(range(256)) * 5000  # larger than a pipe buffer: written and read in pieces
    deadline = time.monotonic() + 10
    t = threading.Thread(target=a.send, args=({"op": "load", "n": [1, 2]}, payload, deadline))
    t.start()
    msg, got = b.recv(deadline)
    t.join()
    assert msg == {"op": "load", "n": [1, 2]} and got == payload
    with pytest.raises(PeerTimeout):
        b.recv(time.monotonic() + 0.2)
    os.write(w1, b"\xff\xff\xff\xff\x00\x00\x00\x00")
    with pytest.raises(ProtocolError, match="corrupt"):
        b.recv(time.monotonic() + 1)
    a.close()
    with pytest.raises(EOFError):
        b.recv(time.monotonic() + 1)
    b.close()


def test_shared_areas_lay_tensors_out_aligned(tmp_path) -> None:  # type: ignore[no-untyped-def]
    layout = IoLayout.of(
        [TensorSpec("a", (1, 3, 1, 5)), TensorSpec("b", (1, 64, 1, 1))], [TensorSpec("y", (1, 2))]
    )
    assert [o for _, _, o in layout.inputs] == [0, 64] and layout.outputs[0][2] == 192 and layout.size == 256
    assert IoLayout.from_json(layout.to_json()) == layout
    parent = IoArea(str(tmp_path / "p.io"), layout, create=True)
    child = IoArea(str(tmp_path / "p.io"), layout, create=False)
    a = np.arange(15, dtype=np.float16).reshape(1, 3, 1, 5)
    parent.write_inputs({"a": a, "b": np.ones(64)}, "prog")
    np.testing.assert_array_equal(child.inputs["a"], a)
    child.outputs["y"][...] = [[7, 8]]
    assert parent.read_outputs()["y"].tolist() == [[7, 8]]
    with pytest.raises(ValueError, match="no data for input b"):
        parent.write_inputs({"a": a}, "prog")
    parent.close()
    child.close()


# ------------------------------------------------------------------------------------------------
# Restarts within the budget


def test_the_worker_is_replaced_before_the_leak_and_results_stay_identical() -> None:
    ks = build_kernel_set(CFG, "m4", "separate", seq=16, extras=True, programs="anetrain")
    names = ["sdpa_fwd", "wo_fwd", "ffn_fused", "ffn_bwd_w2t", "q_bwd"]
    inputs = {n: staged(ks[n], i) for i, n in enumerate(names)}
    reference = {n: SimExecutor().run(ks[n], inputs[n]) for n in names}
    ex = WorkerExecutor("sim", options={"leak_limit": 2}, budget=2)
    pids = []
    for _ in range(2):
        for n in names:
            got = ex.run(ks[n], inputs[n])
            pids.append(ex.worker_pid)
            assert ex.worker_compiles <= 2
            assert set(got) == set(reference[n])
            for k in got:
                assert np.array_equal(got[k], reference[n][k], equal_nan=True), (n, k)
    # 10 runs of 5 programs, 2 compiles per worker, programs recompiled in fresh workers: 5 workers
    assert ex.stats.compiles == 10 and ex.stats.restarts == 4 and ex.stats.evals == 10
    assert len(set(pids)) == 5
    ex.close()


def test_without_restarts_the_emulated_leak_does_fail() -> None:
    """The test above has teeth: a budget above the leak limit runs into it."""
    ks = build_kernel_set(CFG, "m4", "separate", seq=16, extras=True, programs="anetrain")
    ex = WorkerExecutor("sim", options={"leak_limit": 2}, budget=5)
    ex.run(ks["wo_fwd"], staged(ks["wo_fwd"]))
    ex.run(ks["q_bwd"], staged(ks["q_bwd"]))
    with pytest.raises(AneRuntimeError, match="compile of kv_bwd failed: simulated compile leak"):
        ex.run(ks["kv_bwd"], staged(ks["kv_bwd"]))
    ex.close()


def test_a_training_run_through_restarting_workers_matches_the_simulator() -> None:
    params = init_params(CFG, "llama2c", seed=0)
    g = torch.Generator().manual_seed(0)
    windows = [torch.randint(0, CFG.vocab_size, (1, 17), generator=g) for _ in range(2)]
    ref = AneSimPipeline(params.clone(), dw=SerialDW())
    ex = WorkerExecutor("sim", options={"leak_limit": 4}, budget=4)
    pipe = make_runtime_pipeline(params.clone(), chip="m4", runtime="sim", executor=ex)
    for w in windows:
        assert pipe.forward_backward(w, 256.0) == ref.forward_backward(w, 256.0)
        assert torch.equal(pipe.grads.flat, ref.grads.flat)
    assert ex.stats.restarts >= 3
    pipe.close()
    ref.close()
    assert not os.path.exists(ex._state.directory)


# ------------------------------------------------------------------------------------------------
# Failures


def test_a_crashing_worker_is_a_clear_error_and_the_next_call_gets_a_new_one() -> None:
    ks = build_kernel_set(CFG, "m4", "separate", seq=16, extras=True, programs="anetrain")
    ex = WorkerExecutor("sim", options={"crash_on": "wo_fwd"}, eval_timeout_s=30)
    ex.run(ks["q_bwd"], staged(ks["q_bwd"]))
    first = ex.worker_pid
    t0 = time.monotonic()
    with pytest.raises(
        AnetrainError, match=rf"ANE worker process \(pid {first}\) exited with status 70 while running wo_fwd"
    ):
        ex.run(ks["wo_fwd"], staged(ks["wo_fwd"]))
    assert time.monotonic() - t0 < 20
    assert ex.worker_pid is None
    out = ex.run(ks["q_bwd"], staged(ks["q_bwd"]))  # recompiled in a fresh worker
    assert ex.worker_pid not in (None, first)
    assert np.array_equal(out["dx"], SimExecutor().run(ks["q_bwd"], staged(ks["q_bwd"]))["dx"])
    ex.close()


def test_a_hanging_worker_times_out_and_is_stopped() -> None:
    ks = build_kernel_set(CFG, "m4", "separate", seq=16, extras=True, programs="anetrain")
    ex = WorkerExecutor("sim", options={"hang_on": "wo_fwd"}, eval_timeout_s=1.5)
    ex.run(ks["q_bwd"], staged(ks["q_bwd"]))
    proc = ex._state.proc
    t0 = time.monotonic()
    with pytest.raises(
        AnetrainError, match=r"did not answer within 1.5 s while running wo_fwd; it was stopped"
    ):
        ex.run(ks["wo_fwd"], staged(ks["wo_fwd"]))
    assert 1.4 < time.monotonic() - t0 < 15
    assert proc is not None and proc.poll() is not None  # the stuck process is gone
    ex.close()


def test_a_worker_that_cannot_make_its_device_reports_why() -> None:
    ex = WorkerExecutor("sim", options={"speed": "ludicrous"})
    ks = build_kernel_set(CFG, "m4", "separate", seq=16, extras=True, programs="anetrain")
    with pytest.raises(AneRuntimeError, match=r"unknown simulator device options \['speed'\]"):
        ex.run(ks["q_bwd"], staged(ks["q_bwd"]))
    ex.close()


def test_a_program_the_device_rejects_leaves_the_worker_serving() -> None:
    """A program the device will not compile (m4 text sent as m1) is answered with the device's error; a
    wrongly shaped input is refused before it is sent; the same worker goes on serving."""
    ks = build_kernel_set(CFG, "m4", "separate", seq=16, extras=True, programs="anetrain")
    ex = WorkerExecutor("sim")
    good = staged(ks["q_bwd"])
    ex.run(ks["q_bwd"], good)
    pid = ex.worker_pid
    wrong_chip = dataclasses.replace(ProgramSpec.of(ks["q_bwd"]), chip="m1")
    with pytest.raises(AneRuntimeError, match=r"does not compile on m1"):
        ex.run(wrong_chip, good)
    with pytest.raises(ValueError, match="needs shape"):
        ex.run(ks["q_bwd"], {**good, "dq": good["dq"][:, :3]})
    ex.run(ks["q_bwd"], good)
    assert ex.worker_pid == pid
    ex.close()


def test_both_runtimes_refuse_a_program_over_the_limits_before_the_device_sees_it() -> None:
    """The in-process runtime and the worker check a program against its chip's limits before compiling
    (here a program whose packed input is 16,576 wide on m1, where the limit is 16,384)."""
    from anetrain.ane.limits import AneLimitError
    from anetrain.ane.runtime import AneRuntimeExecutor
    from anetrain.ane.runtime.device import SimDevice

    ks = build_kernel_set(CFG, "m1", seq=16)
    program = ks["ffn_fused"]
    wide = dataclasses.replace(program, dialect=program.dialect)
    assert wide.graph is not None
    x = wide.graph.inputs[0]
    wide.graph = dataclasses.replace(
        wide.graph, inputs=[dataclasses.replace(x, shape=(1, x.shape[1], 1, 16576))]
    )
    device = SimDevice()
    ex = AneRuntimeExecutor(device)
    with pytest.raises(
        AneLimitError,
        match=r"^ANE program ffn_fused: tensor x \[.*\] has width 16576, above the limit of 16384 on m1$",
    ):
        ex.load(wide)
    assert device.compiles == 0
    worker = WorkerExecutor("sim")
    try:
        with pytest.raises(AneLimitError, match="has width 16576"):
            worker.load(wide)
        assert worker.worker_pid is None and worker.stats.compiles == 0  # no worker was even started
        worker.load(program)  # the program as built fits
        assert worker.stats.compiles == 1
    finally:
        worker.close()
