"""Apple's own tooling checks every kernel program: coremltools' MIL builder and ct.convert (Linux-capable).

Each program's graph (the same one its MIL text is rendered from) is rebuilt op by op with
``coremltools.converters.mil.Builder``: Apple's op registry validates op names and parameters and its
type inference recomputes every result's dtype and shape, which must equal what our text declares. The
program is then converted to an ML program (``convert_to="mlprogram"``) for the chip's deployment target.
Only prediction needs macOS. Skipped when coremltools (the "coreml" extra) is not installed.
"""

from __future__ import annotations

import functools
import gc
import logging

import pytest

from anetrain.ane.mil import Graph, Op, Var, to_coreml
from anetrain.ane.programs import BACKWARD, EXTRAS, FORWARD, build_kernel_set
from anetrain.config import make_config

ct = pytest.importorskip(
    "coremltools", reason="coremltools is not installed (pip install 'anetrain[coreml]')"
)

CONFIGS = {
    # MHA, head_dim 16 padded to 32, hidden 80 padded to 96, seq 24 padded to 32
    "mha": make_config(dim=64, hidden_dim=80, n_layers=1, n_heads=4, n_kv_heads=4, vocab_size=96, seq_len=24),
    # GQA shaped like stories260K (head_dim 8, hidden 172), with head_dim = dim/heads
    "gqa": make_config(
        dim=64, hidden_dim=172, n_layers=1, n_heads=8, n_kv_heads=4, vocab_size=96, seq_len=32
    ),
}


@pytest.fixture(autouse=True)
def _quiet_and_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """ct.convert ends with a full gc.collect() (0.2 s each, nothing to do with validation) and logs progress
    bars; neither helps a test."""
    monkeypatch.setattr(gc, "collect", lambda *a, **k: 0)
    logging.getLogger("coremltools").setLevel(logging.ERROR)


@functools.cache
def kernels(name: str, chip: str, inputs: str):  # type: ignore[no-untyped-def]
    return build_kernel_set(CONFIGS[name], chip, inputs, extras=True, programs="anetrain")


@pytest.mark.parametrize("inputs", ["separate", "packed"])
@pytest.mark.parametrize("chip", ["m1", "m4"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_program_builds_and_converts_with_coremltools(name: str, chip: str, inputs: str) -> None:
    ks = kernels(name, chip, inputs)
    assert [p.name for p in ks] == list(FORWARD + BACKWARD + EXTRAS)
    target = getattr(ct.target, ks.dialect.coreml_target)
    for p in ks:
        prog, mismatches = to_coreml(p.graph, p.dialect)
        assert mismatches == [], f"{p.name}: {mismatches}"
        assert prog.functions["main"].opset_version == target
        model = ct.convert(
            prog, convert_to="mlprogram", minimum_deployment_target=target, skip_model_load=True
        )
        desc = model.get_spec().description
        fp16 = ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT16
        assert [(i.name, tuple(i.type.multiArrayType.shape)) for i in desc.input] == [
            (t.name, t.shape) for t in p.inputs
        ], p.name
        assert {o.name: tuple(o.type.multiArrayType.shape) for o in desc.output} == {
            t.name: t.shape for t in p.outputs
        }, p.name
        assert all(i.type.multiArrayType.dataType == fp16 for i in [*desc.input, *desc.output]), p.name


def test_a_wrong_declared_shape_is_caught() -> None:
    """The check has teeth: a graph whose recorded shape disagrees with Apple's inference is reported."""
    p = build_kernel_set(CONFIGS["gqa"], "m4", "separate", extras=True, programs="anetrain")["wo_fwd"]
    graph = p.graph
    assert graph is not None
    idx = next(i for i, n in enumerate(graph.nodes) if n.out.name == "o")
    node = graph.nodes[idx]
    assert isinstance(node, Op) and node.out.shape == (1, 64, 1, 32)
    bad_out = Var("o", "fp16", (1, 32, 1, 64))
    nodes = [*graph.nodes[:idx], Op(node.op, bad_out, node.args), *graph.nodes[idx + 1 :]]
    _, mismatches = to_coreml(Graph(graph.inputs, nodes, [bad_out], graph.blobs), p.dialect)
    assert mismatches == ["o: text says fp16[1, 32, 1, 64], coremltools infers fp16[1, 64, 1, 32]"]
