"""``torch.ops.user_ops.swiglu``: this crate's Rust op as a PyTorch op.

The Rust side (``src/lib.rs``) describes the op; :class:`torchtpu.library.RustOp` runs it on
CPU tensors (PJRT), on TorchTPU ``tpu`` tensors (the kernel bridge) and gives its signature for
fake tensors. What stays here is the op's PyTorch face: its schema, and its gradient as the
backward op.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchtpu.library import RustOp, check_tensor, dtype_name, register_ops, same_device

from user_ops import _user_ops

#: Every op of the crate as ``torch.ops.user_ops_raw.<op>(operands, problem)``: a forward-only op
#: needs nothing more. What follows gives SwiGLU a PyTorch face of its own, with autograd.
RAW = register_ops(_user_ops, "user_ops_raw")

_forward = RustOp("swiglu", module=_user_ops)
_backward = RustOp("swiglu_backward", module=_user_ops)


def _problem(gate: Tensor, up: Tensor) -> dict:
    check_tensor("gate", gate)
    check_tensor("up", up)
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.dim() == 0:
        raise ValueError(f"gate and up must be one shape and dtype, at least 1-D; got {gate.dtype} {list(gate.shape)} and {up.dtype} {list(up.shape)}")
    same_device(gate=gate, up=up)
    dim = int(gate.shape[-1])
    return {"rows": math.prod(int(s) for s in gate.shape[:-1]), "dim": dim, "dtype": dtype_name(gate.dtype)}


def _rows(t: Tensor, problem: dict) -> Tensor:
    return t.reshape(problem["rows"], problem["dim"])


@torch.library.custom_op("user_ops::swiglu", mutates_args=())
def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up``, elementwise, computed in f32."""
    problem = _problem(gate, up)
    (out,) = _forward(problem, [_rows(gate, problem), _rows(up, problem)])
    return out.view(gate.shape)


@swiglu.register_fake
def _(gate, up):
    _problem(gate, up)
    return gate.new_empty(gate.shape)


@torch.library.custom_op("user_ops::swiglu_backward", mutates_args=())
def swiglu_backward(gate: Tensor, up: Tensor, grad_out: Tensor) -> tuple[Tensor, Tensor]:
    """The gradients of :func:`swiglu`: for gate and for up."""
    problem = _problem(gate, up)
    d_gate, d_up = _backward(problem, [_rows(gate, problem), _rows(up, problem), _rows(grad_out, problem)])
    return d_gate.view(gate.shape), d_up.view(up.shape)


@swiglu_backward.register_fake
def _(gate, up, grad_out):
    _problem(gate, up)
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _autograd(ctx, grad_out):
    gate, up = ctx.saved_tensors
    return tuple(torch.ops.user_ops.swiglu_backward(gate, up, grad_out.contiguous()))


swiglu.register_autograd(_autograd, setup_context=_setup_context)
