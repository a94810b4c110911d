"""What flash attention takes beyond q, k, v, against f64 references on fresh random inputs:
SDPA's ``attn_mask`` (boolean and additive, every broadcast, with its gradient), bottom-right
causal alignment (against PyTorch's ``causal_lower_right``), dropout (against an f64
reference that drops what the independently written generator of ``dropout_reference``
says), inputs of different ranks, and the op contracts (opcheck, torch.compile)."""

import pytest
import torch
import torch.nn.functional as F
from dropout_reference import keep_mask, seed_after
from torch.library import opcheck
from torch.nn.attention.bias import causal_lower_right

import torchtpu

TOL = {torch.float32: dict(atol=3e-5, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def randn(gen, *shape, dtype=torch.float32, requires_grad=False):
    return torch.randn(*shape, generator=gen).to(dtype).requires_grad_(requires_grad)


def attention_f64(q, k, v, bias=None, keep=None, rate=0.0, scale=None):
    """Attention written out in f64: softmax of ``q kᵀ · scale + bias`` (a row with every key at
    -inf gives zeros, as SDPA does), weights scaled by ``keep / (1 - rate)``, times v."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if k.shape[-3] != q.shape[-3]:
        k, v = (t.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3) for t in (k, v))
    s = q @ k.transpose(-1, -2) * scale
    if bias is not None:
        s = s + bias
    hidden = torch.isneginf(s).all(-1, keepdim=True)
    w = torch.softmax(torch.where(hidden, torch.zeros_like(s), s), dim=-1)
    w = torch.where(hidden, torch.zeros_like(w), w)
    if keep is not None:
        w = w * keep.to(w.dtype) / (1.0 - rate)
    return w @ v


def gradient_tol(dtype, ref):
    """A bf16 gradient is a sum of terms rounded to bf16 at the scale of its largest ones (the
    softmax gradient subtracts rowsum(dO * O) with O stored in bf16), so its error follows the
    tensor's magnitude, not the element's: up to 4 units in the last place of its largest
    element. PyTorch's own bf16 autograd of the dropout test's attention is off by up to 0.047
    on a bias gradient whose largest element is 6.5 (40 seeds), past a flat 0.03."""
    if dtype != torch.bfloat16:
        return TOL[dtype]
    return dict(rtol=TOL[dtype]["rtol"], atol=max(TOL[dtype]["atol"], 2**-6 * float(ref.abs().amax()) if ref.numel() else 0.0))


def check(ours, want, leaves_ours, leaves_want, grad, dtype, what):
    torch.testing.assert_close(ours.double(), want, **TOL[dtype], msg=lambda m: f"{what} forward: {m}")
    got = torch.autograd.grad(ours, leaves_ours, grad.to(ours.dtype))
    ref = torch.autograd.grad(want, leaves_want, grad.double())
    for n, (g, r) in enumerate(zip(got, ref)):
        torch.testing.assert_close(g.double(), r, **gradient_tol(dtype, r), msg=lambda m: f"{what} gradient {n}: {m}")


MASK_SHAPES = [(13, 40), (2, 1, 13, 40), (1, 4, 13, 40), (2, 4, 13, 40), (2, 1, 1, 40), (4, 13, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", MASK_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_additive_mask_and_its_gradient_match_f64(rng, shape, dtype):
    b, h, hk, sq, sk, d = 2, 4, 2, 13, 40, 16
    q, k, v = randn(rng, b, h, sq, d, dtype=dtype, requires_grad=True), randn(rng, b, hk, sk, d, dtype=dtype, requires_grad=True), randn(rng, b, hk, sk, d, dtype=dtype, requires_grad=True)
    mask = randn(rng, *shape, dtype=dtype)
    mask = mask.masked_fill(torch.rand(shape, generator=rng) < 0.2, float("-inf")).requires_grad_()
    out = torchtpu.flash_attention(q, k, v, attn_mask=mask)
    assert out.dtype == dtype and out.shape == q.shape
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, mask)]
    want = attention_f64(*leaves[:3], bias=leaves[3])
    check(out, want, (q, k, v, mask), leaves, randn(rng, b, h, sq, d), dtype, f"mask {shape}")


def test_boolean_mask_with_hidden_rows_matches_sdpa(rng):
    q, k, v = (randn(rng, 2, 3, n, 8, requires_grad=True) for n in (9, 21, 21))
    mask = torch.rand(2, 1, 9, 21, generator=rng) > 0.4
    mask[0, 0, 3] = False  # a query that sees no key: zeros, as SDPA
    out = torchtpu.flash_attention(q, k, v, attn_mask=mask, causal=False)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = F.scaled_dot_product_attention(*leaves, attn_mask=mask)
    assert torch.equal(out[0, :, 3], torch.zeros_like(out[0, :, 3]))
    check(out, want, (q, k, v), leaves, randn(rng, 2, 3, 9, 8), torch.float32, "boolean mask")


@pytest.mark.parametrize("sq,sk", [(5, 37), (37, 37), (40, 23), (1, 300)])
def test_bottom_right_causal_matches_causal_lower_right(rng, sq, sk):
    q, k, v = randn(rng, 1, 4, sq, 16, requires_grad=True), randn(rng, 1, 2, sk, 16, requires_grad=True), randn(rng, 1, 2, sk, 16, requires_grad=True)
    out = torchtpu.flash_attention(q, k, v, causal="bottom_right")
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    with pytest.warns() if sq > sk else _no_warning():
        bias = causal_lower_right(sq, sk)
    want = F.scaled_dot_product_attention(*leaves, attn_mask=bias, enable_gqa=True)
    # PyTorch leaves the rows that see no key (more queries than keys) as NaN or zeros by
    # backend; ours are zeros, as a boolean mask hiding every key gives.
    want = torch.nan_to_num(want, nan=0.0)
    check(out, want, (q, k, v), leaves, randn(rng, 1, 4, sq, 16), torch.float32, f"bottom-right {sq}x{sk}")


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_dropout_matches_f64_with_the_generators_mask(rng, rate, dtype):
    b, h, hk, sq, sk, d = 2, 4, 2, 33, 70, 16
    q, k, v = randn(rng, b, h, sq, d, dtype=dtype, requires_grad=True), randn(rng, b, hk, sk, d, dtype=dtype, requires_grad=True), randn(rng, b, hk, sk, d, dtype=dtype, requires_grad=True)
    bias = randn(rng, 1, h, sq, sk, dtype=dtype, requires_grad=True)
    seed = seed_after(5)
    torch.manual_seed(5)
    out = torchtpu.flash_attention(q, k, v, attn_mask=bias, causal=True, dropout_p=rate)
    keep = keep_mask(seed, b * h, sq, sk, rate).reshape(b, h, sq, sk)
    assert abs(float(keep.float().mean()) - (1 - rate)) < 0.03
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, bias)]
    causal = torch.ones(sq, sk, dtype=torch.bool).tril()
    want = attention_f64(*leaves[:3], bias=leaves[3].masked_fill(~causal, float("-inf")), keep=keep, rate=rate)
    check(out, want, (q, k, v, bias), leaves, randn(rng, b, h, sq, d), dtype, f"dropout {rate}")


def test_dropout_repeats_per_seed_and_differs_across_seeds(rng):
    q, k, v = (randn(rng, 1, 2, 24, 8) for _ in range(3))
    torch.manual_seed(3)
    a = torchtpu.flash_attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(3)
    b = torchtpu.flash_attention(q, k, v, dropout_p=0.3)
    c = torchtpu.flash_attention(q, k, v, dropout_p=0.3)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torchtpu.flash_attention(q, k, v, dropout_p=1.0), torch.zeros_like(q))


@pytest.mark.parametrize(
    "q_shape,kv_shape",
    [((4, 3, 8), (4, 4, 6, 8)), ((2, 1, 4, 5, 8), (1, 3, 4, 7, 8)), ((1, 5, 8), (3, 1, 6, 8)), ((2, 1, 5, 8), (2, 3, 6, 8))],
    ids=["3d-q-4d-kv", "5d-broadcast", "3d-q-heads-broadcast", "q-heads-broadcast"],
)
def test_inputs_of_different_ranks_broadcast_like_sdpa(rng, q_shape, kv_shape):
    q, k, v = randn(rng, *q_shape, requires_grad=True), randn(rng, *kv_shape, requires_grad=True), randn(rng, *kv_shape, requires_grad=True)
    out = torchtpu.flash_attention(q, k, v, causal=True)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = F.scaled_dot_product_attention(*leaves, is_causal=True)
    assert out.shape == want.shape
    check(out, want, (q, k, v), leaves, torch.randn(want.shape, generator=rng), torch.float32, f"{q_shape} with {kv_shape}")


def test_opcheck_with_mask_bottom_right_and_dropout(rng):
    q, k, v = (randn(rng, 2, 2, n, 8, requires_grad=True) for n in (10, 14, 14))
    mask = randn(rng, 2, 1, 10, 14, requires_grad=True)
    opcheck(torch.ops.torchtpu.flash_attention.default, (q, k, v), dict(attn_mask=mask, causal=True, bottom_right=True))
    bias = mask.detach().expand(2, 1, 10, 14).contiguous().requires_grad_()
    seed = torch.tensor([11])
    opcheck(torch.ops.torchtpu.flash_attention_forward.default, (q, k, v, True, 0.3, None, None, bias, True, 0.25, seed))
    out, lse = torch.ops.torchtpu.flash_attention_forward(q, k, v, True, 0.3, None, None, bias, True, 0.25, seed)
    args = (q.detach(), k.detach(), v.detach(), out.detach(), torch.randn_like(out), lse, True, 0.3, None, None, bias.detach(), True, True, 0.25, seed)
    opcheck(torch.ops.torchtpu.flash_attention_backward.default, args)


def test_compiles_fullgraph_with_mask_and_dropout(rng):
    q, k, v = (randn(rng, 1, 2, n, 8, requires_grad=True) for n in (12, 20, 20))
    mask = torch.rand(12, 20, generator=rng) > 0.3

    def f(q, k, v):
        return torchtpu.flash_attention(q, k, v, attn_mask=mask, dropout_p=0.2, causal="bottom_right")

    torch.manual_seed(0)
    want = f(q, k, v)
    torch.manual_seed(0)
    got = torch.compile(f, fullgraph=True, backend="eager")(q, k, v)
    assert got.shape == want.shape and torch.isfinite(got).all()
    got.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_fused_projections_heads_are_read_in_place(rng, dtype):
    # q, k, v straight from one qkv projection, viewed per head (head_dim 128): no copy.
    from torch.fx.experimental.proxy_tensor import make_fx

    b, s, h, hk, d = 2, 48, 4, 2, 128
    qkv = randn(rng, b, s, (h + 2 * hk) * d, dtype=dtype, requires_grad=True)

    def heads(qkv):
        q, k, v = qkv.split([h * d, hk * d, hk * d], dim=-1)
        return q.view(b, s, h, d).transpose(1, 2), k.view(b, s, hk, d).transpose(1, 2), v.view(b, s, hk, d).transpose(1, 2)

    def attention(qkv):
        return torchtpu.flash_attention(*heads(qkv), causal=True)

    traced = make_fx(attention)(qkv.detach())
    assert "aten.clone.default" not in [str(n.target) for n in traced.graph.nodes if n.op == "call_function"]
    out = attention(qkv)
    leaf = qkv.detach().double().requires_grad_()
    want = F.scaled_dot_product_attention(*heads(leaf), is_causal=True, enable_gqa=True)
    check(out, want, (qkv,), (leaf,), randn(rng, b, h, s, d), dtype, "in place")
    # Zero strides (a broadcast view) are copied, not read in place.
    flat = randn(rng, 32).as_strided((2, 2, 1, 16), (0, 16, 0, 1))
    torch.testing.assert_close(torchtpu.flash_attention(flat, flat, flat), F.scaled_dot_product_attention(flat, flat, flat), atol=1e-5, rtol=1e-4)
    # A head_dim the kernels cannot read in place (64 lanes of wider rows) is copied once.
    narrow = randn(rng, b, s, 3 * 64 * 2).view(b, s, 6, 64).transpose(1, 2)
    traced = make_fx(lambda t: torchtpu.flash_attention(t, t, t))(narrow)
    assert "aten.clone.default" in [str(n.target) for n in traced.graph.nodes if n.op == "call_function"]
    torch.testing.assert_close(torchtpu.flash_attention(narrow, narrow, narrow), F.scaled_dot_product_attention(narrow, narrow, narrow), atol=1e-5, rtol=1e-4)
