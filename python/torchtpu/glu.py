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
