"""Rotary position embedding on our kernels (the Rust ops ``rope`` and ``rope_backward``).

``torchtpu::rope_forward(x, cos, sin)`` computes ``x * cos + rotate_half(x) * sin`` — Llama's
half-split layout — for x ``[batch, heads, seq, dim]`` and cos/sin ``[seq, dim]``, ``[1 or
batch, seq, dim]`` or ``[1 or batch, 1, seq, dim]``. Two entry points build on it:

- :func:`apply_rotary_pos_emb` is HF transformers' function of that name (same arguments, same
  result): a model's call site changes only its import.
- :func:`rope` takes positions (or implies ``0..seq``) and a base, and also does the interleaved
  layout (pairs ``(x[2i], x[2i+1])``, Meta's original Llama and GPT-J).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from torchtpu.library import RustOp, check_tensor, dtype_name, same_device

_ROPE, _ROPE_BACKWARD = RustOp("rope"), RustOp("rope_backward")


def _table(name: str, t: Tensor, x: Tensor) -> Tensor:
    """cos or sin as the kernel takes them: ``[1 or batch, seq, dim]``."""
    check_tensor(name, t)
    b, _, s, d = x.shape
    if t.dim() == 4 and t.shape[1] == 1:
        t = t.squeeze(1)
    if t.dim() == 2:
        t = t.unsqueeze(0)
    if t.dim() != 3 or t.shape[0] not in (1, b) or tuple(t.shape[1:]) != (s, d):
        raise ValueError(f"{name} must be [seq, dim], [1 or batch, seq, dim] or [1 or batch, 1, seq, dim] for x {list(x.shape)}; got {list(t.shape)}")
    if t.dtype != x.dtype:
        raise TypeError(f"{name} is {t.dtype} and x {x.dtype}: cast them to one dtype")
    return t


def _problem(x: Tensor, cos: Tensor, sin: Tensor) -> tuple[dict, Tensor, Tensor]:
    check_tensor("x", x)
    if x.dim() != 4:
        raise ValueError(f"x must be [batch, heads, seq, dim]; got {list(x.shape)}")
    if x.shape[-1] % 2:
        raise ValueError(f"the rotated dim must be even (its two halves rotate together); got {x.shape[-1]}")
    cos, sin = _table("cos", cos, x), _table("sin", sin, x)
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin must have one shape; got {list(cos.shape)} and {list(sin.shape)}")
    same_device(x=x, cos=cos, sin=sin)
    b, h, s, d = (int(n) for n in x.shape)
    problem = {"batch": b, "heads": h, "seq": s, "dim": d, "dtype": dtype_name(x.dtype), "shared_positions": cos.shape[0] == 1 and b != 1}
    return problem, cos, sin


def _forward(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    problem, cos, sin = _problem(x, cos, sin)
    (out,) = _ROPE(problem, [x, cos, sin])
    return out


def _backward(grad: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    problem, cos, sin = _problem(grad, cos, sin)
    (dx,) = _ROPE_BACKWARD(problem, [grad, cos, sin])
    return dx


@torch.library.custom_op("torchtpu::rope_forward", mutates_args=(), device_types="cpu")
def rope_forward(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x * cos + rotate_half(x) * sin`` (half-split layout)."""
    return _forward(x, cos, sin)


@rope_forward.register_fake
def _(x, cos, sin):
    _problem(x, cos, sin)
    return x.new_empty(x.shape)


@torch.library.custom_op("torchtpu::rope_backward", mutates_args=(), device_types="cpu")
def rope_backward(grad: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The gradient of :func:`rope_forward`'s x: the transposed rotation of ``grad``."""
    return _backward(grad, cos, sin)


@rope_backward.register_fake
def _(grad, cos, sin):
    _problem(grad, cos, sin)
    return grad.new_empty(grad.shape)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _table_gradient(g: Tensor, table: Tensor) -> Tensor:
    """``g`` (x-shaped) summed over heads and, where the table is shared, the batch: the
    gradient of a cos or sin of ``table``'s shape."""
    g = g.sum(dim=1)
    if table.dim() == 2 or table.shape[0] == 1:
        g = g.sum(dim=0, keepdim=table.dim() != 2)
    return g.reshape(table.shape)


def _setup_context(ctx, inputs, output):
    x, cos, sin = inputs
    ctx.save_for_backward(x if ctx.needs_input_grad[1] or ctx.needs_input_grad[2] else None, cos, sin)


def _autograd(ctx, grad):
    x, cos, sin = ctx.saved_tensors
    grad = grad.contiguous()
    dx = torch.ops.torchtpu.rope_backward(grad, cos, sin) if ctx.needs_input_grad[0] else None
    # cos and sin are buffers in every model we know, but a learned table gets its true gradient.
    d_cos = _table_gradient(grad * x, cos) if ctx.needs_input_grad[1] else None
    d_sin = _table_gradient(grad * _rotate_half(x), sin) if ctx.needs_input_grad[2] else None
    return dx, d_cos, d_sin


rope_forward.register_autograd(_autograd, setup_context=_setup_context)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The op on x ``[batch, heads, seq, dim]`` in any layout: a non-contiguous x is copied
    once (the kernel reads rows of dim elements)."""
    dtype = torch.promote_types(x.dtype, torch.promote_types(cos.dtype, sin.dtype))
    return torch.ops.torchtpu.rope_forward(x.to(dtype).contiguous(), cos.to(dtype).contiguous(), sin.to(dtype).contiguous())


def apply_rotary_pos_emb(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, position_ids: Optional[Tensor] = None, unsqueeze_dim: int = 1) -> tuple[Tensor, Tensor]:
    """HF transformers' ``apply_rotary_pos_emb``: q and k rotated by cos and sin (``[batch,
    seq, dim]``), which are broadcast over ``unsqueeze_dim`` — 1 for q/k ``[batch, heads, seq,
    dim]``, 2 for ``[batch, seq, heads, dim]``. ``position_ids`` is unused, as in HF."""
    del position_ids
    if unsqueeze_dim not in (1, 2):
        raise ValueError(f"unsqueeze_dim must be 1 (q/k [batch, heads, seq, dim]) or 2 ([batch, seq, heads, dim]); got {unsqueeze_dim}")
    if unsqueeze_dim == 2:
        q_embed, k_embed = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return q_embed.transpose(1, 2), k_embed.transpose(1, 2)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def rope(x: Tensor, positions: Optional[Tensor] = None, *, base: float = 10000.0, interleaved: bool = False) -> Tensor:
    """x ``[batch, heads, seq, dim]`` rotated by the angles ``position * base ** (-2i / dim)``
    (computed in f32). ``positions``: integers ``[seq]`` or ``[batch, seq]``, default ``0..seq``.
    ``interleaved`` rotates pairs ``(x[2i], x[2i+1])`` instead of halves; it costs a gather of x
    and of the output (the kernel rotates halves)."""
    check_tensor("x", x)
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"x must be [batch, heads, seq, dim] with an even dim; got {list(x.shape)}")
    b, _, s, d = x.shape
    if positions is None:
        positions = torch.arange(s, device=x.device)
    if positions.dtype.is_floating_point or positions.dtype.is_complex or positions.dim() not in (1, 2) or positions.shape[-1] != s or (positions.dim() == 2 and positions.shape[0] not in (1, b)):
        raise ValueError(f"positions must be integers [seq] or [batch, seq] for x {list(x.shape)}; got {positions.dtype} {list(positions.shape)}")
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    angles = positions.to(torch.float32)[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    if not interleaved:
        return _rotate(x, cos, sin)
    halves = torch.cat((torch.arange(0, d, 2, device=x.device), torch.arange(1, d, 2, device=x.device)))
    out = _rotate(x[..., halves], cos, sin)
    return out[..., torch.argsort(halves)]
