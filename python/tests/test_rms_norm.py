"""torch.ops.torchtpu.rms_norm against torch.nn.functional.rms_norm in f64: values and
gradients, f32 and bf16, ragged and empty shapes; torch's op checks; torch.compile; the TPU
module through the generic op layer; bad input."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import torchtpu
from torchtpu import library, tpu


def _tol(dtype):
    return dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape,normalized", [((1, 128), (128,)), ((3, 37, 200), (200,)), ((2, 5, 4, 50), (4, 50)), ((300, 1024), (1024,)), ((7,), (7,))], ids=str)
def test_matches_torch_in_f64(rng, shape, normalized, dtype, affine):
    x = torch.randn(*shape, generator=rng).to(dtype).requires_grad_()
    w = torch.randn(*normalized, generator=rng).to(dtype).requires_grad_() if affine else None
    eps = 1e-5
    out = torchtpu.rms_norm(x, normalized, w, eps)
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_() if affine else None
    want = F.rms_norm(x64, normalized, w64, eps)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out.double(), want, **_tol(dtype))
    grad = torch.randn(*shape, generator=rng).to(dtype)
    out.backward(grad)
    want.backward(grad.double())
    tol = _tol(dtype)
    if dtype == torch.bfloat16:
        # The weight's gradient sums over every row: its bf16 rounding grows with their number.
        tol = dict(atol=3e-2 * math.sqrt(x.numel() / math.prod(normalized)), rtol=3e-2)
    torch.testing.assert_close(x.grad.double(), x64.grad, **_tol(dtype))
    if affine:
        assert w.grad.dtype == dtype
        torch.testing.assert_close(w.grad.double(), w64.grad, **tol)


def test_default_eps_is_torchs(rng):
    x = torch.randn(4, 64, generator=rng) * 1e-4
    torch.testing.assert_close(torchtpu.rms_norm(x, (64,)), F.rms_norm(x, (64,)))


@pytest.mark.parametrize("shape", [(0, 64), (3, 0), (0,), (2, 0, 8)], ids=str)
def test_empty(shape):
    x = torch.zeros(shape, requires_grad=True)
    w = torch.ones(shape[-1], requires_grad=True)
    out = torchtpu.rms_norm(x, (shape[-1],), w)
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape and not w.grad.any()


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(rng, requires_grad):
    x = torch.randn(3, 19, 72, generator=rng, requires_grad=requires_grad)
    w = torch.randn(72, generator=rng, requires_grad=requires_grad)
    opcheck(torch.ops.torchtpu.rms_norm_forward.default, (x, w, 1e-6))
    opcheck(torch.ops.torchtpu.rms_norm_forward.default, (x, None, 1e-6))
    rstd = torch.ops.torchtpu.rms_norm_forward(x.detach(), w.detach(), 1e-6)[1]
    opcheck(torch.ops.torchtpu.rms_norm_backward.default, (x.detach(), w.detach(), torch.randn_like(x.detach()), rstd))


def test_compiles_fullgraph_and_exports(rng):
    x = torch.randn(8, 96, generator=rng)
    w = torch.randn(96, generator=rng)
    fn = torch.compile(lambda x, w: torchtpu.rms_norm(x, (96,), w) * 2, fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(x, w), F.rms_norm(x, (96,), w) * 2, atol=2e-5, rtol=2e-5)

    class Norm(torch.nn.Module):
        def forward(self, x, w):
            return torch.ops.torchtpu.rms_norm(x, [96], w)

    exported = torch.export.export(Norm(), (x, w))
    torch.testing.assert_close(exported.module()(x, w), F.rms_norm(x, (96,), w), atol=2e-5, rtol=2e-5)


def test_the_rust_op_describes_itself():
    assert {"rms_norm", "rms_norm_backward", "matmul", "flash_attention"} <= set(library.names())
    op = library.RustOp("rms_norm")
    problem = {"rows": 37, "dim": 200, "dtype": "bf16", "affine": True, "eps": 1e-6}
    inputs, outputs = op.signature(problem)
    assert inputs == (((37, 200), torch.bfloat16), ((1, 200), torch.bfloat16))
    assert outputs == (((37, 200), torch.bfloat16), ((37, 1), torch.float32))
    for chip in tpu.CHIPS:
        kernel = tpu.op_kernel(op, problem, chip)
        assert "tpu_custom_call" in kernel.module and kernel.inputs == inputs
        assert tpu.compile(kernel, chip) > 0
    with pytest.raises(ValueError, match="no Rust op `nope`"):
        library.RustOp("nope")
    with pytest.raises(ValueError, match="not a rms_norm problem"):
        op.signature({"rows": -1})


def test_bad_input_is_a_clear_error(rng):
    x = torch.randn(4, 8, generator=rng)
    with pytest.raises(ValueError, match="trailing dims"):
        torchtpu.rms_norm(x, (7,))
    with pytest.raises(ValueError, match="weight must have the normalized shape"):
        torchtpu.rms_norm(x, (8,), torch.ones(7))
    with pytest.raises(TypeError, match="torch.float32 or torch.bfloat16"):
        torchtpu.rms_norm(x.to(torch.int32), (8,))
    with pytest.raises(ValueError, match="eps must be finite"):
        torchtpu.rms_norm(x, (8,), None, float("nan"))
    with pytest.raises(ValueError, match="operand 0 must be"):
        library.RustOp("rms_norm")({"rows": 4, "dim": 8, "dtype": "f32", "affine": False, "eps": 0.0}, [torch.randn(3, 8), torch.zeros(1, 8)])
