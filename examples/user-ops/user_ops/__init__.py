"""``torch.ops.user_ops.softcap``: this crate's Rust op as a PyTorch op.

The Rust side (``src/lib.rs``) describes the op; :class:`torchtpu.library.RustOp` runs it on
CPU tensors (PJRT), on TorchTPU ``tpu`` tensors (the kernel bridge) and gives its signature for
fake tensors. What stays here is the op's PyTorch face: its schema, and its gradient as the
backward op.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchtpu.library import RustOp, check_tensor, dtype_name, register_ops

from user_ops import _user_ops

#: Every op of the crate as ``torch.ops.user_ops_raw.<op>(operands, problem)``: a forward-only op
#: needs nothing more. What follows gives soft-capping a PyTorch face of its own, with autograd.
RAW = register_ops(_user_ops, "user_ops_raw")

_forward = RustOp("softcap", module=_user_ops)
_backward = RustOp("softcap_backward", module=_user_ops)


def _problem(x: Tensor, cap: float) -> dict:
    check_tensor("x", x)
    if x.dim() == 0:
        raise ValueError("softcap takes a tensor of at least one dim")
    return {"rows": math.prod(int(s) for s in x.shape[:-1]), "dim": int(x.shape[-1]), "dtype": dtype_name(x.dtype), "cap": float(cap)}


def _rows(t: Tensor, problem: dict) -> Tensor:
    return t.reshape(problem["rows"], problem["dim"])


@torch.library.custom_op("user_ops::softcap", mutates_args=())
def softcap(x: Tensor, cap: float) -> Tensor:
    """``cap * tanh(x / cap)``, elementwise, computed in f32."""
    problem = _problem(x, cap)
    (y,) = _forward(problem, [_rows(x, problem)])
    return y.view(x.shape)


@softcap.register_fake
def _(x, cap):
    _problem(x, cap)
    return x.new_empty(x.shape)


@torch.library.custom_op("user_ops::softcap_backward", mutates_args=())
def softcap_backward(x: Tensor, grad_out: Tensor, cap: float) -> Tensor:
    """The gradient of :func:`softcap` for x."""
    problem = _problem(x, cap)
    (dx,) = _backward(problem, [_rows(x, problem), _rows(grad_out, problem)])
    return dx.view(x.shape)


@softcap_backward.register_fake
def _(x, grad_out, cap):
    _problem(x, cap)
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    x, cap = inputs
    ctx.save_for_backward(x)
    ctx.cap = cap


def _autograd(ctx, grad_out):
    (x,) = ctx.saved_tensors
    return torch.ops.user_ops.softcap_backward(x, grad_out.contiguous(), ctx.cap), None


softcap.register_autograd(_autograd, setup_context=_setup_context)
