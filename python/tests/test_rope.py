"""Rotary position embedding against HF's definition (``q * cos + rotate_half(q) * sin``) and
the complex-number form of the interleaved layout, in f64: values and gradients (x's, and cos's
and sin's when they are learned), f32 and bf16, ragged and empty shapes, batched and shared
positions; torch's op checks; torch.compile; bad input."""

import pytest
import torch
from torch.library import opcheck

import torchtpu


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _hf(q, cos, sin, unsqueeze_dim=1):
    """transformers' apply_rotary_pos_emb for one tensor, written out."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + _rotate_half(q) * sin


def _tables(rng, b, s, d, dtype):
    angles = torch.rand(b, s, d // 2, generator=rng, dtype=torch.float64) * 50
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=3e-2, rtol=2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 1, 2), (2, 3, 37, 64), (1, 4, 100, 128), (3, 2, 24, 256)], ids=str)
@pytest.mark.parametrize("table_batch", ["batched", "shared"])
def test_matches_hf_in_f64_with_gradients(rng, shape, dtype, table_batch):
    b, h, s, d = shape
    q = torch.randn(*shape, generator=rng).to(dtype).requires_grad_()
    k = torch.randn(b, 1, s, d, generator=rng).to(dtype).requires_grad_()
    cos, sin = _tables(rng, b if table_batch == "batched" else 1, s, d, dtype)
    q_out, k_out = torchtpu.apply_rotary_pos_emb(q, k, cos, sin)
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    want_q, want_k = _hf(q64, cos.double(), sin.double()), _hf(k64, cos.double(), sin.double())
    assert q_out.dtype == dtype and q_out.shape == q.shape and k_out.shape == k.shape
    torch.testing.assert_close(q_out.double(), want_q, **TOL[dtype])
    torch.testing.assert_close(k_out.double(), want_k, **TOL[dtype])
    gq, gk = torch.randn(*shape, generator=rng).to(dtype), torch.randn(b, 1, s, d, generator=rng).to(dtype)
    torch.autograd.backward([q_out, k_out], [gq, gk])
    torch.autograd.backward([want_q, want_k], [gq.double(), gk.double()])
    torch.testing.assert_close(q.grad.double(), q64.grad, **TOL[dtype])
    torch.testing.assert_close(k.grad.double(), k64.grad, **TOL[dtype])


def test_batch_seq_heads_layout_and_2d_tables(rng):
    q = torch.randn(2, 9, 4, 64, generator=rng)  # [batch, seq, heads, dim]: unsqueeze_dim=2
    cos, sin = _tables(rng, 2, 9, 64, torch.float32)
    out, _ = torchtpu.apply_rotary_pos_emb(q, q, cos, sin, unsqueeze_dim=2)
    torch.testing.assert_close(out, _hf(q, cos, sin, unsqueeze_dim=2), **TOL[torch.float32])
    x = torch.randn(3, 2, 9, 64, generator=rng)
    out = torch.ops.torchtpu.rope_forward(x, cos[0], sin[0])
    torch.testing.assert_close(out, x * cos[0] + _rotate_half(x) * sin[0], **TOL[torch.float32])


def test_learned_tables_get_their_gradients(rng):
    x = torch.randn(2, 3, 5, 8, generator=rng, dtype=torch.float64).float()
    for shape in [(5, 8), (1, 5, 8), (2, 5, 8), (2, 1, 5, 8)]:
        cos = torch.randn(*shape, generator=rng).requires_grad_()
        sin = torch.randn(*shape, generator=rng).requires_grad_()
        torch.ops.torchtpu.rope_forward(x, cos, sin).pow(2).sum().backward()
        c64, s64 = cos.detach().double().requires_grad_(), sin.detach().double().requires_grad_()
        squeeze = lambda t: t.squeeze(1) if t.dim() == 4 else t  # noqa: E731
        (x.double() * squeeze(c64).unsqueeze(-3) + _rotate_half(x.double()) * squeeze(s64).unsqueeze(-3)).pow(2).sum().backward()
        torch.testing.assert_close(cos.grad.double(), c64.grad, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(sin.grad.double(), s64.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("interleaved", [False, True])
def test_positions_and_layouts_match_their_definitions(rng, interleaved):
    b, h, s, d, base = 2, 3, 17, 32, 500000.0
    x = torch.randn(b, h, s, d, generator=rng)
    positions = torch.randint(0, 8192, (b, s), generator=rng)
    out = torchtpu.rope(x, positions, base=base, interleaved=interleaved)
    freqs = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = positions.double()[:, None, :, None] * freqs
    if interleaved:  # Meta's Llama: x's pairs as complex numbers times e^{iθ}
        z = torch.view_as_complex(x.double().reshape(b, h, s, d // 2, 2).contiguous())
        want = torch.view_as_real(z * torch.polar(torch.ones_like(angles), angles)).reshape(b, h, s, d)
    else:
        a = torch.cat((angles, angles), dim=-1)
        want = x.double() * a.cos() + _rotate_half(x.double()) * a.sin()
    # The angles are computed in f32, as HF's rotary embedding computes them.
    torch.testing.assert_close(out.double(), want, atol=2e-3, rtol=1e-3)
    implied = torchtpu.rope(x)
    torch.testing.assert_close(implied, torchtpu.rope(x, torch.arange(s)))


def test_empty():
    x = torch.zeros(2, 0, 5, 8, requires_grad=True)
    cos, sin = torch.ones(5, 8), torch.zeros(5, 8)
    out = torch.ops.torchtpu.rope_forward(x, cos, sin)
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(rng, requires_grad):
    x = torch.randn(2, 3, 19, 64, generator=rng, requires_grad=requires_grad)
    cos, sin = _tables(rng, 2, 19, 64, torch.float32)
    opcheck(torch.ops.torchtpu.rope_forward.default, (x, cos, sin))
    opcheck(torch.ops.torchtpu.rope_backward.default, (x.detach(), cos[:1], sin[:1]))


def test_compiles_fullgraph(rng):
    x = torch.randn(1, 2, 16, 64, generator=rng)
    cos, sin = _tables(rng, 1, 16, 64, torch.float32)
    fn = torch.compile(lambda x: torchtpu.apply_rotary_pos_emb(x, x, cos, sin)[0] + 1, fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(x), _hf(x, cos, sin) + 1, **TOL[torch.float32])


def test_bad_input_is_a_clear_error():
    x, t = torch.zeros(1, 2, 4, 8), torch.zeros(4, 8)
    with pytest.raises(ValueError, match="must be even"):
        torch.ops.torchtpu.rope_forward(torch.zeros(1, 2, 4, 7), torch.zeros(4, 7), torch.zeros(4, 7))
    with pytest.raises(ValueError, match=r"\[batch, heads, seq, dim\]"):
        torch.ops.torchtpu.rope_forward(torch.zeros(2, 4, 8), t, t)
    with pytest.raises(ValueError, match="cos must be"):
        torch.ops.torchtpu.rope_forward(x, torch.zeros(5, 8), t)
    with pytest.raises(TypeError, match="cast them to one dtype"):
        torch.ops.torchtpu.rope_forward(x, t.double().float().bfloat16(), t)
    with pytest.raises(ValueError, match="positions must be integers"):
        torchtpu.rope(x, torch.zeros(4))
    with pytest.raises(ValueError, match="unsqueeze_dim"):
        torchtpu.apply_rotary_pos_emb(x, x, t, t, unsqueeze_dim=0)
    # Mixed dtypes promote, as HF's arithmetic does.
    out, _ = torchtpu.apply_rotary_pos_emb(x.bfloat16(), x.bfloat16(), t, t)
    assert out.dtype == torch.float32
