"""The TPU modules as StableHLO portable artifacts (what TorchTPU's bridge is given), read back
by an independent implementation: jaxlib's StableHLO deserializer (a pinned test-only
dependency) turns every shipped op's artifact, lowered for every chip, into the very module of
its text form, and libtpu compiles the artifact for that chip."""

import json

import pytest
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import stablehlo

from torchtpu import _torchtpu, library, tpu


def problems():
    """Every registered op's example problem, in each dtype it comes in."""
    for name in library.names():
        for problem in library.RustOp(name).examples():
            yield name, problem


def canonical(module: ir.Module) -> str:
    return module.operation.get_asm(enable_debug_info=False)


@pytest.mark.parametrize("chip", tpu.CHIPS)
def test_every_op_artifact_reads_back_as_its_text_module_and_compiles(chip):
    checked = set()
    for name, problem in problems():
        text, artifact = _torchtpu.op_tpu_module(name, json.dumps(problem), chip)
        assert artifact[:4] == b"ML\xefR", name
        with ir.Context() as ctx:
            stablehlo.register_dialect(ctx)
            ours = stablehlo.deserialize_portable_artifact(ctx, artifact)
            assert canonical(ours) == canonical(ir.Module.parse(text)), (name, problem)
        if name not in checked:
            # One dtype each is enough here: each op's own tests compile both for every chip.
            assert _torchtpu.compile_for_tpu(artifact, chip) > 0, (name, problem)
        checked.add(name)
    assert checked == set(_torchtpu.op_names())


def test_the_artifact_is_at_a_version_consumers_read():
    """The producer names a VHLO version jaxlib reads (between its minimum and current)."""
    _, artifact = _torchtpu.op_tpu_module("matmul", _torchtpu.op_example("matmul"), "v5e")
    producer = artifact[5 : artifact.index(b"\0", 5)].decode()
    assert producer.startswith("StableHLO_v")
    version = tuple(int(x) for x in producer.removeprefix("StableHLO_v").split("."))
    parse = lambda v: tuple(int(x) for x in v.split("."))  # noqa: E731
    assert parse(stablehlo.get_minimum_version()) <= version <= parse(stablehlo.get_current_version())


def test_a_kernel_carries_the_artifact_of_its_text():
    """A kernel (what `tpu._run` registers with the bridge) holds the artifact of its text
    module, and libtpu compiles it."""
    import torch

    a = torch.empty(256, 384, dtype=torch.bfloat16, device="meta")
    kernel = tpu.matmul_kernel(a, torch.empty(384, 512, dtype=torch.bfloat16, device="meta"), chip="v6e")
    with ir.Context() as ctx:
        stablehlo.register_dialect(ctx)
        assert canonical(stablehlo.deserialize_portable_artifact(ctx, kernel.artifact)) == canonical(ir.Module.parse(kernel.module))
    assert tpu.compile(kernel, "v6e") > 0
