"""``torchtpu::quantized_linear``: ``F.linear`` with int8 weights (the Rust op
``quantized_matmul``), for serving.

``quantized_linear(x, weight, weight_scale, x_scale=None, block_size=None, out_dtype=None)`` is
``x @ (weight * scale).T`` for ``weight`` int8 ``[n, k]`` (an ``nn.Linear`` weight) and
``weight_scale`` ``[n]`` (per output channel) or ``[n, k / block_size]`` (per block of
``block_size`` inputs, a multiple of 128):

- ``x`` f32 or bf16: weight-only quantization; the result has ``x``'s dtype.
- ``x`` int8 with ``x_scale`` (one per row: ``[...]`` or ``[..., 1]``): w8a8, the products summed
  exactly in int32, then scaled: ``(x * x_scale) @ (weight * scale).T`` in ``out_dtype``
  (default f32).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from torchtpu.library import RustOp, check_tensor, dtype_name, same_device

_QUANTIZED_MATMUL = RustOp("quantized_matmul")
_FLOATS = (torch.float32, torch.bfloat16)


def _problem(x: Tensor, weight: Tensor, weight_scale: Tensor, x_scale: Optional[Tensor], block_size: Optional[int], out_dtype: Optional[torch.dtype]) -> dict:
    w8a8 = isinstance(x, Tensor) and x.dtype == torch.int8
    check_tensor("x", x, (torch.int8,) if w8a8 else _FLOATS)
    check_tensor("weight", weight, (torch.int8,))
    check_tensor("weight_scale", weight_scale, (torch.float32, torch.bfloat16, torch.float16))
    if x.dim() == 0 or weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"quantized_linear takes x [..., k] and an int8 weight [n, k]; got {list(x.shape)} and {list(weight.shape)}")
    n, k = (int(s) for s in weight.shape)
    if weight_scale.dim() == 2 and weight_scale.shape[1] > 1 and block_size is None:
        blocks = int(weight_scale.shape[1])
        if k % blocks != 0:
            raise ValueError(f"weight_scale {list(weight_scale.shape)} has {blocks} blocks that do not divide k = {k}: pass block_size")
        block_size = k // blocks
    if block_size is not None:
        if isinstance(block_size, bool) or not isinstance(block_size, int):
            raise TypeError(f"block_size must be an int or None; got {type(block_size).__name__}")
        want = (n, -(-k // block_size) if block_size > 0 else 0)
    else:
        want = (n,)
    if tuple(weight_scale.shape) != want and not (block_size is None and tuple(weight_scale.shape) == (n, 1)):
        raise ValueError(f"weight_scale must be {list(want)} (a scale per output channel{' and block of ' + str(block_size) + ' inputs' if block_size else ''}); got {list(weight_scale.shape)}")
    if w8a8:
        if x_scale is None:
            raise ValueError("int8 x (w8a8) needs x_scale, one scale per row of x")
        check_tensor("x_scale", x_scale, (torch.float32, torch.bfloat16, torch.float16))
        if x_scale.numel() != math.prod(x.shape[:-1]) or tuple(x_scale.shape) not in (tuple(x.shape[:-1]), tuple(x.shape[:-1]) + (1,)):
            raise ValueError(f"x_scale must hold one scale per row of x: {list(x.shape[:-1])} or {list(x.shape[:-1]) + [1]}; got {list(x_scale.shape)}")
        dtype = torch.float32 if out_dtype is None else out_dtype
        if dtype not in _FLOATS:
            raise TypeError(f"out_dtype must be torch.float32 or torch.bfloat16; got {dtype}")
    else:
        if x_scale is not None:
            raise ValueError("x_scale is for int8 x (w8a8); a float x is not quantized")
        if out_dtype is not None and out_dtype != x.dtype:
            raise TypeError(f"weight-only quantized_linear returns x's dtype ({x.dtype}); got out_dtype {out_dtype}")
        dtype = x.dtype
    same_device(x=x, weight=weight, weight_scale=weight_scale, x_scale=x_scale)
    return {"m": math.prod(int(s) for s in x.shape[:-1]), "k": k, "n": n, "dtype": dtype_name(dtype), "quantization": "w8a8" if w8a8 else "weight_only", "block": block_size}


def _kernel_scales(weight_scale: Tensor, problem: dict) -> Tensor:
    """The scales as the kernel takes them: ``[k blocks, 1, n]`` f32."""
    n = problem["n"]
    return weight_scale.reshape(n, -1).T.reshape(-1, 1, n).to(torch.float32)


def _quantized_linear(x: Tensor, weight: Tensor, weight_scale: Tensor, x_scale: Optional[Tensor], block_size: Optional[int], out_dtype: Optional[torch.dtype]) -> Tensor:
    problem = _problem(x, weight, weight_scale, x_scale, block_size, out_dtype)
    operands = [x.reshape(problem["m"], problem["k"]), weight, _kernel_scales(weight_scale, problem)]
    if x_scale is not None:
        operands.insert(1, x_scale.reshape(problem["m"], 1).to(torch.float32))
    (out,) = _QUANTIZED_MATMUL(problem, operands)
    return out.view(*x.shape[:-1], problem["n"])


@torch.library.custom_op("torchtpu::quantized_linear", mutates_args=(), device_types="cpu")
def quantized_linear_op(x: Tensor, weight: Tensor, weight_scale: Tensor, x_scale: Optional[Tensor], block_size: Optional[int], out_dtype: Optional[torch.dtype]) -> Tensor:
    """``x @ (weight * scale).T`` with int8 ``weight`` (and int8 ``x`` with ``x_scale``: w8a8)."""
    return _quantized_linear(x, weight, weight_scale, x_scale, block_size, out_dtype)


@quantized_linear_op.register_fake
def _(x, weight, weight_scale, x_scale, block_size, out_dtype):
    problem = _problem(x, weight, weight_scale, x_scale, block_size, out_dtype)
    (out,) = _QUANTIZED_MATMUL.fake_outputs(problem, x)
    return out.view(*x.shape[:-1], problem["n"])


def quantized_linear(
    x: Tensor, weight: Tensor, weight_scale: Tensor, x_scale: Optional[Tensor] = None, block_size: Optional[int] = None, out_dtype: Optional[torch.dtype] = None
) -> Tensor:
    """``F.linear(x, weight * scale)`` with int8 ``weight`` ``[n, k]``: weight-only for a float
    ``x``; w8a8 (exact int32 sums) for an int8 ``x`` with its per-row ``x_scale``."""
    return torch.ops.torchtpu.quantized_linear(x, weight, weight_scale, x_scale, block_size, out_dtype)
