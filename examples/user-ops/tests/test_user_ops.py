"""The user's op as PyTorch sees it: values and gradients against torch's own SwiGLU in f64,
torch's op checks, torch.compile, and the TPU module compiled by libtpu for every chip."""

import json
import pathlib

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck
from torchtpu import tpu
from torchtpu.library import RustOp

import user_ops


@pytest.fixture
def rng():
    seed = torch.seed()
    yield torch.Generator().manual_seed(seed)
    print(f"seed {seed}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 128), (3, 37, 200), (300, 1024), (5,)], ids=str)
def test_matches_torch_in_f64(rng, shape, dtype):
    gate = torch.randn(*shape, generator=rng).to(dtype).requires_grad_()
    up = torch.randn(*shape, generator=rng).to(dtype).requires_grad_()
    out = user_ops.swiglu(gate, up)
    g64, u64 = gate.detach().double().requires_grad_(), up.detach().double().requires_grad_()
    want = F.silu(g64) * u64
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    assert out.dtype == dtype and out.shape == gate.shape
    torch.testing.assert_close(out.double(), want, **tol)
    grad = torch.randn(*shape, generator=rng).to(dtype)
    out.backward(grad)
    want.backward(grad.double())
    torch.testing.assert_close(gate.grad.double(), g64.grad, **tol)
    torch.testing.assert_close(up.grad.double(), u64.grad, **tol)


def test_empty():
    gate = torch.zeros(0, 64, requires_grad=True)
    out = user_ops.swiglu(gate, torch.zeros(0, 64))
    assert out.shape == (0, 64)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(rng, requires_grad):
    gate = torch.randn(7, 33, generator=rng, requires_grad=requires_grad)
    up = torch.randn(7, 33, generator=rng, requires_grad=requires_grad)
    opcheck(torch.ops.user_ops.swiglu.default, (gate, up))
    opcheck(torch.ops.user_ops.swiglu_backward.default, (gate.detach(), up.detach(), torch.randn(7, 33, generator=rng)))


def test_compiles_fullgraph(rng):
    gate, up = torch.randn(16, 256, generator=rng), torch.randn(16, 256, generator=rng)
    fn = torch.compile(lambda g, u: user_ops.swiglu(g, u) + 1, fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(gate, up), F.silu(gate) * up + 1, atol=1e-5, rtol=1e-5)


def test_tpu_modules_compile_for_every_chip():
    op = RustOp("swiglu", module=user_ops._user_ops)
    for chip in tpu.CHIPS:
        kernel = tpu.op_kernel(op, {"rows": 4096, "dim": 4096, "dtype": "bf16"}, chip)
        assert tpu.compile(kernel, chip) > 0


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="one shape and dtype"):
        user_ops.swiglu(torch.zeros(3, 4), torch.zeros(3, 5))
    with pytest.raises(TypeError, match="torch.float32 or torch.bfloat16"):
        user_ops.swiglu(torch.zeros(3, 4, dtype=torch.int32), torch.zeros(3, 4, dtype=torch.int32))


def test_every_op_is_a_torch_op_without_python_of_its_own(rng):
    assert user_ops.RAW == ["user_ops_raw::swiglu", "user_ops_raw::swiglu_backward"]
    gate, up = torch.randn(9, 130, generator=rng), torch.randn(9, 130, generator=rng)
    problem = json.dumps({"rows": 9, "dim": 130, "dtype": "f32"})
    (out,) = torch.ops.user_ops_raw.swiglu([gate, up], problem)
    torch.testing.assert_close(out, F.silu(gate) * up, atol=1e-5, rtol=1e-5)
    opcheck(torch.ops.user_ops_raw.swiglu.default, ([gate, up], problem))


def test_tuned_tables_are_the_crates_own(tmp_path, monkeypatch):
    # `user-ops tables` wrote tables/*.json; with no tuning result cached, the CPU run of a
    # tabled problem uses the crate's entry.
    monkeypatch.setenv("TORCHTPU_CACHE_DIR", str(tmp_path))
    table = json.loads((pathlib.Path(__file__).resolve().parents[1] / "tables" / "cpu.json").read_text())
    for name in ("swiglu", "swiglu_backward"):
        config = RustOp(name, module=user_ops._user_ops).config({"rows": 4096, "dim": 4096, "dtype": "f32"})
        assert config == table[name]["d4096/f32"], name
