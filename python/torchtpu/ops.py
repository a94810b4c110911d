"""The ops: ``torchtpu::flash_attention`` and ``torchtpu::matmul``.

``flash_attention`` is composite: it calls ``torchtpu::flash_attention_forward`` (output and
log-sum-exp), whose gradient is ``torchtpu::flash_attention_backward`` (our dK/dV and dQ
kernels), the way ``aten::scaled_dot_product_attention`` sits over its flash kernels.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from torchtpu.library import RustOp, check_tensor, dtype_name, same_device

_FORWARD, _DKV, _DQ = RustOp("flash_attention"), RustOp("flash_attention_dkv"), RustOp("flash_attention_dq")
_MATMUL = RustOp("matmul")
_SEGMENT_DTYPES = (torch.int32, torch.int64)


def _check_contiguous(**tensors: Optional[Tensor]) -> None:
    for name, t in tensors.items():
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} is not contiguous (strides {t.stride()}); call .contiguous() first")


def _check_attention(q: Tensor, k: Tensor, v: Tensor, segment_ids: Optional[Tensor], kv_segment_ids: Optional[Tensor]) -> None:
    """Shape, dtype and device checks, shared by the real and the fake implementations."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must be [batch, heads, seq, head_dim] like scaled_dot_product_attention's; got shape {tuple(t.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share a dtype; got {q.dtype}, {k.dtype} and {v.dtype}")
    b, h, sq, d = q.shape
    kb, hk, sk, kd = k.shape
    if kb != b or kd != d or v.shape != k.shape:
        raise ValueError(f"k and v must both be [{b}, kv_heads, kv_seq, {d}] for q {tuple(q.shape)}; got {tuple(k.shape)} and {tuple(v.shape)}")
    if (h % hk != 0) if hk else (h != 0):
        raise ValueError(f"q has {h} heads and k/v {hk}: grouped-query attention needs q's heads to be a multiple of k/v's")
    if (segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("give both segment_ids and kv_segment_ids, or neither")
    if segment_ids is not None:
        for name, t, want in (("segment_ids", segment_ids, (b, sq)), ("kv_segment_ids", kv_segment_ids, (b, sk))):
            if t.dtype not in _SEGMENT_DTYPES:
                raise TypeError(f"{name} must be an integer tensor (int32 or int64); got {t.dtype}")
            if tuple(t.shape) != want:
                raise ValueError(f"{name} must be [batch, seq] = {list(want)}; got {list(t.shape)}")
    same_device(q=q, k=k, v=v, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids)


_I32 = torch.iinfo(torch.int32)


def _segments_i32(segment_ids: Optional[Tensor], kv_segment_ids: Optional[Tensor]):
    """The ids as the kernels take them (int32); ids an int32 cannot hold are refused, never
    wrapped (wrapping would merge segments)."""
    if segment_ids is None:
        return None, None
    for name, t in (("segment_ids", segment_ids), ("kv_segment_ids", kv_segment_ids)):
        if t.dtype != torch.int32 and t.numel() and (int(t.min()) < _I32.min or int(t.max()) > _I32.max):
            raise ValueError(f"{name} holds ids outside the int32 range [{_I32.min}, {_I32.max}] (min {int(t.min())}, max {int(t.max())}); renumber the segments, e.g. with torch.unique(ids, return_inverse=True)")
    return segment_ids.to(torch.int32).contiguous(), kv_segment_ids.to(torch.int32).contiguous()


def _attention_problem(q: Tensor, k: Tensor, causal: bool, sm_scale: float, segment_ids: Optional[Tensor]) -> dict:
    b, h, sq, d = (int(x) for x in q.shape)
    hk, sk = int(k.shape[1]), int(k.shape[2])
    shape = {"batch": b, "heads": h, "kv_heads": hk, "q_len": sq, "kv_len": sk, "head_dim": d}
    return {**shape, "dtype": dtype_name(q.dtype), "causal": bool(causal), "segments": segment_ids is not None, "sm_scale": float(sm_scale)}


def _segment_operands(op: RustOp, problem: dict, like: Tensor, segment_ids: Optional[Tensor], kv_segment_ids: Optional[Tensor]) -> list:
    """The segment-id operands in the layout the op's signature gives (ids broadcast across
    it: ``[b, sq, lanes]`` and ``[b, sublanes, sk]``), or its placeholders without ids."""
    inputs, _ = op.signature(problem)
    (q_shape, _), (kv_shape, _) = inputs[-2], inputs[-1]
    if segment_ids is None:
        return [torch.zeros(q_shape, dtype=torch.int32, device=like.device), torch.zeros(kv_shape, dtype=torch.int32, device=like.device)]
    qs, ks = _segments_i32(segment_ids, kv_segment_ids)
    return [qs[:, :, None].expand(q_shape).contiguous(), ks[:, None, :].expand(kv_shape).contiguous()]


def _flash_forward(q, k, v, causal, sm_scale, segment_ids, kv_segment_ids):
    _check_attention(q, k, v, segment_ids, kv_segment_ids)
    _check_contiguous(q=q, k=k, v=v)
    problem = _attention_problem(q, k, causal, sm_scale, segment_ids)
    out, lse = _FORWARD(problem, [q, k, v, *_segment_operands(_FORWARD, problem, q, segment_ids, kv_segment_ids)])
    return out, lse.view(q.shape[:3])


def _flash_backward(q, k, v, out, grad_out, lse, causal, sm_scale, segment_ids, kv_segment_ids):
    _check_attention(q, k, v, segment_ids, kv_segment_ids)
    _check_contiguous(q=q, k=k, v=v, out=out, grad_out=grad_out, lse=lse)
    problem = _attention_problem(q, k, causal, sm_scale, segment_ids)
    want = tuple(q.shape[:3])
    if lse.dtype != torch.float32 or tuple(lse.shape) not in (want, (*want, 1)):
        raise ValueError(f"lse must be float32 {list(want)}; got {lse.dtype} {list(lse.shape)}")
    operands = [q, k, v, out, grad_out, lse.reshape(*want, 1), *_segment_operands(_DQ, problem, q, segment_ids, kv_segment_ids)]
    dk, dv = _DKV(problem, operands)
    (dq,) = _DQ(problem, operands)
    return dq, dk, dv


@torch.library.custom_op("torchtpu::flash_attention_forward", mutates_args=(), device_types="cpu")
def flash_attention_forward(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, sm_scale: float, segment_ids: Optional[Tensor], kv_segment_ids: Optional[Tensor]
) -> tuple[Tensor, Tensor]:
    """Attention output and its log-sum-exp (f32 ``[batch, heads, q_seq]``)."""
    return _flash_forward(q, k, v, causal, sm_scale, segment_ids, kv_segment_ids)


@flash_attention_forward.register_fake
def _(q, k, v, causal, sm_scale, segment_ids, kv_segment_ids):
    _check_attention(q, k, v, segment_ids, kv_segment_ids)
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("torchtpu::flash_attention_backward", mutates_args=(), device_types="cpu")
def flash_attention_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    grad_out: Tensor,
    lse: Tensor,
    causal: bool,
    sm_scale: float,
    segment_ids: Optional[Tensor],
    kv_segment_ids: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) of attention from its output, log-sum-exp and output gradient."""
    return _flash_backward(q, k, v, out, grad_out, lse, causal, sm_scale, segment_ids, kv_segment_ids)


@flash_attention_backward.register_fake
def _(q, k, v, out, grad_out, lse, causal, sm_scale, segment_ids, kv_segment_ids):
    _check_attention(q, k, v, segment_ids, kv_segment_ids)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _forward_setup_context(ctx, inputs, output):
    q, k, v, causal, sm_scale, segment_ids, kv_segment_ids = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, segment_ids, kv_segment_ids)
    ctx.causal, ctx.sm_scale = causal, sm_scale


def _forward_backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, segment_ids, kv_segment_ids = ctx.saved_tensors
    dq, dk, dv = torch.ops.torchtpu.flash_attention_backward(q, k, v, out, grad_out.contiguous(), lse, ctx.causal, ctx.sm_scale, segment_ids, kv_segment_ids)
    return dq, dk, dv, None, None, None, None


flash_attention_forward.register_autograd(_forward_backward, setup_context=_forward_setup_context)


torch.library.define(
    "torchtpu::flash_attention",
    "(Tensor q, Tensor k, Tensor v, *, bool causal=False, float? sm_scale=None, Tensor? segment_ids=None, Tensor? kv_segment_ids=None) -> Tensor",
)


_KERNEL_DTYPES = (torch.float32, torch.bfloat16)
#: What the public functions take beyond the kernels' dtypes: f16, computed in f32 (as a TPU
#: would in bf16/f32) and returned as f16.
_PUBLIC_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _upcast(t: Tensor) -> Tensor:
    return t.float() if t.dtype == torch.float16 else t


def _attention_layout(q: Tensor, k: Tensor, v: Tensor):
    """q, k, v as the kernels take them — ``[batch, heads, seq, head_dim]``, contiguous, f32 or
    bf16 — and how to give the output back the inputs' form. SDPA's ``[..., L, E]``: 3-D inputs
    are one head; more leading dims fold into the batch. Strided inputs (a projection's output
    viewed per head) are copied once."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, _PUBLIC_DTYPES)
    if not q.dim() == k.dim() == v.dim() or q.dim() < 3:
        raise ValueError(f"q, k and v must be [batch, heads, seq, head_dim] like scaled_dot_product_attention's ([..., seq, head_dim], at least 3-D, one rank); got shapes {tuple(q.shape)}, {tuple(k.shape)} and {tuple(v.shape)}")
    lead = q.shape[:-3]
    dtype = q.dtype

    def kernel_form(t: Tensor) -> Tensor:
        if t.dim() == 3:
            t = t.unsqueeze(1)
        elif t.dim() > 4:
            if t.shape[:-3] != lead:
                raise ValueError(f"q, k and v must share their leading dims {list(lead)}; got {list(t.shape)}")
            t = t.reshape(math.prod(lead), *t.shape[-3:])
        return _upcast(t).contiguous()

    def restore(out: Tensor) -> Tensor:
        out = out.to(dtype)
        if q.dim() == 3:
            return out.squeeze(1)
        return out.reshape(*lead, *out.shape[1:]) if q.dim() > 4 else out

    return kernel_form(q), kernel_form(k), kernel_form(v), restore


@torch.library.impl("torchtpu::flash_attention", "CompositeImplicitAutograd")
def _flash_attention(q, k, v, *, causal=False, sm_scale=None, segment_ids=None, kv_segment_ids=None):
    if segment_ids is not None and kv_segment_ids is None:
        kv_segment_ids = segment_ids
    q, k, v, restore = _attention_layout(q, k, v)
    if sm_scale is None:
        # With head_dim 0 every score is 0 whatever the scale.
        sm_scale = 1.0 / float(q.shape[-1]) ** 0.5 if q.shape[-1] else 1.0
    # The kernels take one head dim. A v head dim other than q/k's (SDPA allows it) is padded
    # with zeros: zero columns of q and k add nothing to the scores, zero columns of v give
    # output columns that are sliced off; gradients flow through the pad and the slice.
    d, dv = q.shape[-1], v.shape[-1]
    if dv > d:
        q, k = (F.pad(t, (0, dv - d)) for t in (q, k))
    elif dv < d:
        v = F.pad(v, (0, d - dv))
    out, _ = torch.ops.torchtpu.flash_attention_forward(q, k, v, causal, sm_scale, segment_ids, kv_segment_ids)
    return restore(out[..., :dv] if out.shape[-1] != dv else out)


def flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    sm_scale: Optional[float] = None,
    segment_ids: Optional[Tensor] = None,
    kv_segment_ids: Optional[Tensor] = None,
) -> Tensor:
    """Flash attention over ``[batch, heads, seq, head_dim]`` tensors (or SDPA's other ranks:
    ``[batch, seq, head_dim]``, or more leading dims), like
    ``torch.nn.functional.scaled_dot_product_attention``: any strides, f32, bf16 or f16 (f16
    computed in f32 and returned as f16), and v's head dim may differ from q's and k's.

    ``causal`` masks keys after each query (top-left aligned, as SDPA's ``is_causal``);
    ``sm_scale`` defaults to ``1/sqrt(head_dim)``; k and v may have fewer heads than q (a
    divisor: grouped-query attention); ``segment_ids`` (``[batch, q_seq]``, with
    ``kv_segment_ids`` ``[batch, kv_seq]`` when the lengths differ) restrict each query to keys
    of its own segment (packed sequences).
    """
    return torch.ops.torchtpu.flash_attention(q, k, v, causal=causal, sm_scale=sm_scale, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids)


def _check_matmul(a: Tensor, b: Tensor) -> None:
    check_tensor("a", a)
    check_tensor("b", b)
    if a.dtype != b.dtype:
        raise TypeError(f"a and b must share a dtype; got {a.dtype} and {b.dtype}")
    if a.dim() not in (2, 3) or b.dim() != a.dim():
        raise ValueError(f"matmul takes [m, k] @ [k, n] or [batch, m, k] @ [batch, k, n]; got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dim() == 3 and a.shape[0] != b.shape[0]:
        raise ValueError(f"a and b must have the same batch; got {a.shape[0]} and {b.shape[0]}")
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(f"a is {tuple(a.shape)} and b {tuple(b.shape)}: a's last dimension must equal b's second-to-last")
    same_device(a=a, b=b)


def _matmul_problem(a: Tensor, b: Tensor) -> dict:
    _check_matmul(a, b)
    batch = int(a.shape[0]) if a.dim() == 3 else None
    return {"batch": batch, "m": int(a.shape[-2]), "n": int(b.shape[-1]), "k": int(a.shape[-1]), "dtype": dtype_name(a.dtype), "transpose_b": False}


def _matmul(a, b):
    problem = _matmul_problem(a, b)
    _check_contiguous(a=a, b=b)
    (out,) = _MATMUL(problem, [a, b])
    return out


@torch.library.custom_op("torchtpu::matmul", mutates_args=(), device_types="cpu")
def matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for ``[m, k] @ [k, n]`` or batched ``[batch, m, k] @ [batch, k, n]``, f32 or
    bf16 (accumulated in f32)."""
    return _matmul(a, b)


@matmul.register_fake
def _(a, b):
    _check_matmul(a, b)
    return a.new_empty((*a.shape[:-1], b.shape[-1]))


def _matmul_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _matmul_backward(ctx, grad):
    a, b = ctx.saved_tensors
    grad = grad.contiguous()
    grad_a = torch.ops.torchtpu.matmul(grad, b.mT.contiguous()) if ctx.needs_input_grad[0] else None
    grad_b = torch.ops.torchtpu.matmul(a.mT.contiguous(), grad) if ctx.needs_input_grad[1] else None
    return grad_a, grad_b


matmul.register_autograd(_matmul_backward, setup_context=_matmul_setup_context)


def matmul_like_torch(a: Tensor, b: Tensor) -> Tensor:
    """``torch.matmul(a, b)`` on our kernel: 1-D operands, ``[..., m, k] @ [k, n]`` folded into
    one ``[(...·m), k] @ [k, n]`` call, batch dims broadcast, any strides (a strided operand is
    copied once), f32, bf16 or f16 (f16 computed in f32 and returned as f16); with gradients."""
    check_tensor("a", a, _PUBLIC_DTYPES)
    check_tensor("b", b, _PUBLIC_DTYPES)
    if a.dim() == 0 or b.dim() == 0:
        raise ValueError(f"both arguments to matmul need at least 1 dimension; got {a.dim()}D and {b.dim()}D")
    if a.dtype != b.dtype:
        raise TypeError(f"a and b must share a dtype; got {a.dtype} and {b.dtype}")
    dtype = a.dtype
    a2 = a.unsqueeze(0) if a.dim() == 1 else a
    b2 = b.unsqueeze(-1) if b.dim() == 1 else b
    if a2.shape[-1] != b2.shape[-2]:
        raise ValueError(f"a is {tuple(a.shape)} and b {tuple(b.shape)}: a's last dimension must equal b's second-to-last")
    a2, b2 = _upcast(a2), _upcast(b2)
    if b2.dim() == 2:
        rows = math.prod(a2.shape[:-1])  # explicit: -1 is ambiguous for 0 elements
        out = torch.ops.torchtpu.matmul(a2.reshape(rows, a2.shape[-1]).contiguous(), b2.contiguous())
        out = out.reshape(*a2.shape[:-1], b2.shape[-1])
    else:
        try:
            batch = torch.broadcast_shapes(a2.shape[:-2], b2.shape[:-2])
        except RuntimeError:
            raise ValueError(f"a is {tuple(a.shape)} and b {tuple(b.shape)}: their batch dims {list(a2.shape[:-2])} and {list(b2.shape[:-2])} do not broadcast") from None
        count = math.prod(batch)
        a3 = a2.expand(*batch, *a2.shape[-2:]).reshape(count, *a2.shape[-2:]).contiguous()
        b3 = b2.expand(*batch, *b2.shape[-2:]).reshape(count, *b2.shape[-2:]).contiguous()
        out = torch.ops.torchtpu.matmul(a3, b3).reshape(*batch, a2.shape[-2], b2.shape[-1])
    if a.dim() == 1:
        out = out.squeeze(-2)
    if b.dim() == 1:
        out = out.squeeze(-1)
    return out.to(dtype)
