"""torchtpu.gmm and torchtpu.tgmm against a per-group loop of matmuls in f64: values and
gradients (against PyTorch's autograd of the loop), random group sizes with empty groups, one
group holding every row and rows left over, f32 and bf16, ragged and empty shapes; torch's op
checks; torch.compile; bad group sizes; a property test over shapes and splits."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.library import opcheck

import torchtpu


def reference(lhs, rhs, sizes, transpose_rhs=False):
    """gmm written out: one matmul per group, zeros for the rows after the last group."""
    out = lhs.new_zeros(lhs.shape[0], rhs.shape[1] if transpose_rhs else rhs.shape[2])
    start = 0
    for j, size in enumerate(sizes.tolist()):
        w = rhs[j].T if transpose_rhs else rhs[j]
        out[start : start + size] = lhs[start : start + size] @ w
        start += size
    return out


def random_sizes(rng, groups, rows):
    """Sizes summing to at most ``rows``: some groups empty, sometimes rows left over."""
    cuts = torch.randint(0, rows + 1, (groups,), generator=rng).sort().values
    if torch.rand(1, generator=rng).item() < 0.5:
        cuts[-1] = rows
    sizes = torch.diff(cuts, prepend=torch.zeros(1, dtype=cuts.dtype))
    return sizes.to(torch.int32)


def splits(rng, groups, rows):
    every = torch.zeros(groups, dtype=torch.int32)
    every[-1] = rows
    return [random_sizes(rng, groups, rows), random_sizes(rng, groups, rows), every, torch.zeros(groups, dtype=torch.int32)]


def tolerance(dtype):
    return dict(atol=2e-4, rtol=2e-5) if dtype == torch.float32 else dict(atol=5e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transpose_rhs", [False, True])
@pytest.mark.parametrize("m,k,n,groups", [(1, 64, 128, 1), (37, 96, 130, 3), (300, 256, 200, 8)], ids=str)
def test_matches_a_loop_of_matmuls_in_f64(rng, m, k, n, groups, transpose_rhs, dtype):
    for sizes in splits(rng, groups, m):
        lhs = torch.randn(m, k, generator=rng).to(dtype).requires_grad_()
        shape = (groups, n, k) if transpose_rhs else (groups, k, n)
        rhs = (torch.randn(*shape, generator=rng) / k**0.5).to(dtype).requires_grad_()
        out = torchtpu.gmm(lhs, rhs, sizes, transpose_rhs=transpose_rhs)
        l64, r64 = lhs.detach().double().requires_grad_(), rhs.detach().double().requires_grad_()
        want = reference(l64, r64, sizes, transpose_rhs)
        assert out.dtype == dtype and out.shape == (m, n)
        torch.testing.assert_close(out.double(), want, **tolerance(dtype))
        grad = torch.randn(m, n, generator=rng).to(dtype)
        out.backward(grad)
        want.backward(grad.double())
        torch.testing.assert_close(lhs.grad.double(), l64.grad, **tolerance(dtype))
        torch.testing.assert_close(rhs.grad.double(), r64.grad, **tolerance(dtype))


def test_tgmm_is_the_per_group_weight_gradient(rng):
    m, k, n, groups = 50, 128, 72, 4
    lhs, grad = torch.randn(m, k, generator=rng), torch.randn(m, n, generator=rng)
    sizes = torch.tensor([10, 0, 33, 2])
    out = torchtpu.tgmm(lhs, grad, sizes)
    assert out.shape == (groups, k, n)
    starts = [0, 10, 10, 43]
    for j in range(groups):
        rows = slice(starts[j], starts[j] + int(sizes[j]))
        torch.testing.assert_close(out[j].double(), lhs[rows].double().T @ grad[rows].double(), atol=1e-4, rtol=2e-5)


def test_any_integer_sizes(rng):
    lhs, rhs = torch.randn(20, 64, generator=rng), torch.randn(2, 64, 128, generator=rng)
    want = torchtpu.gmm(lhs, rhs, torch.tensor([5, 15], dtype=torch.int32))
    for dtype in (torch.int64, torch.int16, torch.uint8):
        torch.testing.assert_close(torchtpu.gmm(lhs, rhs, torch.tensor([5, 15], dtype=dtype)), want)


def test_empty(rng):
    sizes = torch.tensor([0, 0], dtype=torch.int32)
    lhs = torch.zeros(0, 64, requires_grad=True)
    rhs = torch.randn(2, 64, 128, generator=rng, requires_grad=True)
    out = torchtpu.gmm(lhs, rhs, sizes)
    assert out.shape == (0, 128)
    out.sum().backward()
    assert lhs.grad.shape == (0, 64) and torch.equal(rhs.grad, torch.zeros_like(rhs))
    # k = 0: every product is an empty sum.
    assert torch.equal(torchtpu.gmm(torch.zeros(4, 0), torch.zeros(2, 0, 8), torch.tensor([1, 3])), torch.zeros(4, 8))


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(rng, requires_grad):
    lhs = torch.randn(29, 96, generator=rng, requires_grad=requires_grad)
    rhs = torch.randn(3, 96, 130, generator=rng, requires_grad=requires_grad)
    sizes = torch.tensor([7, 0, 20], dtype=torch.int32)
    opcheck(torch.ops.torchtpu.gmm.default, (lhs, rhs, sizes, False))
    opcheck(torch.ops.torchtpu.gmm.default, (lhs, rhs.detach().transpose(1, 2).contiguous().requires_grad_(requires_grad), sizes, True))
    opcheck(torch.ops.torchtpu.tgmm.default, (lhs.detach(), torch.randn(29, 40, generator=rng), sizes))


def test_compiles_fullgraph(rng):
    lhs, rhs = torch.randn(40, 64, generator=rng), torch.randn(4, 64, 128, generator=rng)
    sizes = torch.tensor([10, 10, 0, 20])
    fn = torch.compile(lambda a, b, s: torchtpu.gmm(a, b, s) * 2, fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(lhs, rhs, sizes), reference(lhs, rhs, sizes) * 2, atol=1e-4, rtol=2e-5)


def test_bad_input_is_a_clear_error():
    lhs, rhs = torch.zeros(16, 64), torch.zeros(3, 64, 128)
    with pytest.raises(ValueError, match="group end 1 is 3 after 5: a negative group size"):
        torchtpu.gmm(lhs, rhs, torch.tensor([5, -2, 3]))
    with pytest.raises(ValueError, match="past lhs's 16 rows"):
        torchtpu.gmm(lhs, rhs, torch.tensor([5, 6, 6]))
    # A sum past int32 is still past the rows, not wrapped round into range.
    with pytest.raises(ValueError, match="past lhs's 16 rows"):
        torchtpu.gmm(lhs, rhs, torch.tensor([2**32 + 1, 0, 0]))
    with pytest.raises(ValueError, match="past lhs's 16 rows"):
        torchtpu.tgmm(lhs, torch.zeros(16, 8), torch.tensor([2**40, -(2**40), 1]))
    with pytest.raises(ValueError, match="one matrix per group"):
        torchtpu.gmm(lhs, rhs, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="must agree on k"):
        torchtpu.gmm(lhs, torch.zeros(3, 32, 128), torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="integer tensor"):
        torchtpu.gmm(lhs, rhs, torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="1-D"):
        torchtpu.gmm(lhs, rhs, torch.tensor(3))
    with pytest.raises(TypeError, match="one dtype"):
        torchtpu.gmm(lhs, rhs.bfloat16(), torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="torch.float32 or torch.bfloat16"):
        torchtpu.gmm(lhs.double(), rhs.double(), torch.tensor([1, 2, 3]))


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(1, 70),
    k=st.sampled_from([1, 8, 64, 130]),
    n=st.sampled_from([1, 24, 128, 200]),
    data=st.data(),
)
def test_property_any_split_matches_the_loop(m, k, n, data):
    groups = data.draw(st.integers(1, 6))
    sizes = data.draw(st.lists(st.integers(0, m), min_size=groups, max_size=groups))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    lhs, rhs = torch.randn(m, k, generator=gen), torch.randn(groups, k, n, generator=gen)
    sizes = torch.tensor(sizes)
    if sum(sizes.tolist()) > m:
        with pytest.raises(ValueError, match="sum to at most"):
            torchtpu.gmm(lhs, rhs, sizes)
        return
    torch.testing.assert_close(torchtpu.gmm(lhs, rhs, sizes).double(), reference(lhs.double(), rhs.double(), sizes), atol=1e-4, rtol=2e-5)
