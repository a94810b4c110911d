"""torch.ops.torchtpu.flash_attention against scaled_dot_product_attention (in f64), its
gradient, and the op contracts torch checks (opcheck, gradcheck)."""

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import torchtpu


def randn(gen, *shape, dtype=torch.float32, requires_grad=False):
    return torch.randn(*shape, generator=gen).to(dtype).requires_grad_(requires_grad)


def reference(q, k, v, causal, sm_scale=None, segment_ids=None, kv_segment_ids=None):
    """SDPA in f64 on copies of the inputs: output and (dq, dk, dv) for an upstream gradient."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    sq, sk = q.shape[2], k.shape[2]
    mask = None
    if causal:
        mask = torch.ones(sq, sk, dtype=torch.bool).tril()
    if segment_ids is not None:
        same = segment_ids[:, None, :, None] == kv_segment_ids[:, None, None, :]
        mask = same if mask is None else same & mask
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=sm_scale, enable_gqa=True)
    return out, (q, k, v)


def tolerance(dtype):
    return dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)


CASES = [
    # batch, heads, kv_heads, q_len, kv_len, head_dim, causal
    (1, 2, 2, 128, 128, 64, True),
    (2, 4, 2, 200, 200, 64, True),  # GQA, not a multiple of the block
    (1, 8, 1, 77, 333, 32, False),  # multi-query, unequal ragged lengths
    (3, 2, 2, 1, 50, 128, False),  # one query
    (1, 4, 4, 1024, 1024, 128, True),  # long
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:6])) + ("-causal" if c[6] else ""))
def test_forward_and_gradients_match_sdpa(rng, case, dtype):
    b, h, hk, sq, sk, d, causal = case
    q, k, v = randn(rng, b, h, sq, d, dtype=dtype, requires_grad=True), randn(rng, b, hk, sk, d, dtype=dtype, requires_grad=True), randn(rng, b, hk, sk, d, dtype=dtype, requires_grad=True)
    grad = randn(rng, b, h, sq, d, dtype=dtype)
    out = torch.ops.torchtpu.flash_attention(q, k, v, causal=causal)
    assert out.dtype == dtype and out.shape == q.shape
    want, leaves = reference(q, k, v, causal)
    torch.testing.assert_close(out.double(), want, **tolerance(dtype))
    out.backward(grad)
    want.backward(grad.double())
    for name, got, ref in zip("qkv", (q.grad, k.grad, v.grad), leaves):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), ref.grad, **tolerance(dtype), msg=lambda m: f"d{name}: {m}")


def test_sm_scale_and_segment_ids(rng):
    b, h, s, d = 2, 2, 96, 32
    q, k, v = (randn(rng, b, h, s, d, requires_grad=True) for _ in range(3))
    # Packed sequences: three documents per row, boundaries differing between rows.
    segs = torch.tensor([[0] * 30 + [1] * 40 + [2] * 26, [0] * 10 + [1] * 80 + [2] * 6], dtype=torch.int64)
    out = torchtpu.flash_attention(q, k, v, causal=True, sm_scale=0.3, segment_ids=segs)
    want, leaves = reference(q, k, v, True, 0.3, segs, segs)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=1e-4)
    grad = randn(rng, b, h, s, d)
    out.backward(grad)
    want.backward(grad.double())
    for got, ref in zip((q.grad, k.grad, v.grad), leaves):
        torch.testing.assert_close(got.double(), ref.grad, atol=2e-5, rtol=1e-4)


def test_separate_kv_segment_ids(rng):
    q, k, v = randn(rng, 1, 2, 40, 16), randn(rng, 1, 2, 72, 16), randn(rng, 1, 2, 72, 16)
    qs = torch.tensor([[0] * 25 + [1] * 15], dtype=torch.int32)
    ks = torch.tensor([[0] * 50 + [1] * 22], dtype=torch.int32)
    out = torchtpu.flash_attention(q, k, v, segment_ids=qs, kv_segment_ids=ks)
    want, _ = reference(q, k, v, False, None, qs, ks)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=1e-4)


SAMPLES = [
    ((1, 2, 2, 24, 24, 16), True, None),
    ((2, 4, 2, 19, 33, 8), False, 0.5),
]


def sample_inputs(rng, requires_grad):
    for (b, h, hk, sq, sk, d), causal, scale in SAMPLES:
        q = randn(rng, b, h, sq, d, requires_grad=requires_grad)
        k, v = (randn(rng, b, hk, sk, d, requires_grad=requires_grad) for _ in range(2))
        yield (q, k, v), dict(causal=causal, sm_scale=scale)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(rng, requires_grad):
    for args, kwargs in sample_inputs(rng, requires_grad):
        opcheck(torch.ops.torchtpu.flash_attention.default, args, kwargs)
        scale = kwargs["sm_scale"] or args[0].shape[-1] ** -0.5
        opcheck(torch.ops.torchtpu.flash_attention_forward.default, (*args, kwargs["causal"], scale, None, None))
    q, k, v = (randn(rng, 1, 2, 16, 8) for _ in range(3))
    segs = torch.tensor([[0] * 9 + [1] * 7], dtype=torch.int32)
    opcheck(torch.ops.torchtpu.flash_attention.default, (q, k, v), dict(causal=True, segment_ids=segs))
    out, lse = torch.ops.torchtpu.flash_attention_forward(q, k, v, True, 0.35, None, None)
    opcheck(torch.ops.torchtpu.flash_attention_backward.default, (q, k, v, out, torch.randn_like(out), lse, True, 0.35, None, None))


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck(rng, causal):
    # The kernels compute in f32 (TPUs have no f64): gradcheck differentiates the op on f64
    # leaves through an f32 cast, with a step and tolerances that fit f32 arithmetic.
    q = randn(rng, 1, 4, 12, 8, dtype=torch.float64, requires_grad=True)
    k, v = (randn(rng, 1, 2, 20, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))

    def attention(q, k, v):
        return torchtpu.flash_attention(q.float(), k.float(), v.float(), causal=causal).double()

    assert torch.autograd.gradcheck(attention, (q, k, v), eps=1e-3, atol=2e-3, rtol=1e-2)
