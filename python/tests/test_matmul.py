"""torch.ops.torchtpu.matmul against torch.matmul in f64, and torch's op checks."""

import pytest
import torch
from torch.library import opcheck

import torchtpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(128, 128, 128), (1, 300, 7), (200, 72, 520), (513, 257, 129), (3, 65, 33, 47)], ids=str)
def test_matches_torch_matmul(rng, shape, dtype):
    *batch, m, k, n = shape
    a = torch.randn(*batch, m, k, generator=rng).to(dtype).requires_grad_()
    b = torch.randn(*batch, k, n, generator=rng).to(dtype).requires_grad_()
    out = torch.ops.torchtpu.matmul(a, b)
    want = a.detach().double() @ b.detach().double()
    # bf16 inputs, f32 accumulation: the error is the output's own rounding to bf16.
    tol = dict(atol=1e-4 * k**0.5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2 * k**0.5, rtol=1e-2)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), want, **tol)
    grad = torch.randn(*batch, m, n, generator=rng).to(dtype)
    out.backward(grad)
    torch.testing.assert_close(a.grad.double(), grad.double() @ b.detach().double().mT, **tol)
    torch.testing.assert_close(b.grad.double(), a.detach().double().mT @ grad.double(), atol=tol["atol"] * (m / k) ** 0.5, rtol=tol["rtol"])


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(rng, requires_grad):
    for shape in [(20, 12, 9), (2, 33, 17, 5)]:
        *batch, m, k, n = shape
        a = torch.randn(*batch, m, k, generator=rng, requires_grad=requires_grad)
        b = torch.randn(*batch, k, n, generator=rng, requires_grad=requires_grad)
        opcheck(torch.ops.torchtpu.matmul.default, (a, b))


def test_gradcheck(rng):
    # As for attention: f64 leaves through the f32 kernel, tolerances for f32.
    a = torch.randn(2, 9, 13, generator=rng, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 13, 6, generator=rng, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: torchtpu.matmul(a.float(), b.float()).double(), (a, b), eps=1e-3, atol=2e-3, rtol=1e-2)
