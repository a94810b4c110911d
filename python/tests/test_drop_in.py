"""What real call sites pass: torchtpu.matmul takes what torch.matmul takes (1-D, N-D, batch
broadcasting, activations times a weight, transposed and strided operands, f16) and
torchtpu.flash_attention what scaled_dot_product_attention takes in rank, strides and dtype;
values and gradients against torch in f64."""

import pytest
import torch
import torch.nn.functional as F

import torchtpu

MATMUL_SHAPES = [
    ((5,), (5,)),
    ((5,), (5, 3)),
    ((4, 5), (5,)),
    ((2, 7, 5), (5, 3)),  # activations times a weight: one folded kernel call
    ((2, 3, 7, 5), (5, 4)),
    ((2, 1, 7, 5), (3, 5, 4)),  # batch broadcasting
    ((7, 5), (2, 5, 4)),
    ((3,), (2, 3, 4)),
]
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=5e-2, rtol=3e-2), torch.float16: dict(atol=3e-3, rtol=3e-3)}


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("shapes", MATMUL_SHAPES, ids=str)
def test_matmul_takes_what_torch_matmul_takes(rng, shapes, dtype):
    a = torch.randn(*shapes[0], generator=rng).to(dtype).requires_grad_()
    b = torch.randn(*shapes[1], generator=rng).to(dtype).requires_grad_()
    out = torchtpu.matmul(a, b)
    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    want = torch.matmul(a64, b64)
    assert out.shape == want.shape and out.dtype == dtype
    torch.testing.assert_close(out.double(), want, **TOL[dtype])
    grad = torch.randn(want.shape, generator=rng, dtype=torch.float64)
    out.backward(grad.to(dtype))
    want.backward(grad.to(dtype).double())
    torch.testing.assert_close(a.grad.double(), a64.grad, **TOL[dtype])
    torch.testing.assert_close(b.grad.double(), b64.grad, **TOL[dtype])


def test_matmul_takes_transposed_and_strided_operands(rng):
    x, w = torch.randn(2, 9, 16, generator=rng), torch.randn(24, 16, generator=rng)
    torch.testing.assert_close(torchtpu.matmul(x, w.T), x @ w.T, **TOL[torch.float32])  # F.linear's x @ W.T
    strided, other = torch.randn(8, 40, generator=rng)[:, ::2], torch.randn(20, 6, generator=rng)
    torch.testing.assert_close(torchtpu.matmul(strided, other), strided @ other, **TOL[torch.float32])
    compiled = torch.compile(lambda x, w: torchtpu.matmul(x, w.T), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, w), x @ w.T, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", list(TOL))
def test_attention_takes_projection_views_other_ranks_and_f16(rng, dtype):
    b, s, h, d = 2, 33, 4, 16
    # A projection's output viewed per head: [b, s, h, d] transposed to [b, h, s, d].
    proj = torch.randn(b, s, 3 * h * d, generator=rng).to(dtype).requires_grad_()
    q, k, v = (t.view(b, s, h, d).transpose(1, 2) for t in proj.split(h * d, dim=-1))
    assert not q.is_contiguous()
    out = torchtpu.flash_attention(q, k, v, causal=True)
    proj64 = proj.detach().double().requires_grad_()
    q64, k64, v64 = (t.view(b, s, h, d).transpose(1, 2) for t in proj64.split(h * d, dim=-1))
    want = F.scaled_dot_product_attention(q64, k64, v64, is_causal=True)
    assert out.dtype == dtype and out.shape == want.shape
    tol = {**TOL, torch.float32: dict(atol=1e-4, rtol=1e-4)}[dtype]
    torch.testing.assert_close(out.double(), want, **tol)
    grad = torch.randn(want.shape, generator=rng, dtype=torch.float64)
    out.backward(grad.to(dtype))
    want.backward(grad.to(dtype).double())
    torch.testing.assert_close(proj.grad.double(), proj64.grad, **tol)


@pytest.mark.parametrize("shape", [(3, 20, 8), (2, 3, 2, 20, 8)], ids=str)
def test_attention_takes_sdpas_other_ranks(rng, shape):
    q, k, v = (torch.randn(*shape, generator=rng) for _ in range(3))
    out = torchtpu.flash_attention(q, k, v)
    torch.testing.assert_close(out.double(), F.scaled_dot_product_attention(q.double(), k.double(), v.double()), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dv", [8, 24, 0])
def test_attention_takes_a_v_head_dim_other_than_qs(rng, dv):
    q, k = torch.randn(2, 4, 19, 16, generator=rng, requires_grad=True), torch.randn(2, 2, 23, 16, generator=rng, requires_grad=True)
    v = torch.randn(2, 2, 23, dv, generator=rng, requires_grad=True)
    out = torchtpu.flash_attention(q, k, v, causal=True)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = F.scaled_dot_product_attention(q64, k64, v64, is_causal=True, enable_gqa=True)
    assert out.shape == want.shape
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    grad = torch.randn(want.shape, generator=rng, dtype=torch.float64)
    out.backward(grad.float())
    want.backward(grad)
    for ours, theirs in ((q, q64), (k, k64), (v, v64)):
        torch.testing.assert_close(ours.grad.double(), theirs.grad, atol=1e-5, rtol=1e-5)


def test_a_transposed_weight_is_read_in_place():
    # `x @ W.T` (F.linear's form) is the kernel's transposed-operand matmul: no copy of W.
    from torch.fx.experimental.proxy_tensor import make_fx

    def ops_of(f, *args):
        return [str(n.target) for n in make_fx(f)(*args).graph.nodes if n.op == "call_function"]

    x, bx, w, bw = torch.randn(4, 16), torch.randn(3, 4, 16), torch.randn(8, 16), torch.randn(3, 8, 16)
    assert "aten.clone.default" not in ops_of(lambda x, w: torchtpu.ops.matmul_like_torch(x, w.T), x, w)
    assert "aten.clone.default" not in ops_of(lambda x, w: torchtpu.ops.matmul_like_torch(x, w.mT), bx, bw)
    assert "aten.clone.default" in ops_of(lambda x, w: torchtpu.ops.matmul_like_torch(x, w[:, ::2].T), torch.randn(4, 8), w)
    for a, b in ((x, w.T), (bx, bw.mT)):
        torch.testing.assert_close(torchtpu.ops.matmul_like_torch(a, b), a @ b)
