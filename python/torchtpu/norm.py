"""``torchtpu::rms_norm`` and ``torchtpu::layer_norm``: ``torch.nn.functional.rms_norm`` and
``layer_norm`` on our kernels (the Rust ops ``rms_norm``, ``layer_norm`` and their backward
ops), with the same signatures and results.

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

_RMS, _RMS_BACKWARD = RustOp("rms_norm"), RustOp("rms_norm_backward")
_LAYER, _LAYER_BACKWARD = RustOp("layer_norm"), RustOp("layer_norm_backward")


def _rows(x: Tensor) -> tuple[int, int]:
    """x's rows (its leading dims multiplied) and dim (its last)."""
    return math.prod(int(s) for s in x.shape[:-1]), int(x.shape[-1])


def _check(x: Tensor, **vectors: Optional[Tensor]) -> None:
    """x is a float tensor of at least one dim; each vector given is x's dtype and ``[dim]``."""
    check_tensor("input", x)
    if x.dim() == 0:
        raise ValueError("the norms normalize over trailing dims: the input must have at least one dim")
    for name, v in vectors.items():
        if v is not None:
            check_tensor(name, v)
            if tuple(v.shape) != (x.shape[-1],) or v.dtype != x.dtype:
                raise ValueError(f"{name} must be {x.dtype} [{x.shape[-1]}] like the normalized dims; got {v.dtype} {list(v.shape)}")
    same_device(input=x, **vectors)


def _vector(v: Optional[Tensor], x: Tensor) -> Tensor:
    """A weight or bias as the kernels take it: ``[1, dim]``; zeros (never read) when absent."""
    dim = int(x.shape[-1])
    return v.reshape(1, dim) if v is not None else x.new_zeros(1, dim)


def _flatten(input: Tensor, normalized_shape, **vectors: Optional[Tensor]):
    """``input`` as ``[.., dim]`` over its trailing ``normalized_shape`` dims, and each vector
    as ``[dim]``, checked as ``torch.nn.functional``'s norms check them."""
    check_tensor("input", input)
    shape = tuple(normalized_shape)
    n = len(shape)
    if n > input.dim() or tuple(input.shape[input.dim() - n :]) != shape:
        raise ValueError(f"normalized_shape {list(shape)} must be the input's trailing dims; the input is {list(input.shape)}")
    for name, v in vectors.items():
        if v is not None and tuple(v.shape) != shape:
            raise ValueError(f"{name} must have the normalized shape {list(shape)}; got {list(v.shape)}")
    dim = math.prod(shape)
    flat = {name: v.reshape(dim) if v is not None else None for name, v in vectors.items()}
    return input.reshape(*input.shape[: input.dim() - n], dim), flat


def _rms_problem(x: Tensor, weight: Optional[Tensor], eps: float) -> dict:
    rows, dim = _rows(x)
    return {"rows": rows, "dim": dim, "dtype": dtype_name(x.dtype), "affine": weight is not None, "eps": float(eps)}


def _rms_forward(x: Tensor, weight: Optional[Tensor], eps: float):
    _check(x, weight=weight)
    rows, dim = _rows(x)
    y, rstd = _RMS(_rms_problem(x, weight, eps), [x.reshape(rows, dim), _vector(weight, x)])
    return y.view(x.shape), rstd.view(x.shape[:-1])


def _rms_backward(x: Tensor, weight: Optional[Tensor], grad_out: Tensor, rstd: Tensor):
    _check(x, weight=weight)
    rows, dim = _rows(x)
    operands = [x.reshape(rows, dim), _vector(weight, x), grad_out.reshape(rows, dim), rstd.reshape(rows, 1).to(torch.float32)]
    dx, dw = _RMS_BACKWARD(_rms_problem(x, weight, 0.0), operands)
    return dx.view(x.shape), dw.view(dim)


@torch.library.custom_op("torchtpu::rms_norm_forward", mutates_args=(), device_types="cpu")
def rms_norm_forward(x: Tensor, weight: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor]:
    """``x`` normalized over its last dim (and scaled by ``weight``), and each row's
    ``1 / sqrt(mean(x²) + eps)`` (f32), which the backward reads."""
    return _rms_forward(x, weight, eps)


@rms_norm_forward.register_fake
def _(x, weight, eps):
    _check(x, weight=weight)
    return x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("torchtpu::rms_norm_backward", mutates_args=(), device_types="cpu")
def rms_norm_backward(x: Tensor, weight: Optional[Tensor], grad_out: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    """The gradients of :func:`rms_norm_forward`: dx (like x) and the weight's (f32 ``[dim]``,
    zeros without a weight)."""
    return _rms_backward(x, weight, grad_out, rstd)


@rms_norm_backward.register_fake
def _(x, weight, grad_out, rstd):
    _check(x, weight=weight)
    return x.new_empty(x.shape), x.new_empty((x.shape[-1],), dtype=torch.float32)


def _rms_setup_context(ctx, inputs, output):
    x, weight, _ = inputs
    _, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(x, weight, rstd)


def _rms_autograd(ctx, grad_out, _grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = torch.ops.torchtpu.rms_norm_backward(x, weight, grad_out.contiguous(), rstd)
    dw = dw.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
    return dx, dw, None


rms_norm_forward.register_autograd(_rms_autograd, setup_context=_rms_setup_context)

torch.library.define(
    "torchtpu::rms_norm",
    "(Tensor input, SymInt[] normalized_shape, Tensor? weight=None, float? eps=None) -> Tensor",
)


@torch.library.impl("torchtpu::rms_norm", "CompositeImplicitAutograd")
def _rms_norm(input, normalized_shape, weight=None, eps=None):
    x, flat = _flatten(input, normalized_shape, weight=weight)
    if eps is None:
        eps = torch.finfo(input.dtype).eps if input.dtype.is_floating_point else 0.0
    y, _ = torch.ops.torchtpu.rms_norm_forward(x, flat["weight"], eps)
    return y.view(input.shape)


def rms_norm(input: Tensor, normalized_shape, weight: Optional[Tensor] = None, eps: Optional[float] = None) -> Tensor:
    """RMS norm over the trailing ``normalized_shape`` dims, as
    ``torch.nn.functional.rms_norm`` (``eps`` defaults to the dtype's machine epsilon)."""
    return torch.ops.torchtpu.rms_norm(input, list(normalized_shape), weight, eps)


def _layer_problem(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> dict:
    rows, dim = _rows(x)
    return {"rows": rows, "dim": dim, "dtype": dtype_name(x.dtype), "weight": weight is not None, "bias": bias is not None, "eps": float(eps)}


def _layer_forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float):
    _check(x, weight=weight, bias=bias)
    rows, dim = _rows(x)
    y, mean, rstd = _LAYER(_layer_problem(x, weight, bias, eps), [x.reshape(rows, dim), _vector(weight, x), _vector(bias, x)])
    return y.view(x.shape), mean.view(x.shape[:-1]), rstd.view(x.shape[:-1])


def _layer_backward(x: Tensor, weight: Optional[Tensor], grad_out: Tensor, mean: Tensor, rstd: Tensor):
    _check(x, weight=weight)
    rows, dim = _rows(x)
    stat = lambda s: s.reshape(rows, 1).to(torch.float32)  # noqa: E731
    operands = [x.reshape(rows, dim), _vector(weight, x), grad_out.reshape(rows, dim), stat(mean), stat(rstd)]
    dx, dw, db = _LAYER_BACKWARD(_layer_problem(x, weight, None, 0.0), operands)
    return dx.view(x.shape), dw.view(dim), db.view(dim)


@torch.library.custom_op("torchtpu::layer_norm_forward", mutates_args=(), device_types="cpu")
def layer_norm_forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``x`` normalized over its last dim (scaled by ``weight``, shifted by ``bias``), and each
    row's mean and ``1 / sqrt(var + eps)`` (f32), which the backward reads."""
    return _layer_forward(x, weight, bias, eps)


@layer_norm_forward.register_fake
def _(x, weight, bias, eps):
    _check(x, weight=weight, bias=bias)
    return x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=torch.float32), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("torchtpu::layer_norm_backward", mutates_args=(), device_types="cpu")
def layer_norm_backward(x: Tensor, weight: Optional[Tensor], grad_out: Tensor, mean: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of :func:`layer_norm_forward`: dx (like x), the weight's and the bias'
    (f32 ``[dim]``)."""
    return _layer_backward(x, weight, grad_out, mean, rstd)


@layer_norm_backward.register_fake
def _(x, weight, grad_out, mean, rstd):
    _check(x, weight=weight)
    return x.new_empty(x.shape), x.new_empty((x.shape[-1],), dtype=torch.float32), x.new_empty((x.shape[-1],), dtype=torch.float32)


def _layer_setup_context(ctx, inputs, output):
    x, weight, bias, _ = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _layer_autograd(ctx, grad_out, _grad_mean, _grad_rstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = torch.ops.torchtpu.layer_norm_backward(x, weight, grad_out.contiguous(), mean, rstd)
    dw = dw.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
    db = db.to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[2] else None
    return dx, dw, db, None


layer_norm_forward.register_autograd(_layer_autograd, setup_context=_layer_setup_context)

torch.library.define(
    "torchtpu::layer_norm",
    "(Tensor input, SymInt[] normalized_shape, Tensor? weight=None, Tensor? bias=None, float eps=1e-05) -> Tensor",
)


@torch.library.impl("torchtpu::layer_norm", "CompositeImplicitAutograd")
def _layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    x, flat = _flatten(input, normalized_shape, weight=weight, bias=bias)
    y, _, _ = torch.ops.torchtpu.layer_norm_forward(x, flat["weight"], flat["bias"], eps)
    return y.view(input.shape)


def layer_norm(input: Tensor, normalized_shape, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    """Layer norm over the trailing ``normalized_shape`` dims, as
    ``torch.nn.functional.layer_norm``."""
    return torch.ops.torchtpu.layer_norm(input, list(normalized_shape), weight, bias, eps)
