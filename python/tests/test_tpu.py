"""The TPU path without a TPU: the modules a call on `tpu` tensors would register with
TorchTPU (shapes, dtypes, fingerprints), and that libtpu compiles them."""

import hashlib
import re

import pytest
import torch

from torchtpu import tpu


def meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device="meta")


def signature(module):
    """The argument and result types of the module's entry function."""
    header = next(line for line in module.splitlines() if "func.func public @main" in line)
    return re.findall(r"tensor<([0-9x]+)x(\w+)>", header)


def tensor_type(shape, dtype):
    return ("x".join(map(str, shape)), {torch.bfloat16: "bf16", torch.float32: "f32", torch.int32: "i32", torch.int8: "i8"}[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_attention_kernels_registered_for_a_call(dtype):
    q, k, v = meta(2, 8, 1024, 128, dtype=dtype), meta(2, 2, 1000, 128, dtype=dtype), meta(2, 2, 1000, 128, dtype=dtype)
    fwd, dkv, dq = tpu.flash_attention_kernels(q, k, v, True, 0.125, True, chip="v6e")
    assert fwd.inputs == (((2, 8, 1024, 128), dtype), ((2, 2, 1000, 128), dtype), ((2, 2, 1000, 128), dtype), ((2, 1024, 128), torch.int32), ((2, 8, 1000), torch.int32), ((1, 1, 8, 128), torch.float32), ((8, 128), torch.int32))
    assert fwd.outputs == (((2, 8, 1024, 128), dtype), ((2, 8, 1024, 1), torch.float32))
    assert dkv.outputs == (((2, 2, 1000, 128), dtype),) * 2
    assert dq.outputs == (((2, 8, 1024, 128), dtype),)
    for kernel in (fwd, dkv, dq):
        assert "tpu_custom_call" in kernel.module
        assert kernel.fingerprint == hashlib.blake2b(kernel.artifact, digest_size=16).hexdigest()
        # The entry function's arguments then results are exactly what the bridge is given.
        assert signature(kernel.module) == [tensor_type(s, d) for s, d in kernel.inputs + kernel.outputs]
    # Same call, same fingerprint (so the bridge registers once); another shape, another.
    assert tpu.flash_attention_kernels(q, k, v, True, 0.125, True, chip="v6e")[0].fingerprint == fwd.fingerprint
    other = tpu.flash_attention_kernels(meta(2, 8, 512, 128, dtype=dtype), k, v, True, 0.125, True, chip="v6e")[0]
    assert other.fingerprint != fwd.fingerprint


@pytest.mark.parametrize("chip", ["v5e", "v6e"])
def test_registered_kernels_compile_with_libtpu(chip):
    q, k, v = meta(1, 4, 512, 128), meta(1, 2, 512, 128), meta(1, 2, 512, 128)
    for kernel in tpu.flash_attention_kernels(q, k, v, True, 0.088, False, chip=chip):
        assert tpu.compile(kernel, chip) > 0
    mm = tpu.matmul_kernel(meta(3, 256, 384), meta(3, 384, 200), chip=chip)
    assert mm.inputs == (((3, 256, 384), torch.bfloat16), ((3, 384, 200), torch.bfloat16))
    assert mm.outputs == (((3, 256, 200), torch.bfloat16),)
    assert signature(mm.module) == [tensor_type(s, d) for s, d in mm.inputs + mm.outputs]
    assert tpu.compile(mm, chip) > 0


def test_bad_tpu_requests_are_errors(monkeypatch):
    with pytest.raises(ValueError, match="unknown TPU chip `v9`"):
        tpu.matmul_kernel(meta(8, 8), meta(8, 8), chip="v9")
    with pytest.raises(TypeError, match="float32 or torch.bfloat16"):
        tpu.matmul_kernel(meta(8, 8, dtype=torch.float16), meta(8, 8, dtype=torch.float16))
    monkeypatch.setenv("TORCHTPU_TPU_CHIP", "v3")
    with pytest.raises(ValueError, match="TORCHTPU_TPU_CHIP='v3'"):
        tpu.default_chip()
    with pytest.raises(RuntimeError):
        tpu.compile(tpu.TpuKernel("broken", "0", "module {", b"ML\xefR\x0d", (), ()), "v5e")


def test_tpu_implementations_wait_for_torchtpu():
    # Without TorchTPU there is no `tpu` device to register for.
    assert torch._C._get_privateuse1_backend_name() != "tpu"
    assert tpu.register() is False


@pytest.mark.parametrize("chip", ["v4", "v6e"])
def test_serving_ops_register_kernels_libtpu_compiles(chip):
    """The kernels gmm, tgmm, quantized_linear and ragged_paged_attention register on `tpu`
    tensors, for the problems their Python makes from torch arguments."""
    from torchtpu import grouped_matmul as gmm, paged_attention, quantized

    lhs, rhs, sizes = meta(300, 256), meta(8, 256, 384), torch.empty(8, dtype=torch.int64, device="meta")
    problems = [
        (gmm._GMM, gmm._gmm_problem(lhs, rhs, sizes, False)),
        (gmm._TGMM, gmm._tgmm_problem(lhs, meta(300, 384), sizes)),
        (quantized._QUANTIZED_MATMUL, quantized._problem(meta(16, 512), meta(384, 512, dtype=torch.int8), meta(384, 4, dtype=torch.float32), None, None, None)),
        (quantized._QUANTIZED_MATMUL, quantized._problem(meta(16, 512, dtype=torch.int8), meta(384, 512, dtype=torch.int8), meta(384, dtype=torch.float32), meta(16, dtype=torch.float32), None, torch.bfloat16)),
    ]
    tables = [torch.empty(s, dtype=torch.int32, device="meta") for s in ((4,), (4, 8), (5,), (1,))]
    problems.append((paged_attention._PAGED, paged_attention._problem(meta(64, 8, 128), meta(40, 16, 4, 128), tables[0], tables[1], tables[2], tables[3], 0.1, None, None)))
    for op, problem in problems:
        kernel = tpu.op_kernel(op, problem, chip=chip)
        assert signature(kernel.module) == [tensor_type(s, d) for s, d in kernel.inputs + kernel.outputs], op.name
        assert tpu.compile(kernel, chip) > 0, op.name


def test_tpu_implementations_take_their_ops_arguments():
    """A `tpu` implementation is called with the arguments the caller gave, defaults unfilled:
    each must have its op's parameters and defaults (a call leaving `transpose_b` out once
    failed on `tpu` tensors only)."""
    import inspect

    def parameters(fn):
        return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]

    for op, implementation in tpu.implementations():
        assert parameters(implementation) == parameters(op._init_fn), op._qualname
