"""The user's op as PyTorch sees it: values and gradients against the same function in torch
in f64, torch's op checks, torch.compile, the raw op with no Python of its own, the crate's own
tuned tables, and the TPU module compiled by libtpu for every chip."""

import json
import pathlib

import pytest
import torch
from torch.library import opcheck
from torchtpu import tpu
from torchtpu.library import RustOp

import user_ops


@pytest.fixture
def rng():
    seed = torch.seed()
    yield torch.Generator().manual_seed(seed)
    print(f"seed {seed}")


def reference(x, cap):
    return cap * torch.tanh(x / cap)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 128), (3, 37, 200), (300, 1024), (5,)], ids=str)
def test_matches_torch_in_f64(rng, shape, dtype):
    x = (torch.randn(*shape, generator=rng) * 20).to(dtype).requires_grad_()
    out = user_ops.softcap(x, 15.0)
    x64 = x.detach().double().requires_grad_()
    want = reference(x64, 15.0)
    tol = dict(atol=1e-4, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.1, rtol=2e-2)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out.double(), want, **tol)
    grad = torch.randn(*shape, generator=rng).to(dtype)
    out.backward(grad)
    want.backward(grad.double())
    torch.testing.assert_close(x.grad.double(), x64.grad, **(dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)))


def test_empty():
    out = user_ops.softcap(torch.zeros(0, 64, requires_grad=True), 5.0)
    assert out.shape == (0, 64)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(rng, requires_grad):
    x = torch.randn(7, 33, generator=rng, requires_grad=requires_grad)
    opcheck(torch.ops.user_ops.softcap.default, (x, 3.0))
    opcheck(torch.ops.user_ops.softcap_backward.default, (x.detach(), torch.randn(7, 33, generator=rng), 3.0))


def test_compiles_fullgraph(rng):
    x = torch.randn(16, 256, generator=rng)
    fn = torch.compile(lambda x: user_ops.softcap(x, 2.0) + 1, fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(x), reference(x, 2.0) + 1, atol=1e-5, rtol=1e-5)


def test_every_op_is_a_torch_op_without_python_of_its_own(rng):
    assert user_ops.RAW == ["user_ops_raw::softcap", "user_ops_raw::softcap_backward"]
    x = torch.randn(9, 130, generator=rng)
    problem = json.dumps({"rows": 9, "dim": 130, "dtype": "f32", "cap": 2.0})
    (out,) = torch.ops.user_ops_raw.softcap([x], problem)
    torch.testing.assert_close(out, reference(x, 2.0), atol=1e-5, rtol=1e-5)
    opcheck(torch.ops.user_ops_raw.softcap.default, ([x], problem))


def test_tuned_tables_are_the_crates_own(tmp_path, monkeypatch):
    # `user-ops tables` wrote tables/*.json; with no tuning result cached, the CPU run of a
    # tabled problem uses the crate's entry.
    monkeypatch.setenv("TORCHTPU_CACHE_DIR", str(tmp_path))
    table = json.loads((pathlib.Path(__file__).resolve().parents[1] / "tables" / "cpu.json").read_text())
    for name in ("softcap", "softcap_backward"):
        config = RustOp(name, module=user_ops._user_ops).config({"rows": 4096, "dim": 4096, "dtype": "f32", "cap": 7.0})
        assert config == table[name]["d4096/f32"], name


def test_tpu_modules_compile_for_every_chip():
    op = RustOp("softcap", module=user_ops._user_ops)
    for chip in tpu.CHIPS:
        kernel = tpu.op_kernel(op, {"rows": 4096, "dim": 4096, "dtype": "bf16", "cap": 30.0}, chip)
        assert tpu.compile(kernel, chip) > 0


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="cap must be positive"):
        user_ops.softcap(torch.zeros(3, 4), -1.0)
    with pytest.raises(TypeError, match="torch.float32 or torch.bfloat16"):
        user_ops.softcap(torch.zeros(3, 4, dtype=torch.int32), 1.0)
