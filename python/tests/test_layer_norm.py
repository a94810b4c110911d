"""torch.ops.torchtpu.layer_norm against torch.nn.functional.layer_norm in f64: values and the
gradients of input, weight and bias, f32 and bf16, with or without each of weight and bias,
ragged and empty shapes; torch's op checks; torch.compile; bad input."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import torchtpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("affine", [(True, True), (True, False), (False, True), (False, False)], ids=str)
@pytest.mark.parametrize("shape,normalized", [((1, 128), (128,)), ((3, 37, 200), (200,)), ((2, 5, 4, 50), (4, 50)), ((7,), (7,))], ids=str)
def test_matches_torch_in_f64(rng, shape, normalized, dtype, affine):
    with_weight, with_bias = affine
    x = torch.randn(*shape, generator=rng).to(dtype).requires_grad_()
    w = torch.randn(*normalized, generator=rng).to(dtype).requires_grad_() if with_weight else None
    b = torch.randn(*normalized, generator=rng).to(dtype).requires_grad_() if with_bias else None
    out = torchtpu.layer_norm(x, normalized, w, b, 1e-5)
    leaf = lambda t: t.detach().double().requires_grad_() if t is not None else None  # noqa: E731
    x64, w64, b64 = leaf(x), leaf(w), leaf(b)
    want = F.layer_norm(x64, normalized, w64, b64, 1e-5)
    tol = dict(atol=5e-5, rtol=5e-5) if dtype == torch.float32 else dict(atol=5e-2, rtol=2e-2)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out.double(), want, **tol)
    grad = torch.randn(*shape, generator=rng).to(dtype)
    out.backward(grad)
    want.backward(grad.double())
    torch.testing.assert_close(x.grad.double(), x64.grad, **tol)
    # The weight's and bias' gradients sum over every row: their rounding grows with the rows.
    rows = x.numel() / math.prod(normalized)
    sum_tol = {k: v * math.sqrt(rows) for k, v in tol.items()}
    for leaf_, ref in ((w, w64), (b, b64)):
        if leaf_ is not None:
            assert leaf_.grad.dtype == dtype
            torch.testing.assert_close(leaf_.grad.double(), ref.grad, **sum_tol)


@pytest.mark.parametrize("shape", [(0, 64), (3, 0)], ids=str)
def test_empty(shape):
    x = torch.zeros(shape, requires_grad=True)
    w, b = torch.ones(shape[-1], requires_grad=True), torch.zeros(shape[-1], requires_grad=True)
    out = torchtpu.layer_norm(x, (shape[-1],), w, b)
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad.shape == x.shape and not w.grad.any() and not b.grad.any()


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(rng, requires_grad):
    x = torch.randn(3, 19, 72, generator=rng, requires_grad=requires_grad)
    w = torch.randn(72, generator=rng, requires_grad=requires_grad)
    b = torch.randn(72, generator=rng, requires_grad=requires_grad)
    opcheck(torch.ops.torchtpu.layer_norm_forward.default, (x, w, b, 1e-5))
    opcheck(torch.ops.torchtpu.layer_norm_forward.default, (x, None, b, 1e-5))
    _, mean, rstd = torch.ops.torchtpu.layer_norm_forward(x.detach(), w.detach(), b.detach(), 1e-5)
    opcheck(torch.ops.torchtpu.layer_norm_backward.default, (x.detach(), w.detach(), torch.randn_like(x.detach()), mean, rstd))


def test_compiles_fullgraph(rng):
    x, w, b = torch.randn(8, 96, generator=rng), torch.randn(96, generator=rng), torch.randn(96, generator=rng)
    fn = torch.compile(lambda x, w, b: torchtpu.layer_norm(x, (96,), w, b) * 2, fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(x, w, b), F.layer_norm(x, (96,), w, b) * 2, atol=5e-5, rtol=5e-5)


def test_bad_input_is_a_clear_error(rng):
    x = torch.randn(4, 8, generator=rng)
    with pytest.raises(ValueError, match="trailing dims"):
        torchtpu.layer_norm(x, (7,))
    with pytest.raises(ValueError, match="bias must have the normalized shape"):
        torchtpu.layer_norm(x, (8,), None, torch.ones(7))
    with pytest.raises(TypeError, match="torch.float32 or torch.bfloat16"):
        torchtpu.layer_norm(x.double(), (8,))
    with pytest.raises(ValueError, match="eps must be finite"):
        torchtpu.layer_norm(x, (8,), None, None, float("inf"))
