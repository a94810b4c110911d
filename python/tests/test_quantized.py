"""torchtpu.quantized_linear against dequantize-then-matmul in f64: weight-only (f32, bf16)
and w8a8 (exact int32 sums), scales per channel and per block, ragged and batched shapes;
torch's op checks; torch.compile; bad scales and dtypes."""

import pytest
import torch
from torch.library import opcheck

import torchtpu


def int8(rng, *shape):
    return torch.randint(-128, 128, shape, generator=rng, dtype=torch.int8)


def scales(rng, *shape):
    return (torch.rand(*shape, generator=rng) + 0.5) / 127


def dequantized(weight, weight_scale, block_size):
    w = weight.double()
    if block_size is None:
        return w * weight_scale.double().reshape(-1, 1)
    return w * weight_scale.double().repeat_interleave(block_size, dim=1)[:, : w.shape[1]]


@pytest.mark.parametrize("block_size", [None, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,n", [((1, 128), 128), ((37, 300), 200), ((2, 5, 640), 256)], ids=str)
def test_weight_only_matches_dequantize_then_matmul(rng, shape, n, dtype, block_size):
    k = shape[-1]
    x = torch.randn(*shape, generator=rng).to(dtype)
    weight = int8(rng, n, k)
    weight_scale = scales(rng, n) if block_size is None else scales(rng, n, -(-k // block_size))
    out = torchtpu.quantized_linear(x, weight, weight_scale, block_size=block_size)
    want = x.double() @ dequantized(weight, weight_scale, block_size).T
    assert out.dtype == dtype and out.shape == (*shape[:-1], n)
    tol = dict(atol=1e-4, rtol=2e-5) if dtype == torch.float32 else dict(atol=0.05, rtol=2e-2)
    torch.testing.assert_close(out.double(), want, **tol)


@pytest.mark.parametrize("block_size", [None, 128])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_w8a8_matches_and_sums_exactly(rng, out_dtype, block_size):
    m, k, n = 45, 384, 136
    x, weight = int8(rng, m, k), int8(rng, n, k)
    x_scale = scales(rng, m)
    weight_scale = scales(rng, n) if block_size is None else scales(rng, n, k // block_size)
    out = torchtpu.quantized_linear(x, weight, weight_scale, x_scale=x_scale, block_size=block_size, out_dtype=out_dtype)
    want = (x.double() * x_scale.double()[:, None]) @ dequantized(weight, weight_scale, block_size).T
    tol = dict(atol=1e-5, rtol=2e-5) if out_dtype == torch.float32 else dict(atol=0.02, rtol=2e-2)
    torch.testing.assert_close(out.double(), want, **tol)
    # Unit scales: the int32 sums themselves, bit for bit.
    exact = torchtpu.quantized_linear(x, weight, torch.ones(n), x_scale=torch.ones(m, 1))
    assert torch.equal(exact.long(), x.long() @ weight.long().T)


def test_block_size_is_inferred_from_a_dividing_scale(rng):
    x, weight = torch.randn(8, 512, generator=rng), int8(rng, 128, 512)
    weight_scale = scales(rng, 128, 4)
    torch.testing.assert_close(torchtpu.quantized_linear(x, weight, weight_scale), torchtpu.quantized_linear(x, weight, weight_scale, block_size=128))


def test_empty(rng):
    out = torchtpu.quantized_linear(torch.zeros(0, 128), int8(rng, 64, 128), scales(rng, 64))
    assert out.shape == (0, 64)
    assert torch.equal(torchtpu.quantized_linear(torch.zeros(3, 0), torch.zeros(64, 0, dtype=torch.int8), scales(rng, 64)), torch.zeros(3, 64))


def test_opcheck(rng):
    x, weight = torch.randn(7, 256, generator=rng), int8(rng, 130, 256)
    opcheck(torch.ops.torchtpu.quantized_linear.default, (x, weight, scales(rng, 130), None, None, None))
    opcheck(torch.ops.torchtpu.quantized_linear.default, (x.bfloat16(), weight, scales(rng, 130, 2), None, 128, None))
    opcheck(torch.ops.torchtpu.quantized_linear.default, (int8(rng, 7, 256), weight, scales(rng, 130), scales(rng, 7), None, torch.bfloat16))


def test_compiles_fullgraph(rng):
    x, weight, weight_scale = torch.randn(16, 256, generator=rng), int8(rng, 128, 256), scales(rng, 128)
    fn = torch.compile(lambda x: torchtpu.quantized_linear(x, weight, weight_scale).relu(), fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(x).double(), (x.double() @ dequantized(weight, weight_scale, None).T).relu(), atol=1e-4, rtol=2e-5)


def test_bad_input_is_a_clear_error(rng):
    x, weight = torch.randn(4, 256, generator=rng), int8(rng, 128, 256)
    with pytest.raises(ValueError, match="weight_scale must be \\[128\\]"):
        torchtpu.quantized_linear(x, weight, scales(rng, 64))
    with pytest.raises(ValueError, match="weight_scale must be \\[128, 2\\]"):
        torchtpu.quantized_linear(x, weight, scales(rng, 128, 3), block_size=128)
    with pytest.raises(ValueError, match="positive multiple of 128"):
        torchtpu.quantized_linear(x, weight, scales(rng, 128, 4), block_size=64)
    with pytest.raises(ValueError, match="do not divide k"):
        torchtpu.quantized_linear(x, weight, scales(rng, 128, 3))
    with pytest.raises(TypeError, match="torch.int8"):
        torchtpu.quantized_linear(x, weight.float(), scales(rng, 128))
    with pytest.raises(ValueError, match="needs x_scale"):
        torchtpu.quantized_linear(int8(rng, 4, 256), weight, scales(rng, 128))
    with pytest.raises(ValueError, match="one scale per row"):
        torchtpu.quantized_linear(int8(rng, 4, 256), weight, scales(rng, 128), x_scale=scales(rng, 5))
    with pytest.raises(ValueError, match="x_scale is for int8 x"):
        torchtpu.quantized_linear(x, weight, scales(rng, 128), x_scale=scales(rng, 4))
    with pytest.raises(TypeError, match="returns x's dtype"):
        torchtpu.quantized_linear(x, weight, scales(rng, 128), out_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="int8 weight \\[n, k\\]"):
        torchtpu.quantized_linear(torch.randn(4, 100), weight, scales(rng, 128))
