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


def _check_attention(q: Tensor, k: Tensor, v: Tensor, segment_ids: Optional[Tensor], kv_segment_ids: Optional[Tensor], bias: Optional[Tensor] = None, dropout_p: float = 0.0) -> None:
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
    if bias is not None:
        if bias.dtype != torch.float32:
            raise TypeError(f"bias must be float32 (an additive mask; -inf hides a key); got {bias.dtype}")
        if bias.dim() != 4 or bias.shape[0] not in (1, b) or bias.shape[1] not in (1, h) or tuple(bias.shape[2:]) != (sq, sk):
            raise ValueError(f"bias must be [1 or {b}, 1 or {h}, {sq}, {sk}] for q {tuple(q.shape)} and k {tuple(k.shape)}; got {list(bias.shape)}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be a probability in [0, 1]; got {dropout_p}")
    same_device(q=q, k=k, v=v, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, bias=bias)


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


_LANES = 128


def _head_layout(t: Tensor):
    """``(rows, layout)`` when ``t`` (``[b, h, s, d]``) is heads lying side by side in rows
    ``[b, s, width · d]`` — a projection's output viewed per head, ``x.view(b, s, h,
    d).transpose(1, 2)``, or q, k or v of a fused qkv projection — that the kernels read in
    place: ``rows`` a view of that memory, ``layout`` the problem's ``HeadLayout``. None
    otherwise (then the kernels take ``t`` contiguous)."""
    if t.dim() != 4 or t.numel() == 0 or t.is_contiguous() or t.dtype not in _KERNEL_DTYPES:
        return None
    b, h, s, d = t.shape
    sb, sh, ss, sd = t.stride()
    if sd != 1 or sh != d or ss < h * d or ss % d or (b > 1 and sb != s * ss):
        return None
    width = ss // d
    start = t.storage_offset()
    offset, within = divmod(start % ss, d)
    # A TPU reads a head's d lanes of a row as one block: d a multiple of 128, or one head a row.
    if within or offset + h > width or (d % _LANES and width != 1):
        return None
    base = start - offset * d
    if base + b * s * ss > t.untyped_storage().nbytes() // t.element_size():
        return None
    return t.as_strided((b, s, ss), (s * ss, ss, 1), base), {"bshd": {"width": width, "offset": offset}}


def _operand(name: str, t: Tensor):
    """``t`` as the kernels read it: in place (see :func:`_head_layout`) or contiguous, with
    its layout; else the error a user of the raw op sees."""
    in_place = _head_layout(t)
    if in_place is not None:
        return in_place
    _check_contiguous(**{name: t})
    return t, "bhsd"


def _attention_problem(
    q: Tensor,
    k: Tensor,
    causal: bool,
    sm_scale: float,
    segment_ids: Optional[Tensor],
    bias: Optional[Tensor] = None,
    bias_grad: bool = False,
    bottom_right: bool = False,
    dropout_p: float = 0.0,
    layouts=("bhsd", "bhsd", "bhsd"),
) -> dict:
    b, h, sq, d = (int(x) for x in q.shape)
    hk, sk = int(k.shape[1]), int(k.shape[2])
    shape = {"batch": b, "heads": h, "kv_heads": hk, "q_len": sq, "kv_len": sk, "head_dim": d}
    return {
        **shape,
        "q_layout": layouts[0],
        "k_layout": layouts[1],
        "v_layout": layouts[2],
        "dtype": dtype_name(q.dtype),
        "causal": bool(causal),
        "bottom_right": bool(bottom_right),
        "segments": segment_ids is not None,
        "bias": None if bias is None else {"batch": int(bias.shape[0]), "heads": int(bias.shape[1])},
        "bias_grad": bool(bias_grad),
        "dropout_p": float(dropout_p),
        "sm_scale": float(sm_scale),
    }


def _mask_operands(op: RustOp, problem: dict, like: Tensor, segment_ids: Optional[Tensor], kv_segment_ids: Optional[Tensor], bias: Optional[Tensor], seed: Optional[Tensor]) -> list:
    """The segment-id, bias and seed operands in the layout the op's signature gives (ids
    broadcast across ``[b, sq, lanes]`` and ``[b, sublanes, sk]``, the seed in a tile's first
    element), or its placeholders for what is not given."""
    inputs, _ = op.signature(problem)
    (q_shape, _), (kv_shape, _), (bias_shape, _), (seed_shape, _) = inputs[-4:]
    zeros = lambda shape, dtype: torch.zeros(shape, dtype=dtype, device=like.device)  # noqa: E731
    if segment_ids is None:
        segments = [zeros(q_shape, torch.int32), zeros(kv_shape, torch.int32)]
    else:
        qs, ks = _segments_i32(segment_ids, kv_segment_ids)
        segments = [qs[:, :, None].expand(q_shape).contiguous(), ks[:, None, :].expand(kv_shape).contiguous()]
    bias = zeros(bias_shape, torch.float32) if bias is None else bias.contiguous()
    seed = zeros(seed_shape, torch.int32) if seed is None else seed.to(torch.int32).reshape(-1)[:1].expand(seed_shape).contiguous()
    return [*segments, bias, seed]


def _flash_forward(q, k, v, causal, sm_scale, segment_ids, kv_segment_ids, bias=None, bottom_right=False, dropout_p=0.0, seed=None):
    _check_attention(q, k, v, segment_ids, kv_segment_ids, bias, dropout_p)
    (qr, ql), (kr, kl), (vr, vl) = _operand("q", q), _operand("k", k), _operand("v", v)
    problem = _attention_problem(q, k, causal, sm_scale, segment_ids, bias, False, bottom_right, dropout_p, (ql, kl, vl))
    out, lse = _FORWARD(problem, [qr, kr, vr, *_mask_operands(_FORWARD, problem, q, segment_ids, kv_segment_ids, bias, seed)])
    return out, lse.view(q.shape[:3])


def _flash_backward(q, k, v, out, grad_out, lse, causal, sm_scale, segment_ids, kv_segment_ids, bias=None, bias_grad=False, bottom_right=False, dropout_p=0.0, seed=None):
    _check_attention(q, k, v, segment_ids, kv_segment_ids, bias, dropout_p)
    (qr, ql), (kr, kl), (vr, vl) = _operand("q", q), _operand("k", k), _operand("v", v)
    _check_contiguous(out=out, grad_out=grad_out, lse=lse)
    bias_grad = bool(bias_grad) and bias is not None
    problem = _attention_problem(q, k, causal, sm_scale, segment_ids, bias, bias_grad, bottom_right, dropout_p, (ql, kl, vl))
    want = tuple(q.shape[:3])
    if lse.dtype != torch.float32 or tuple(lse.shape) not in (want, (*want, 1)):
        raise ValueError(f"lse must be float32 {list(want)}; got {lse.dtype} {list(lse.shape)}")
    operands = [qr, kr, vr, out, grad_out, lse.reshape(*want, 1), *_mask_operands(_DQ, problem, q, segment_ids, kv_segment_ids, bias, seed)]
    dk, dv = _DKV(problem, operands)
    dq, *d_bias = _DQ(problem, operands)
    return dq, dk, dv, (d_bias[0] if d_bias else q.new_empty(0, dtype=torch.float32))


@torch.library.custom_op("torchtpu::flash_attention_forward", mutates_args=(), device_types="cpu")
def flash_attention_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool,
    sm_scale: float,
    segment_ids: Optional[Tensor],
    kv_segment_ids: Optional[Tensor],
    bias: Optional[Tensor] = None,
    bottom_right: bool = False,
    dropout_p: float = 0.0,
    seed: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Attention output and its log-sum-exp (f32 ``[batch, heads, q_seq]``). ``bias`` is an
    additive f32 mask ``[1 or batch, 1 or heads, q_seq, kv_seq]`` (-inf hides a key; a row
    with every key hidden gives zeros); ``bottom_right`` aligns the causal diagonal to the last
    key; dropout drops each weight with probability ``dropout_p``, as a function of ``seed``
    (an int tensor, its first element read) and the weight's position."""
    return _flash_forward(q, k, v, causal, sm_scale, segment_ids, kv_segment_ids, bias, bottom_right, dropout_p, seed)


@flash_attention_forward.register_fake
def _(q, k, v, causal, sm_scale, segment_ids, kv_segment_ids, bias=None, bottom_right=False, dropout_p=0.0, seed=None):
    _check_attention(q, k, v, segment_ids, kv_segment_ids, bias, dropout_p)
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
    bias: Optional[Tensor] = None,
    bias_grad: bool = False,
    bottom_right: bool = False,
    dropout_p: float = 0.0,
    seed: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv, dbias) of attention from its output, log-sum-exp and output
    gradient. dbias is ``[batch, heads, q_seq, kv_seq]`` (f32, before any broadcast of the bias
    is summed) with ``bias_grad``, else empty."""
    return _flash_backward(q, k, v, out, grad_out, lse, causal, sm_scale, segment_ids, kv_segment_ids, bias, bias_grad, bottom_right, dropout_p, seed)


@flash_attention_backward.register_fake
def _(q, k, v, out, grad_out, lse, causal, sm_scale, segment_ids, kv_segment_ids, bias=None, bias_grad=False, bottom_right=False, dropout_p=0.0, seed=None):
    _check_attention(q, k, v, segment_ids, kv_segment_ids, bias, dropout_p)
    d_bias = q.new_empty((*q.shape[:3], k.shape[2]), dtype=torch.float32) if bias_grad and bias is not None else q.new_empty(0, dtype=torch.float32)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), d_bias


def _forward_setup_context(ctx, inputs, output):
    q, k, v, causal, sm_scale, segment_ids, kv_segment_ids, bias, bottom_right, dropout_p, seed = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, segment_ids, kv_segment_ids, bias, seed)
    ctx.causal, ctx.sm_scale, ctx.bottom_right, ctx.dropout_p = causal, sm_scale, bottom_right, dropout_p


def _forward_backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, segment_ids, kv_segment_ids, bias, seed = ctx.saved_tensors
    bias_grad = bias is not None and ctx.needs_input_grad[7]
    dq, dk, dv, d_bias = torch.ops.torchtpu.flash_attention_backward(
        q, k, v, out, grad_out.contiguous(), lse, ctx.causal, ctx.sm_scale, segment_ids, kv_segment_ids, bias, bias_grad, ctx.bottom_right, ctx.dropout_p, seed
    )
    if bias_grad:
        # The bias broadcast over batch or heads: its gradient sums over them.
        dims = [i for i in (0, 1) if bias.shape[i] == 1 and d_bias.shape[i] != 1]
        d_bias = d_bias.sum(dims, keepdim=True) if dims else d_bias
    return dq, dk, dv, None, None, None, None, (d_bias if bias_grad else None), None, None, None


flash_attention_forward.register_autograd(_forward_backward, setup_context=_forward_setup_context)


torch.library.define(
    "torchtpu::flash_attention",
    "(Tensor q, Tensor k, Tensor v, *, bool causal=False, float? sm_scale=None, Tensor? segment_ids=None, Tensor? kv_segment_ids=None, "
    "Tensor? attn_mask=None, float dropout_p=0.0, bool bottom_right=False, bool enable_gqa=True) -> Tensor",
)


_KERNEL_DTYPES = (torch.float32, torch.bfloat16)
#: What the public functions take beyond the kernels' dtypes: f16, computed in f32 (as a TPU
#: would in bf16/f32) and returned as f16.
_PUBLIC_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _upcast(t: Tensor) -> Tensor:
    return t.float() if t.dtype == torch.float16 else t


def _attention_layout(q: Tensor, k: Tensor, v: Tensor, enable_gqa: bool = True):
    """q, k, v as the kernels take them — ``[batch, heads, seq, head_dim]``, contiguous, f32 or
    bf16 — and how to give the output back in SDPA's form. SDPA's ``[..., L, E]``: inputs of
    different ranks are padded with leading 1s, their batch dims (all before the heads)
    broadcast and folded into one; 3-D inputs are one head. Heads broadcast too (one q head
    over k/v's); fewer k/v heads than q's, a divisor, is grouped-query attention. Strided
    inputs are read in place where the kernels can (a projection's output viewed per head with
    a head_dim that is a multiple of 128: see :func:`_head_layout`), else copied once."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, _PUBLIC_DTYPES)
    if min(q.dim(), k.dim(), v.dim()) < 3:
        raise ValueError(f"q, k and v must be [..., seq, head_dim] with a batch dim, like scaled_dot_product_attention's ([batch, heads, seq, head_dim], or [batch, seq, head_dim]); got shapes {tuple(q.shape)}, {tuple(k.shape)} and {tuple(v.shape)}")
    rank = max(q.dim(), k.dim(), v.dim())
    q, k, v = (t.reshape((1,) * (rank - t.dim()) + tuple(t.shape)) for t in (q, k, v))
    if rank == 3:
        q, k, v = (t.unsqueeze(1) for t in (q, k, v))
    try:
        lead = torch.broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3])
    except RuntimeError:
        raise ValueError(f"the batch dims of q {list(q.shape[:-3])}, k {list(k.shape[:-3])} and v {list(v.shape[:-3])} do not broadcast") from None
    hq, hk = q.shape[-3], k.shape[-3]
    if v.shape[-3] != hk:
        raise ValueError(f"k and v must have the same number of heads; got {hk} and {v.shape[-3]}")
    if hq != hk and not (hk == 1 or hq == 1 or (enable_gqa and hk and hq % hk == 0)):
        why = "" if enable_gqa else " (fewer k/v heads than q heads is grouped-query attention: pass enable_gqa=True)"
        raise ValueError(f"q has {hq} heads and k/v {hk}: they must be equal, one of them 1, or q's a multiple of k/v's{why}")
    heads = max(hq, hk) if hq == 1 else hq
    dtype = q.dtype
    batch = math.prod(lead)

    def kernel_form(t: Tensor, h: int) -> Tensor:
        t = _upcast(t.expand(*lead, h, *t.shape[-2:]).reshape(batch, h, *t.shape[-2:]))
        return t if _head_layout(t) is not None else t.contiguous()

    kv_heads = hk if hq != 1 else heads

    def restore(out: Tensor) -> Tensor:
        out = out.to(dtype)
        if rank == 3:
            return out.squeeze(1)
        return out.reshape(*lead, *out.shape[1:])

    return kernel_form(q, heads), kernel_form(k, kv_heads), kernel_form(v, kv_heads), restore, (lead, rank)


def _bias_layout(attn_mask: Tensor, lead, rank: int, heads: int, q_len: int, kv_len: int) -> Tensor:
    """SDPA's ``attn_mask`` (boolean: True takes part; or additive float), broadcastable to the
    scores ``[..., L, S]``, as the kernels' f32 bias ``[batch or 1, heads or 1, L, S]``
    (-inf where a boolean mask is False). Differentiable: autograd sums a broadcast."""
    if not isinstance(attn_mask, Tensor):
        raise TypeError(f"attn_mask must be a tensor (boolean or float), not {type(attn_mask).__name__}")
    if attn_mask.dtype == torch.bool:
        bias = torch.zeros(attn_mask.shape, dtype=torch.float32, device=attn_mask.device).masked_fill(~attn_mask, float("-inf"))
    elif attn_mask.is_floating_point():
        bias = attn_mask.float()
    else:
        raise TypeError(f"attn_mask must be boolean or floating point, not {attn_mask.dtype}")
    if bias.dim() > rank:
        # Extra leading dims of size 1 broadcast away, as in SDPA; others would grow the output.
        extra = bias.shape[: bias.dim() - rank]
        if any(n != 1 for n in extra):
            raise ValueError(f"attn_mask {list(attn_mask.shape)} has more dims than the attention's {rank}, and its extra leading dims {list(extra)} are not 1")
        bias = bias.reshape(bias.shape[bias.dim() - rank :])
    bias = bias.reshape((1,) * (rank - bias.dim()) + tuple(bias.shape))
    if rank == 3:
        bias = bias.unsqueeze(1)
    scores = (*lead, heads, q_len, kv_len)
    try:
        fits = torch.broadcast_shapes(bias.shape, scores) == torch.Size(scores)
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"attn_mask {list(attn_mask.shape)} does not broadcast to the attention scores {list(scores)}")
    batch_dims = bias.shape[:-3]
    if all(n == 1 for n in batch_dims):
        bias = bias.reshape(1, *bias.shape[-3:])
    else:
        bias = bias.expand(*lead, *bias.shape[-3:]).reshape(math.prod(lead), *bias.shape[-3:])
    return bias.expand(bias.shape[0], bias.shape[1], q_len, kv_len).contiguous()


#: Where the public function's ``causal`` says the diagonal lies.
_CAUSAL = {False: (False, False), True: (True, False), "top_left": (True, False), "bottom_right": (True, True)}


def _dropout_seed(device) -> Tensor:
    """A seed for dropout from PyTorch's default generator: ``torch.manual_seed`` makes a
    dropout run repeatable."""
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64).to(device)


@torch.library.impl("torchtpu::flash_attention", "CompositeImplicitAutograd")
def _flash_attention(q, k, v, *, causal=False, sm_scale=None, segment_ids=None, kv_segment_ids=None, attn_mask=None, dropout_p=0.0, bottom_right=False, enable_gqa=True):
    if segment_ids is not None and kv_segment_ids is None:
        kv_segment_ids = segment_ids
    q, k, v, restore, (lead, rank) = _attention_layout(q, k, v, enable_gqa)
    bias = None if attn_mask is None else _bias_layout(attn_mask, lead, rank, q.shape[1], q.shape[2], k.shape[2])
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
    seed = _dropout_seed(q.device) if dropout_p > 0 else None
    out, _ = torch.ops.torchtpu.flash_attention_forward(q, k, v, causal, sm_scale, segment_ids, kv_segment_ids, bias, bottom_right, float(dropout_p), seed)
    return restore(out[..., :dv] if out.shape[-1] != dv else out)


def flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal=False,
    sm_scale: Optional[float] = None,
    segment_ids: Optional[Tensor] = None,
    kv_segment_ids: Optional[Tensor] = None,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    enable_gqa: bool = True,
) -> Tensor:
    """Flash attention with ``torch.nn.functional.scaled_dot_product_attention``'s semantics
    over ``[batch, heads, seq, head_dim]`` tensors, or SDPA's other forms: ``[batch, seq,
    head_dim]``, more leading dims, ranks that differ (batch dims broadcast); any strides;
    f32, bf16 or f16 (f16 computed in f32 and returned as f16); v's head dim may differ from
    q's and k's.

    ``causal`` masks keys after each query: ``True`` or ``"top_left"`` as SDPA's
    ``is_causal`` (query ``i`` sees keys ``..=i``), ``"bottom_right"`` as flash-attn and
    KV-cache decoding (the last query sees the last key). ``attn_mask`` is SDPA's: boolean
    (True takes part) or additive float, broadcastable to ``[..., q_seq, kv_seq]``, with its
    gradient when it requires one; a query that sees no key gives zeros, as SDPA does.
    ``dropout_p`` drops attention weights as SDPA does in training, from PyTorch's default
    generator (``torch.manual_seed`` repeats a run; the dropped weights are not PyTorch's own).
    ``sm_scale`` defaults to ``1/sqrt(head_dim)``; k and v may have fewer heads than q (a
    divisor: grouped-query attention); ``segment_ids`` (``[batch, q_seq]``, with
    ``kv_segment_ids`` ``[batch, kv_seq]`` when the lengths differ) restrict each query to keys
    of its own segment (packed sequences).
    """
    if causal not in _CAUSAL:
        raise ValueError(f"causal must be False, True, 'top_left' or 'bottom_right'; got {causal!r}")
    is_causal, bottom_right = _CAUSAL[causal]
    return torch.ops.torchtpu.flash_attention(
        q, k, v, causal=is_causal, sm_scale=sm_scale, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, attn_mask=attn_mask, dropout_p=float(dropout_p), bottom_right=bottom_right, enable_gqa=enable_gqa
    )


def _check_matmul(a: Tensor, b: Tensor, transpose_b: bool = False) -> None:
    check_tensor("a", a)
    check_tensor("b", b)
    if a.dtype != b.dtype:
        raise TypeError(f"a and b must share a dtype; got {a.dtype} and {b.dtype}")
    if a.dim() not in (2, 3) or b.dim() != a.dim():
        raise ValueError(f"matmul takes [m, k] @ [k, n] or [batch, m, k] @ [batch, k, n]; got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dim() == 3 and a.shape[0] != b.shape[0]:
        raise ValueError(f"a and b must have the same batch; got {a.shape[0]} and {b.shape[0]}")
    if a.shape[-1] != b.shape[-1 if transpose_b else -2]:
        which = "last (b is given transposed, [n, k])" if transpose_b else "second-to-last"
        raise ValueError(f"a is {tuple(a.shape)} and b {tuple(b.shape)}: a's last dimension must equal b's {which}")
    same_device(a=a, b=b)


def _matmul_problem(a: Tensor, b: Tensor, transpose_b: bool = False) -> dict:
    _check_matmul(a, b, transpose_b)
    batch = int(a.shape[0]) if a.dim() == 3 else None
    n = b.shape[-2] if transpose_b else b.shape[-1]
    return {"batch": batch, "m": int(a.shape[-2]), "n": int(n), "k": int(a.shape[-1]), "dtype": dtype_name(a.dtype), "transpose_b": bool(transpose_b)}


def _matmul(a, b, transpose_b=False):
    problem = _matmul_problem(a, b, transpose_b)
    _check_contiguous(a=a, b=b)
    (out,) = _MATMUL(problem, [a, b])
    return out


@torch.library.custom_op("torchtpu::matmul", mutates_args=(), device_types="cpu")
def matmul(a: Tensor, b: Tensor, transpose_b: bool = False) -> Tensor:
    """``a @ b`` for ``[m, k] @ [k, n]`` or batched ``[batch, m, k] @ [batch, k, n]``, f32 or
    bf16 (accumulated in f32); with ``transpose_b``, ``a @ bᵀ`` for b given as ``[(batch,) n,
    k]`` (an ``nn.Linear`` weight), read in place."""
    return _matmul(a, b, transpose_b)


@matmul.register_fake
def _(a, b, transpose_b=False):
    _check_matmul(a, b, transpose_b)
    return a.new_empty((*a.shape[:-1], b.shape[-2] if transpose_b else b.shape[-1]))


def _matmul_setup_context(ctx, inputs, output):
    a, b, transpose_b = inputs
    ctx.save_for_backward(a, b)
    ctx.transpose_b = transpose_b


def _matmul_backward(ctx, grad):
    a, b = ctx.saved_tensors
    grad = grad.contiguous()
    grad_a = grad_b = None
    # C = A·B: dA = dC·Bᵀ (B read transposed in place), dB = Aᵀ·dC. C = A·Bᵀ (B stored
    # [n, k]): dA = dC·B, dB = dCᵀ·A.
    if ctx.needs_input_grad[0]:
        grad_a = torch.ops.torchtpu.matmul(grad, b, not ctx.transpose_b)
    if ctx.needs_input_grad[1]:
        grad_b = torch.ops.torchtpu.matmul(grad.mT.contiguous(), a) if ctx.transpose_b else torch.ops.torchtpu.matmul(a.mT.contiguous(), grad)
    return grad_a, grad_b, None


matmul.register_autograd(_matmul_backward, setup_context=_matmul_setup_context)


def _stored_transposed(t: Tensor) -> bool:
    """Whether ``t`` is the transpose of a contiguous tensor (``W.T``, ``x.mT``) and not itself
    contiguous: our kernel then reads it in place as a transposed operand."""
    return t.dim() >= 2 and not t.is_contiguous() and t.mT.is_contiguous()


def matmul_like_torch(a: Tensor, b: Tensor) -> Tensor:
    """``torch.matmul(a, b)`` on our kernel: 1-D operands, ``[..., m, k] @ [k, n]`` folded into
    one ``[(...·m), k] @ [k, n]`` call, batch dims broadcast, any strides (a transposed b, such
    as ``W.T``, is read in place; another strided operand is copied once), f32, bf16 or f16 (f16 computed in f32 and returned as f16); with gradients."""
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
        a_rows = a2.reshape(rows, a2.shape[-1]).contiguous()
        if _stored_transposed(b2):
            out = torch.ops.torchtpu.matmul(a_rows, b2.mT, True)
        else:
            out = torch.ops.torchtpu.matmul(a_rows, b2.contiguous())
        out = out.reshape(*a2.shape[:-1], b2.shape[-1])
    else:
        try:
            batch = torch.broadcast_shapes(a2.shape[:-2], b2.shape[:-2])
        except RuntimeError:
            raise ValueError(f"a is {tuple(a.shape)} and b {tuple(b.shape)}: their batch dims {list(a2.shape[:-2])} and {list(b2.shape[:-2])} do not broadcast") from None
        count = math.prod(batch)
        a3 = a2.expand(*batch, *a2.shape[-2:]).reshape(count, *a2.shape[-2:]).contiguous()
        if _stored_transposed(b2) and b2.shape[:-2] == batch:
            out = torch.ops.torchtpu.matmul(a3, b2.mT.reshape(count, b2.shape[-1], b2.shape[-2]), True)
        else:
            b3 = b2.expand(*batch, *b2.shape[-2:]).reshape(count, *b2.shape[-2:]).contiguous()
            out = torch.ops.torchtpu.matmul(a3, b3)
        out = out.reshape(*batch, a2.shape[-2], b2.shape[-1])
    if a.dim() == 1:
        out = out.squeeze(-2)
    if b.dim() == 1:
        out = out.squeeze(-1)
    return out.to(dtype)
