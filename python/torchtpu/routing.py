"""Drop-in routing: PyTorch code runs on our kernels without changing a call site.

Under ``with torchtpu.drop_in() as routed:``, calls to ``F.scaled_dot_product_attention``,
``torch.matmul`` / ``@`` / ``torch.mm`` / ``torch.bmm`` / ``F.linear``, ``F.rms_norm`` and
``F.layer_norm`` that our kernels can serve go to them — attention with its masks (boolean,
additive, ``CausalBias``), dropout and broadcast batch dims included; the rest (f64, a device
we do not serve, arguments our functions refuse...) fall through to PyTorch unchanged. ``routed.hits`` counts
the calls each route took, ``routed.fallbacks`` the ones it passed on, by reason. It is a
``TorchFunctionMode``, so it works in eager and under ``torch.compile``.
"""

from __future__ import annotations

import collections
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from torchtpu import norm, ops

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_DEVICES = ("cpu", "tpu")


def _why_not(*tensors: Optional[Tensor]) -> Optional[str]:
    """Why our kernels cannot take these tensors, or None if they can."""
    present = [t for t in tensors if t is not None]
    if not all(isinstance(t, Tensor) for t in present):
        return "not a tensor"
    if any(t.dtype not in _FLOATS for t in present):
        return "dtype"
    if any(t.device.type not in _DEVICES for t in present) or len({t.device for t in present}) > 1:
        return "device"
    if any(t.is_sparse or t.is_nested for t in present):
        return "layout"
    if len({t.dtype for t in present}) > 1:
        return "mixed dtypes"
    return None


def _causal_bias(attn_mask) -> Optional[str]:
    """The alignment a ``torch.nn.attention.bias.CausalBias`` mask stands for, or None."""
    try:
        from torch.nn.attention.bias import CausalBias, CausalVariant
    except ImportError:
        return None
    if not isinstance(attn_mask, CausalBias):
        return None
    return {CausalVariant.UPPER_LEFT: "top_left", CausalVariant.LOWER_RIGHT: "bottom_right"}.get(attn_mask.variant)


def _attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    causal = bool(is_causal)
    alignment = _causal_bias(attn_mask)
    if alignment is not None:
        if is_causal:
            return "causal bias and is_causal"
        attn_mask, causal = None, alignment
    why = _why_not(query, key, value)
    if why:
        return why
    if attn_mask is not None and is_causal:
        return "attn_mask and is_causal"  # SDPA refuses both: its error, not a result
    if attn_mask is not None:
        # SDPA takes a boolean mask, or a float one in the query's dtype.
        if not isinstance(attn_mask, Tensor) or attn_mask.dtype not in (torch.bool, query.dtype):
            return "attn_mask dtype"
        if attn_mask.device != query.device or attn_mask.is_sparse or attn_mask.is_nested:
            return "attn_mask device"
    if min(query.dim(), key.dim(), value.dim()) < 3:
        return "rank"
    return ops.flash_attention(query, key, value, causal=causal, sm_scale=scale, attn_mask=attn_mask, dropout_p=dropout_p, enable_gqa=enable_gqa)


def _matmul(a, b):
    why = _why_not(a, b)
    if why:
        return why
    if a.dim() == 0 or b.dim() == 0:
        return "shape"
    return ops.matmul_like_torch(a, b)


def _mm(a, b):
    return _matmul(a, b) if getattr(a, "dim", lambda: 0)() == 2 and getattr(b, "dim", lambda: 0)() == 2 else "shape"


def _bmm(a, b):
    return _matmul(a, b) if getattr(a, "dim", lambda: 0)() == 3 and getattr(b, "dim", lambda: 0)() == 3 else "shape"


def _linear(input, weight, bias=None):
    why = _why_not(input, weight, bias)
    if why:
        return why
    if input.dim() == 0 or weight.dim() not in (1, 2):
        return "shape"
    # A 1-D weight is one output feature without its dim: x @ w, as F.linear gives.
    out = ops.matmul_like_torch(input, weight.T if weight.dim() == 2 else weight)
    return out + bias if bias is not None else out


def _rms_norm(input, normalized_shape, weight=None, eps=None):
    why = _why_not(input, weight)
    return why or norm.rms_norm(input, normalized_shape, weight, eps)


def _layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    why = _why_not(input, weight, bias)
    return why or norm.layer_norm(input, normalized_shape, weight, bias, eps)


#: Each routed torch function, its name in the counts, and our implementation: it returns the
#: result, or a string saying why it passes the call on.
_ROUTES: dict[Callable, tuple[str, Callable]] = {
    F.scaled_dot_product_attention: ("scaled_dot_product_attention", _attention),
    torch.matmul: ("matmul", _matmul),
    Tensor.__matmul__: ("matmul", _matmul),
    Tensor.matmul: ("matmul", _matmul),  # what `a @ b` reaches a mode as
    torch.mm: ("mm", _mm),
    torch.bmm: ("bmm", _bmm),
    F.linear: ("linear", _linear),
    F.rms_norm: ("rms_norm", _rms_norm),
    F.layer_norm: ("layer_norm", _layer_norm),
}


class drop_in(TorchFunctionMode):
    """Routes what our kernels serve to them while active (see the module's doc)."""

    def __init__(self):
        super().__init__()
        self.hits: collections.Counter = collections.Counter()
        self.fallbacks: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        route = _ROUTES.get(func)
        if route is not None:
            name, ours = route
            try:
                result = ours(*args, **kwargs)
            except (TypeError, ValueError) as e:
                # Arguments we do not take (or that PyTorch itself would refuse): PyTorch
                # decides, so the user gets exactly its result or its error.
                result = f"refused: {e}"
            if not isinstance(result, str):
                self.hits[name] += 1
                return result
            self.fallbacks[f"{name}: {result}"] += 1
        return func(*args, **kwargs)
