"""``torchtpu::rms_norm``: ``torch.nn.functional.rms_norm`` on our kernels (the Rust ops
``rms_norm`` and ``rms_norm_backward``), with the same signature and results.

Only the mapping of torch arguments onto the ops' problems and operands lives here: running
them (CPU through PJRT, ``tpu`` tensors through TorchTPU's bridge) and their fake outputs come
from :class:`torchtpu.library.RustOp`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from torchtpu.library import RustOp, check_tensor, dtype_name, same_device

_forward = RustOp("rms_norm")
_backward = RustOp("rms_norm_backward")


def _problem(x: Tensor, weight: Optional[Tensor], eps: float) -> dict:
    dim = int(x.shape[-1])
    return {"rows": math.prod(int(s) for s in x.shape[:-1]), "dim": dim, "dtype": dtype_name(x.dtype), "affine": weight is not None, "eps": float(eps)}


def _check(x: Tensor, weight: Optional[Tensor]) -> None:
    check_tensor("input", x)
    if x.dim() == 0:
        raise ValueError("rms_norm normalizes over trailing dims: the input must have at least one dim")
    if weight is not None:
        check_tensor("weight", weight)
        if tuple(weight.shape) != (x.shape[-1],) or weight.dtype != x.dtype:
            raise ValueError(f"weight must be {x.dtype} [{x.shape[-1]}] like the normalized dims; got {weight.dtype} {list(weight.shape)}")
    same_device(input=x, weight=weight)


def _forward_impl(x: Tensor, weight: Optional[Tensor], eps: float):
    _check(x, weight)
    lead = x.shape[:-1]
    problem = _problem(x, weight, eps)
    rows, dim = problem["rows"], problem["dim"]
    w = weight.reshape(1, dim) if weight is not None else x.new_zeros(1, dim)
    y, rstd = _forward(problem, [x.reshape(rows, dim), w])
    return y.view(x.shape), rstd.view(lead)


def _backward_impl(x: Tensor, weight: Optional[Tensor], grad_out: Tensor, rstd: Tensor):
    _check(x, weight)
    dim = int(x.shape[-1])
    problem = _problem(x, weight, 0.0)
    rows = problem["rows"]
    w = weight.reshape(1, dim) if weight is not None else x.new_zeros(1, dim)
    dx, dw = _backward(problem, [x.reshape(rows, dim), w, grad_out.reshape(rows, dim), rstd.reshape(rows, 1).to(torch.float32)])
    return dx.view(x.shape), dw.view(dim)


@torch.library.custom_op("torchtpu::rms_norm_forward", mutates_args=(), device_types="cpu")
def rms_norm_forward(x: Tensor, weight: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor]:
    """``x`` normalized over its last dim (and scaled by ``weight``), and each row's
    ``1 / sqrt(mean(x²) + eps)`` (f32), which the backward reads."""
    return _forward_impl(x, weight, eps)


@rms_norm_forward.register_fake
def _(x, weight, eps):
    _check(x, weight)
    return x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("torchtpu::rms_norm_backward", mutates_args=(), device_types="cpu")
def rms_norm_backward(x: Tensor, weight: Optional[Tensor], grad_out: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    """The gradients of :func:`rms_norm_forward`: dx (like x) and the weight's (f32 ``[dim]``,
    zeros without a weight)."""
    return _backward_impl(x, weight, grad_out, rstd)


@rms_norm_backward.register_fake
def _(x, weight, grad_out, rstd):
    _check(x, weight)
    return x.new_empty(x.shape), x.new_empty((x.shape[-1],), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, weight, _ = inputs
    _, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(x, weight, rstd)


def _autograd(ctx, grad_out, _grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = torch.ops.torchtpu.rms_norm_backward(x, weight, grad_out.contiguous(), rstd)
    dw = dw.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
    return dx, dw, None


rms_norm_forward.register_autograd(_autograd, setup_context=_setup_context)

torch.library.define(
    "torchtpu::rms_norm",
    "(Tensor input, SymInt[] normalized_shape, Tensor? weight=None, float? eps=None) -> Tensor",
)


@torch.library.impl("torchtpu::rms_norm", "CompositeImplicitAutograd")
def _rms_norm(input, normalized_shape, weight=None, eps=None):
    check_tensor("input", input)
    shape = tuple(normalized_shape)
    n = len(shape)
    if n > input.dim() or tuple(input.shape[input.dim() - n :]) != shape:
        raise ValueError(f"normalized_shape {list(shape)} must be the input's trailing dims; the input is {list(input.shape)}")
    if weight is not None and tuple(weight.shape) != shape:
        raise ValueError(f"weight must have the normalized shape {list(shape)}; got {list(weight.shape)}")
    dim = math.prod(shape)
    x = input.reshape(*input.shape[: input.dim() - n], dim)
    w = weight.reshape(dim) if weight is not None else None
    if eps is None:
        eps = torch.finfo(input.dtype).eps if input.dtype.is_floating_point else 0.0
    y, _ = torch.ops.torchtpu.rms_norm_forward(x, w, eps)
    return y.view(input.shape)


def rms_norm(input: Tensor, normalized_shape, weight: Optional[Tensor] = None, eps: Optional[float] = None) -> Tensor:
    """RMS norm over the trailing ``normalized_shape`` dims, as
    ``torch.nn.functional.rms_norm`` (``eps`` defaults to the dtype's machine epsilon)."""
    return torch.ops.torchtpu.rms_norm(input, list(normalized_shape), weight, eps)
