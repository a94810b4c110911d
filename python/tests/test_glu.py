"""torchtpu.swiglu and torchtpu.geglu against F.silu(gate) * up and F.gelu(gate) * up in f64:
values and gradients, f32 and bf16, ragged and empty shapes; torch's op checks; torch.compile;
bad input."""

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import torchtpu

GLUS = {
    "swiglu": (torchtpu.swiglu, lambda g, u: F.silu(g) * u),
    "geglu": (torchtpu.geglu, lambda g, u: F.gelu(g) * u),
    "geglu_tanh": (lambda g, u: torchtpu.geglu(g, u, approximate="tanh"), lambda g, u: F.gelu(g, approximate="tanh") * u),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 128), (3, 37, 300), (256, 1100), (5,)], ids=str)
@pytest.mark.parametrize("glu", list(GLUS))
def test_matches_torch_in_f64(rng, glu, shape, dtype):
    ours, theirs = GLUS[glu]
    gate = (torch.randn(*shape, generator=rng) * 2).to(dtype).requires_grad_()
    up = torch.randn(*shape, generator=rng).to(dtype).requires_grad_()
    out = ours(gate, up)
    g64, u64 = gate.detach().double().requires_grad_(), up.detach().double().requires_grad_()
    want = theirs(g64, u64)
    # f32: gradients of tanh-GELU near its saturation lose a few ulps of values up to ~10.
    tol = dict(atol=1e-4, rtol=2e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)
    assert out.dtype == dtype and out.shape == gate.shape
    torch.testing.assert_close(out.double(), want, **tol)
    grad = torch.randn(*shape, generator=rng).to(dtype)
    out.backward(grad)
    want.backward(grad.double())
    torch.testing.assert_close(gate.grad.double(), g64.grad, **tol)
    torch.testing.assert_close(up.grad.double(), u64.grad, **tol)


def test_empty():
    gate = torch.zeros(0, 64, requires_grad=True)
    out = torchtpu.swiglu(gate, torch.zeros(0, 64))
    assert out.shape == (0, 64)
    out.sum().backward()
    assert gate.grad.shape == (0, 64)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(rng, requires_grad):
    gate = torch.randn(7, 133, generator=rng, requires_grad=requires_grad)
    up = torch.randn(7, 133, generator=rng, requires_grad=requires_grad)
    for activation in ("silu", "gelu", "gelu_tanh"):
        opcheck(torch.ops.torchtpu.glu_forward.default, (gate, up, activation))
    opcheck(torch.ops.torchtpu.glu_backward.default, (gate.detach(), up.detach(), torch.randn(7, 133, generator=rng), "gelu"))


def test_compiles_fullgraph(rng):
    gate, up = torch.randn(16, 256, generator=rng), torch.randn(16, 256, generator=rng)
    fn = torch.compile(lambda g, u: torchtpu.geglu(g, u) + 1, fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(gate, up), F.gelu(gate) * up + 1, atol=2e-5, rtol=2e-5)


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="one shape and dtype"):
        torchtpu.swiglu(torch.zeros(3, 4), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="approximate must be"):
        torchtpu.geglu(torch.zeros(3, 4), torch.zeros(3, 4), approximate="erf")
    with pytest.raises(ValueError, match="activation must be one of"):
        torch.ops.torchtpu.glu_forward(torch.zeros(3, 4), torch.zeros(3, 4), "relu")
    with pytest.raises(TypeError, match="torch.float32 or torch.bfloat16"):
        torchtpu.swiglu(torch.zeros(3, 4, dtype=torch.float64), torch.zeros(3, 4, dtype=torch.float64))


LINEAR_ACTS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda g: F.gelu(g, approximate="tanh")}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 64, 128), (37, 200, 300), (2, 33, 96, 160)], ids=str)
@pytest.mark.parametrize("activation", list(LINEAR_ACTS))
def test_glu_linear_matches_the_unfused_mlp_in_f64(rng, shape, dtype, activation):
    *lead, k, n = shape
    x = torch.randn(*lead, k, generator=rng).to(dtype).requires_grad_()
    w_gate = (torch.randn(n, k, generator=rng) / k**0.5).to(dtype).requires_grad_()
    w_up = (torch.randn(n, k, generator=rng) / k**0.5).to(dtype).requires_grad_()
    out = torchtpu.glu_linear(x, w_gate, w_up, activation)
    x64, g64, u64 = (t.detach().double().requires_grad_() for t in (x, w_gate, w_up))
    want = LINEAR_ACTS[activation](F.linear(x64, g64)) * F.linear(x64, u64)
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=4e-2, rtol=3e-2)
    assert out.dtype == dtype and out.shape == want.shape
    torch.testing.assert_close(out.double(), want, **tol)
    grad = torch.randn(want.shape, generator=rng).to(dtype)
    out.backward(grad)
    want.backward(grad.double())
    for ours, theirs in ((x, x64), (w_gate, g64), (w_up, u64)):
        if dtype == torch.float32:
            torch.testing.assert_close(ours.grad.double(), theirs.grad, **tol)
        else:  # bf16 rounds the projections' gradients before each matmul sums hundreds of them
            assert (ours.grad.double() - theirs.grad).norm() <= 1e-2 * theirs.grad.norm()
    with torch.no_grad():  # the inference form, which keeps no projections
        torch.testing.assert_close(torchtpu.glu_linear(x, w_gate, w_up, activation).double(), want.detach(), **tol)


def test_glu_linear_ops_check_and_compile(rng):
    x, wg, wu = torch.randn(9, 64, generator=rng), torch.randn(130, 64, generator=rng), torch.randn(130, 64, generator=rng)
    opcheck(torch.ops.torchtpu.glu_linear.default, (x, wg, wu, "silu"))
    opcheck(torch.ops.torchtpu.glu_linear_train.default, (x.requires_grad_(), wg, wu, "gelu"))
    fn = torch.compile(lambda x: torchtpu.glu_linear(x, wg, wu) + 1, fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(x.detach()), F.silu(x.detach() @ wg.T) * (x.detach() @ wu.T) + 1, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match=r"\[n, k\]"):
        torchtpu.glu_linear(x, wg, wu[:, :10])
    with pytest.raises(ValueError, match="activation must be"):
        torchtpu.glu_linear(x, wg, wu, "relu")
    assert torchtpu.glu_linear(torch.zeros(0, 64), wg, wu).shape == (0, 130)
