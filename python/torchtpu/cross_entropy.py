"""``torchtpu.linear_cross_entropy``: ``F.cross_entropy(input @ weight.T, target, ...)`` without
the ``[tokens, vocab]`` logits, on our fused kernels (the Rust ops ``linear_cross_entropy``,
``linear_cross_entropy_dh`` and ``linear_cross_entropy_dw``).

The forward kernel gives three numbers per token — the log-sum-exp of its logits, its target's
logit, the sum of its logits — from which the loss (with ``ignore_index``, ``label_smoothing``
and the reduction) is a few vector ops here. The backward kernels take each token's share of
the loss's gradient (0 for ignored tokens, ``grad / count`` for a mean) and recompute the
logits block by block; memory stays O(tokens × block) beyond the inputs and their gradients.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from torchtpu.library import RustOp, check_tensor, dtype_name, same_device

_FORWARD = RustOp("linear_cross_entropy")
_DH, _DW = RustOp("linear_cross_entropy_dh"), RustOp("linear_cross_entropy_dw")
_REDUCTIONS = ("mean", "sum", "none")


def _problem(h: Tensor, weight: Tensor, target: Tensor, label_smoothing: float, reduction: str) -> dict:
    check_tensor("input", h)
    check_tensor("weight", weight)
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"input must be [tokens, hidden] and weight [vocab, hidden]; got {list(h.shape)} and {list(weight.shape)}")
    if h.dtype != weight.dtype:
        raise TypeError(f"input is {h.dtype} and weight {weight.dtype}: cast them to one dtype")
    if not isinstance(target, Tensor) or target.dtype not in (torch.int64, torch.int32) or target.shape != h.shape[:1]:
        raise ValueError(f"target must be int64 or int32 class indices [tokens] = {list(h.shape[:1])}; got {getattr(target, 'dtype', type(target).__name__)} {list(getattr(target, 'shape', []))}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], as F.cross_entropy's; got {label_smoothing}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(_REDUCTIONS)}; got {reduction!r}")
    same_device(input=h, weight=weight, target=target)
    return {"tokens": int(h.shape[0]), "hidden": int(h.shape[1]), "vocab": int(weight.shape[0]), "dtype": dtype_name(h.dtype), "label_smoothing": float(label_smoothing)}


def _targets(target: Tensor, ignore_index: int, vocab: int) -> tuple[Tensor, Tensor]:
    """Which tokens count, and the targets as the kernels take them (i32 ``[tokens, 1]``, -1
    where ignored). A counted target outside the vocab is F.cross_entropy's IndexError."""
    counted = target != ignore_index
    outside = counted & ((target < 0) | (target >= vocab))
    if bool(outside.any()):
        bad = int(target[outside][0])
        raise IndexError(f"Target {bad} is out of bounds: targets are class indices in [0, {vocab}) or ignore_index ({ignore_index})")
    return counted, torch.where(counted, target, -1).to(torch.int32).unsqueeze(1)


def _forward(h: Tensor, weight: Tensor, target: Tensor, ignore_index: int, label_smoothing: float, reduction: str) -> tuple[Tensor, Tensor]:
    problem = _problem(h, weight, target, label_smoothing, reduction)
    counted, targets = _targets(target, ignore_index, problem["vocab"])
    lse, hit, total = (t.squeeze(1) for t in _FORWARD(problem, [h, weight, targets]))
    eps = label_smoothing
    per_token = (1.0 - eps) * (lse - hit) + eps * (lse - total / problem["vocab"])
    per_token = torch.where(counted, per_token, 0.0)
    if reduction == "none":
        loss = per_token
    elif reduction == "sum":
        loss = per_token.sum()
    else:
        loss = per_token.sum() / counted.sum()
    return loss.to(h.dtype), lse


def _scale(target: Tensor, ignore_index: int, grad: Tensor, reduction: str) -> Tensor:
    """Each token's ``d loss / d loss_i`` (f32 ``[tokens, 1]``)."""
    counted = (target != ignore_index).to(torch.float32)
    grad = grad.to(torch.float32)
    if reduction == "mean":
        return (counted * (grad / counted.sum())).unsqueeze(1)
    return (counted * grad).unsqueeze(1)


def _backward_operands(h, weight, target, lse, grad, ignore_index, label_smoothing, reduction):
    problem = _problem(h, weight, target, label_smoothing, reduction)
    _, targets = _targets(target, ignore_index, problem["vocab"])
    return problem, [h, weight, targets, lse.to(torch.float32).unsqueeze(1), _scale(target, ignore_index, grad, reduction)]


def _backward_h(h, weight, target, lse, grad, ignore_index, label_smoothing, reduction):
    problem, operands = _backward_operands(h, weight, target, lse, grad, ignore_index, label_smoothing, reduction)
    (dh,) = _DH(problem, operands)
    return dh


def _backward_weight(h, weight, target, lse, grad, ignore_index, label_smoothing, reduction):
    problem, operands = _backward_operands(h, weight, target, lse, grad, ignore_index, label_smoothing, reduction)
    (dw,) = _DW(problem, operands)
    return dw


@torch.library.custom_op("torchtpu::linear_cross_entropy", mutates_args=(), device_types="cpu")
def linear_cross_entropy_forward(h: Tensor, weight: Tensor, target: Tensor, ignore_index: int, label_smoothing: float, reduction: str) -> tuple[Tensor, Tensor]:
    """The loss, and each token's log-sum-exp of its logits (f32, for the backward)."""
    return _forward(h, weight, target, ignore_index, label_smoothing, reduction)


@linear_cross_entropy_forward.register_fake
def _(h, weight, target, ignore_index, label_smoothing, reduction):
    _problem(h, weight, target, label_smoothing, reduction)
    loss = h.new_empty(h.shape[:1]) if reduction == "none" else h.new_empty(())
    return loss, h.new_empty(h.shape[:1], dtype=torch.float32)


@torch.library.custom_op("torchtpu::linear_cross_entropy_backward_h", mutates_args=(), device_types="cpu")
def linear_cross_entropy_backward_h(h: Tensor, weight: Tensor, target: Tensor, lse: Tensor, grad: Tensor, ignore_index: int, label_smoothing: float, reduction: str) -> Tensor:
    """The gradient of the input from the loss's gradient ``grad``."""
    return _backward_h(h, weight, target, lse, grad, ignore_index, label_smoothing, reduction)


@linear_cross_entropy_backward_h.register_fake
def _(h, weight, target, lse, grad, ignore_index, label_smoothing, reduction):
    _problem(h, weight, target, label_smoothing, reduction)
    return h.new_empty(h.shape)


@torch.library.custom_op("torchtpu::linear_cross_entropy_backward_weight", mutates_args=(), device_types="cpu")
def linear_cross_entropy_backward_weight(h: Tensor, weight: Tensor, target: Tensor, lse: Tensor, grad: Tensor, ignore_index: int, label_smoothing: float, reduction: str) -> Tensor:
    """The gradient of the weight from the loss's gradient ``grad``."""
    return _backward_weight(h, weight, target, lse, grad, ignore_index, label_smoothing, reduction)


@linear_cross_entropy_backward_weight.register_fake
def _(h, weight, target, lse, grad, ignore_index, label_smoothing, reduction):
    _problem(h, weight, target, label_smoothing, reduction)
    return weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    h, weight, target, ignore_index, label_smoothing, reduction = inputs
    ctx.save_for_backward(h, weight, target, output[1])
    ctx.args = (ignore_index, label_smoothing, reduction)


def _autograd(ctx, grad, _grad_lse):
    h, weight, target, lse = ctx.saved_tensors
    grad = grad.contiguous()
    dh = torch.ops.torchtpu.linear_cross_entropy_backward_h(h, weight, target, lse, grad, *ctx.args) if ctx.needs_input_grad[0] else None
    dw = torch.ops.torchtpu.linear_cross_entropy_backward_weight(h, weight, target, lse, grad, *ctx.args) if ctx.needs_input_grad[1] else None
    return dh, dw, None, None, None, None


linear_cross_entropy_forward.register_autograd(_autograd, setup_context=_setup_context)


def linear_cross_entropy(input: Tensor, weight: Tensor, target: Tensor, *, ignore_index: int = -100, label_smoothing: float = 0.0, reduction: str = "mean") -> Tensor:
    """``F.cross_entropy(input @ weight.T, target, ignore_index=..., label_smoothing=...,
    reduction=...)`` for ``input`` ``[..., hidden]``, ``weight`` ``[vocab, hidden]`` (an LM
    head's) and class indices ``target`` ``[...]``, never materializing the logits."""
    check_tensor("input", input)
    if input.dim() < 1 or not isinstance(target, Tensor) or target.shape != input.shape[:-1]:
        raise ValueError(f"target must have input's shape without its last dim, {list(input.shape[:-1])}; got {list(getattr(target, 'shape', []))}")
    tokens = math.prod(input.shape[:-1])  # explicit: -1 is ambiguous for 0 elements
    loss, _ = torch.ops.torchtpu.linear_cross_entropy(input.reshape(tokens, input.shape[-1]).contiguous(), weight.contiguous(), target.reshape(tokens), ignore_index, float(label_smoothing), reduction)
    return loss.reshape(target.shape) if reduction == "none" else loss
