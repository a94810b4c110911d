"""torchtpu.linear_cross_entropy against F.cross_entropy(input @ weight.T, target) in f64: losses
and gradients of input and weight for every reduction, ignore_index and label smoothing, f32
and bf16, ragged tokens and vocab; gradcheck on a small f64-checked shape; empty input;
torch's op checks; torch.compile; bad input."""

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import torchtpu


def _inputs(rng, tokens, hidden, vocab, dtype, ignored_every=4):
    h = torch.randn(tokens, hidden, generator=rng).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=rng) / hidden**0.5).to(dtype).requires_grad_()
    target = torch.randint(0, vocab, (tokens,), generator=rng)
    target[ignored_every - 1 :: ignored_every] = -100
    return h, w, target


TOL = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 8, 3), (37, 64, 300), (130, 96, 1000)], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_matches_unfused_cross_entropy_in_f64(rng, shape, dtype, reduction, label_smoothing):
    h, w, target = _inputs(rng, *shape, dtype)
    loss = torchtpu.linear_cross_entropy(h, w, target, reduction=reduction, label_smoothing=label_smoothing)
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    want = F.cross_entropy(h64 @ w64.T, target, reduction=reduction, label_smoothing=label_smoothing)
    assert loss.dtype == dtype and loss.shape == want.shape
    torch.testing.assert_close(loss.double(), want, **TOL[dtype])
    grad = torch.randn(want.shape, generator=rng, dtype=torch.float64)
    loss.backward(grad.to(dtype))
    want.backward(grad.to(dtype).double())
    scale = 1.0 if dtype == torch.float32 else 4.0
    torch.testing.assert_close(h.grad.double(), h64.grad, atol=TOL[dtype]["atol"] * scale, rtol=TOL[dtype]["rtol"] * scale)
    torch.testing.assert_close(w.grad.double(), w64.grad, atol=TOL[dtype]["atol"] * scale, rtol=TOL[dtype]["rtol"] * scale)


def test_leading_dims_and_custom_ignore_index(rng):
    h = torch.randn(2, 5, 16, generator=rng)
    w = torch.randn(50, 16, generator=rng)
    target = torch.randint(0, 50, (2, 5), generator=rng)
    target[0, 1] = 7
    loss = torchtpu.linear_cross_entropy(h, w, target, ignore_index=7, reduction="none")
    want = F.cross_entropy((h @ w.T).reshape(10, 50), target.reshape(10), ignore_index=7, reduction="none").reshape(2, 5)
    torch.testing.assert_close(loss, want, **TOL[torch.float32])


def test_gradients_by_finite_differences():
    gen = torch.Generator().manual_seed(5)
    h = torch.randn(6, 4, generator=gen).requires_grad_()
    w = torch.randn(9, 4, generator=gen).requires_grad_()
    target = torch.tensor([0, 8, -100, 3, 3, 1])
    loss = torchtpu.linear_cross_entropy(h, w, target, label_smoothing=0.2)
    dh, dw = torch.autograd.grad(loss, (h, w))
    step = 1e-3
    for param, grad in ((h, dh), (w, dw)):
        for index in [(0, 0), (1, 2), (5, 3)]:
            with torch.no_grad():
                nudged = []
                for sign in (1, -1):
                    p = param.detach().double().clone()
                    p[index] += sign * step
                    hh, ww = (p, w.detach().double()) if param is h else (h.detach().double(), p)
                    nudged.append(F.cross_entropy(hh @ ww.T, target, label_smoothing=0.2))
            fd = (nudged[0] - nudged[1]) / (2 * step)
            assert abs(float(fd) - float(grad[index])) < 1e-4, (index, float(fd), float(grad[index]))


def test_every_target_ignored_or_no_tokens_gives_what_torch_gives():
    h, w = torch.randn(3, 8), torch.randn(5, 8)
    ignored = torch.full((3,), -100)
    assert torchtpu.linear_cross_entropy(h, w, ignored).isnan() and F.cross_entropy(h @ w.T, ignored).isnan()
    assert torchtpu.linear_cross_entropy(h, w, ignored, reduction="sum") == 0
    empty = torch.zeros(0, 8, requires_grad=True)
    loss = torchtpu.linear_cross_entropy(empty, w, torch.zeros(0, dtype=torch.int64), reduction="sum")
    assert loss == 0
    loss.backward()
    assert empty.grad.shape == (0, 8)
    no_hidden = torchtpu.linear_cross_entropy(torch.zeros(3, 0), torch.zeros(5, 0), torch.tensor([0, 4, 2]))
    torch.testing.assert_close(no_hidden, F.cross_entropy(torch.zeros(3, 5), torch.tensor([0, 4, 2])))


def test_opcheck(rng):
    h, w, target = _inputs(rng, 19, 32, 200, torch.float32)
    for reduction in ("mean", "none"):
        opcheck(torch.ops.torchtpu.linear_cross_entropy.default, (h, w, target, -100, 0.1, reduction))
    _, lse = torch.ops.torchtpu.linear_cross_entropy(h.detach(), w.detach(), target, -100, 0.0, "sum")
    args = (h.detach(), w.detach(), target, lse, torch.tensor(1.0), -100, 0.0, "sum")
    opcheck(torch.ops.torchtpu.linear_cross_entropy_backward_h.default, args)
    opcheck(torch.ops.torchtpu.linear_cross_entropy_backward_weight.default, args)


def test_compiles_fullgraph(rng):
    h, w, target = _inputs(rng, 16, 32, 100, torch.float32)
    fn = torch.compile(lambda h, w: torchtpu.linear_cross_entropy(h, w, target) * 2, fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(h.detach(), w.detach()), 2 * F.cross_entropy(h.detach() @ w.detach().T, target), **TOL[torch.float32])


def test_bad_input_is_a_clear_error():
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(IndexError, match="out of bounds"):
        torchtpu.linear_cross_entropy(h, w, torch.tensor([0, 1, 10, 2]))
    with pytest.raises(IndexError, match="out of bounds"):
        torchtpu.linear_cross_entropy(h, w, torch.tensor([0, 1, -5, 2]))
    with pytest.raises(ValueError, match=r"\[vocab, hidden\]"):
        torchtpu.linear_cross_entropy(h, torch.randn(10, 9), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="target must"):
        torchtpu.linear_cross_entropy(h, w, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="target must"):
        torchtpu.linear_cross_entropy(h, w, torch.zeros(4))
    with pytest.raises(ValueError, match="label_smoothing"):
        torchtpu.linear_cross_entropy(h, w, torch.zeros(4, dtype=torch.int64), label_smoothing=2.0)
    with pytest.raises(ValueError, match="reduction"):
        torchtpu.linear_cross_entropy(h, w, torch.zeros(4, dtype=torch.int64), reduction="avg")
    with pytest.raises(TypeError, match="one dtype"):
        torchtpu.linear_cross_entropy(h, w.bfloat16(), torch.zeros(4, dtype=torch.int64))
