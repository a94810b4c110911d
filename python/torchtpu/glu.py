"""``torchtpu::swiglu`` and ``torchtpu::geglu``: gated linear units, ``F.silu(gate) * up`` and
``F.gelu(gate, approximate=...) * up``, on our kernels (the Rust ops ``glu`` and
``glu_backward``), with their gradients.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from torchtpu.library import RustOp, check_tensor, dtype_name, same_device

_GLU, _GLU_BACKWARD = RustOp("glu"), RustOp("glu_backward")
#: The activations by the name the ops take: ``F.gelu``'s ``approximate`` for GeGLU.
_ACTIVATIONS = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_tanh"}


def _problem(gate: Tensor, up: Tensor, activation: str) -> dict:
    check_tensor("gate", gate)
    check_tensor("up", up)
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.dim() == 0:
        raise ValueError(f"gate and up must be one shape and dtype, at least 1-D; got {gate.dtype} {list(gate.shape)} and {up.dtype} {list(up.shape)}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(_ACTIVATIONS)}; got {activation!r}")
    same_device(gate=gate, up=up)
    return {"rows": math.prod(int(s) for s in gate.shape[:-1]), "dim": int(gate.shape[-1]), "dtype": dtype_name(gate.dtype), "activation": _ACTIVATIONS[activation]}


def _rows(t: Tensor, problem: dict) -> Tensor:
    return t.reshape(problem["rows"], problem["dim"])


def _forward(gate: Tensor, up: Tensor, activation: str) -> Tensor:
    problem = _problem(gate, up, activation)
    (out,) = _GLU(problem, [_rows(gate, problem), _rows(up, problem)])
    return out.view(gate.shape)


def _backward(gate: Tensor, up: Tensor, grad_out: Tensor, activation: str):
    problem = _problem(gate, up, activation)
    d_gate, d_up = _GLU_BACKWARD(problem, [_rows(gate, problem), _rows(up, problem), _rows(grad_out, problem)])
    return d_gate.view(gate.shape), d_up.view(up.shape)


@torch.library.custom_op("torchtpu::glu_forward", mutates_args=(), device_types="cpu")
def glu_forward(gate: Tensor, up: Tensor, activation: str) -> Tensor:
    """``act(gate) * up`` with ``act`` one of ``silu``, ``gelu``, ``gelu_tanh``."""
    return _forward(gate, up, activation)


@glu_forward.register_fake
def _(gate, up, activation):
    _problem(gate, up, activation)
    return gate.new_empty(gate.shape)


@torch.library.custom_op("torchtpu::glu_backward", mutates_args=(), device_types="cpu")
def glu_backward(gate: Tensor, up: Tensor, grad_out: Tensor, activation: str) -> tuple[Tensor, Tensor]:
    """The gradients of :func:`glu_forward` for gate and up."""
    return _backward(gate, up, grad_out, activation)


@glu_backward.register_fake
def _(gate, up, grad_out, activation):
    _problem(gate, up, activation)
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _setup_context(ctx, inputs, output):
    gate, up, activation = inputs
    ctx.save_for_backward(gate, up)
    ctx.activation = activation


def _autograd(ctx, grad_out):
    gate, up = ctx.saved_tensors
    d_gate, d_up = torch.ops.torchtpu.glu_backward(gate, up, grad_out.contiguous(), ctx.activation)
    return d_gate, d_up, None


glu_forward.register_autograd(_autograd, setup_context=_setup_context)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """SwiGLU: ``F.silu(gate) * up``."""
    return torch.ops.torchtpu.glu_forward(gate, up, "silu")


def geglu(gate: Tensor, up: Tensor, approximate: str = "none") -> Tensor:
    """GeGLU: ``F.gelu(gate, approximate=approximate) * up`` (``"none"`` or ``"tanh"``)."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', as F.gelu's; got {approximate!r}")
    return torch.ops.torchtpu.glu_forward(gate, up, "gelu" if approximate == "none" else "gelu_tanh")


_GLU_LINEAR = RustOp("glu_linear")


def _linear_problem(x: Tensor, w_gate: Tensor, w_up: Tensor, activation: str, save: bool) -> dict:
    for name, t in (("x", x), ("w_gate", w_gate), ("w_up", w_up)):
        check_tensor(name, t)
    if x.dim() != 2 or w_gate.dim() != 2 or w_gate.shape != w_up.shape or x.shape[1] != w_gate.shape[1]:
        raise ValueError(f"x must be [rows, k] and w_gate, w_up one shape [n, k] (nn.Linear weights); got {list(x.shape)}, {list(w_gate.shape)}, {list(w_up.shape)}")
    if not x.dtype == w_gate.dtype == w_up.dtype:
        raise TypeError(f"x, w_gate and w_up must have one dtype; got {x.dtype}, {w_gate.dtype}, {w_up.dtype}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(_ACTIVATIONS)}; got {activation!r}")
    same_device(x=x, w_gate=w_gate, w_up=w_up)
    return {"rows": int(x.shape[0]), "n": int(w_gate.shape[0]), "k": int(x.shape[1]), "dtype": dtype_name(x.dtype), "activation": activation, "save": save}


def _glu_linear(x: Tensor, w_gate: Tensor, w_up: Tensor, activation: str) -> Tensor:
    (out,) = _GLU_LINEAR(_linear_problem(x, w_gate, w_up, activation, False), [x, w_gate, w_up])
    return out


def _glu_linear_saving(x: Tensor, w_gate: Tensor, w_up: Tensor, activation: str):
    out, gate, up = _GLU_LINEAR(_linear_problem(x, w_gate, w_up, activation, True), [x, w_gate, w_up])
    return out, gate, up


@torch.library.custom_op("torchtpu::glu_linear", mutates_args=(), device_types="cpu")
def glu_linear_forward(x: Tensor, w_gate: Tensor, w_up: Tensor, activation: str) -> Tensor:
    """``act(x @ w_gate.T) * (x @ w_up.T)`` in one kernel (no gradient: see ``glu_linear_train``)."""
    return _glu_linear(x, w_gate, w_up, activation)


@glu_linear_forward.register_fake
def _(x, w_gate, w_up, activation):
    _linear_problem(x, w_gate, w_up, activation, False)
    return x.new_empty((x.shape[0], w_gate.shape[0]))


@torch.library.custom_op("torchtpu::glu_linear_train", mutates_args=(), device_types="cpu")
def glu_linear_train(x: Tensor, w_gate: Tensor, w_up: Tensor, activation: str) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`glu_linear_forward`, also returning the two projections its gradient needs."""
    return _glu_linear_saving(x, w_gate, w_up, activation)


@glu_linear_train.register_fake
def _(x, w_gate, w_up, activation):
    _linear_problem(x, w_gate, w_up, activation, True)
    shape = (x.shape[0], w_gate.shape[0])
    return x.new_empty(shape), x.new_empty(shape), x.new_empty(shape)


def _linear_setup_context(ctx, inputs, output):
    x, w_gate, w_up, activation = inputs
    _, gate, up = output
    ctx.save_for_backward(x, w_gate, w_up, gate, up)
    ctx.activation = activation


def _linear_autograd(ctx, grad_out, _grad_gate, _grad_up):
    """Through our kernels: the GLU's backward on the saved projections, then four matmuls."""
    x, w_gate, w_up, gate, up = ctx.saved_tensors
    d_gate, d_up = torch.ops.torchtpu.glu_backward(gate, up, grad_out.contiguous(), ctx.activation)
    matmul = torch.ops.torchtpu.matmul
    dx = matmul(d_gate, w_gate) + matmul(d_up, w_up) if ctx.needs_input_grad[0] else None
    d_w_gate = matmul(d_gate.t().contiguous(), x) if ctx.needs_input_grad[1] else None
    d_w_up = matmul(d_up.t().contiguous(), x) if ctx.needs_input_grad[2] else None
    return dx, d_w_gate, d_w_up, None


glu_linear_train.register_autograd(_linear_autograd, setup_context=_linear_setup_context)


def glu_linear(x: Tensor, w_gate: Tensor, w_up: Tensor, activation: str = "silu") -> Tensor:
    """A gated MLP's first half, ``act(F.linear(x, w_gate)) * F.linear(x, w_up)``, with each
    block of x read once for both projections: ``activation`` is ``silu`` (SwiGLU), ``gelu`` or
    ``gelu_tanh`` (GeGLU). x is ``[..., k]``, the weights ``[n, k]``. When a gradient is
    wanted the projections are kept for the backward; otherwise they never reach memory."""
    check_tensor("x", x)
    rows = x.reshape(math.prod(x.shape[:-1]), x.shape[-1]) if x.dim() >= 1 else x  # -1 is ambiguous for 0 elements
    if torch.is_grad_enabled() and (x.requires_grad or w_gate.requires_grad or w_up.requires_grad):
        out = torch.ops.torchtpu.glu_linear_train(rows.contiguous(), w_gate.contiguous(), w_up.contiguous(), activation)[0]
    else:
        out = torch.ops.torchtpu.glu_linear(rows.contiguous(), w_gate.contiguous(), w_up.contiguous(), activation)
    return out.reshape(*x.shape[:-1], w_gate.shape[0]) if x.dim() >= 1 else out
