"""``torchtpu::ragged_paged_attention``: attention for serving over a paged KV cache, with
vLLM's TPU kernel's arguments, on our kernel (the Rust op ``ragged_paged_attention``).

``ragged_paged_attention(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *,
sm_scale=1.0, sliding_window=None, soft_cap=None)``:

- ``q [tokens, q_heads, head_dim]``: every sequence's new query tokens, in order
  (``cu_q_lens[s]:cu_q_lens[s + 1]`` are sequence ``s``'s), then padding (zeros out);
- ``kv_pages [pages, page_size, 2 * kv_heads, head_dim]``: the cache, k and v of kv head ``h``
  at ``2h`` and ``2h + 1``;
- ``kv_lens [max_seqs]``, ``page_indices [max_seqs, pages_per_seq]``, ``cu_q_lens
  [max_seqs + 1]``, ``num_seqs [1]``: int tensors saying which pages hold each sequence.

Each query attends causally to its sequence's keys, bottom-right aligned (the new tokens are
the last of the cache): decode (one query), prefill and chunked prefill mix freely.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from torchtpu.library import RustOp, check_int_tensor, check_tensor, dtype_name, int32_clamped, same_device

_PAGED = RustOp("ragged_paged_attention")
_INT32 = (-(2**31), 2**31 - 1)


def _table(name: str, t: Tensor, shape: tuple) -> Tensor:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}; got {list(t.shape)}")
    return int32_clamped(t, *_INT32)


def _problem(q: Tensor, kv_pages: Tensor, kv_lens: Tensor, page_indices: Tensor, cu_q_lens: Tensor, num_seqs: Tensor, sm_scale: float, sliding_window: Optional[int], soft_cap: Optional[float]) -> dict:
    check_tensor("q", q)
    check_tensor("kv_pages", kv_pages)
    if q.dim() != 3 or kv_pages.dim() != 4 or kv_pages.shape[2] % 2 != 0 or q.shape[2] != kv_pages.shape[3]:
        raise ValueError(
            f"q must be [tokens, q_heads, head_dim] and kv_pages [pages, page_size, 2 * kv_heads, head_dim] (k and v interleaved); got {list(q.shape)} and {list(kv_pages.shape)}"
        )
    if q.dtype != kv_pages.dtype:
        raise TypeError(f"q and kv_pages must have one dtype; got {q.dtype} and {kv_pages.dtype}")
    for name, table in (("kv_lens", kv_lens), ("page_indices", page_indices), ("cu_q_lens", cu_q_lens), ("num_seqs", num_seqs)):
        check_int_tensor(name, table)
    if page_indices.dim() != 2:
        raise ValueError(f"page_indices must be a 2-D tensor [max_seqs, pages_per_seq]; got shape {list(page_indices.shape)}")
    if sliding_window is not None and (isinstance(sliding_window, bool) or not isinstance(sliding_window, int)):
        raise TypeError(f"sliding_window must be an int or None; got {type(sliding_window).__name__}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be at least 1 (a query sees itself); got {sliding_window}")
    same_device(q=q, kv_pages=kv_pages, kv_lens=kv_lens, page_indices=page_indices, cu_q_lens=cu_q_lens, num_seqs=num_seqs)
    problem = {
        "tokens": int(q.shape[0]),
        "q_heads": int(q.shape[1]),
        "kv_heads": int(kv_pages.shape[2]) // 2,
        "head_dim": int(q.shape[2]),
        "num_pages": int(kv_pages.shape[0]),
        "page_size": int(kv_pages.shape[1]),
        "max_seqs": int(page_indices.shape[0]),
        "pages_per_seq": int(page_indices.shape[1]),
        "dtype": dtype_name(q.dtype),
        "sm_scale": float(sm_scale),
        "sliding_window": sliding_window,
        "soft_cap": None if soft_cap is None else float(soft_cap),
    }
    _PAGED.signature(problem)  # the Rust op's checks of the problem (head counts, page size...)
    return problem


def _ragged_paged_attention(
    q: Tensor, kv_pages: Tensor, kv_lens: Tensor, page_indices: Tensor, cu_q_lens: Tensor, num_seqs: Tensor, sm_scale: float, sliding_window: Optional[int], soft_cap: Optional[float]
) -> Tensor:
    problem = _problem(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale, sliding_window, soft_cap)
    max_seqs = problem["max_seqs"]
    tables = [
        _table("kv_lens", kv_lens, (max_seqs,)),
        _table("page_indices", page_indices, (max_seqs, problem["pages_per_seq"])),
        _table("cu_q_lens", cu_q_lens, (max_seqs + 1,)),
        _table("num_seqs", num_seqs, (1,)),
    ]
    # The kernel reads q as [kv_heads, tokens * group, head_dim] (the query heads of a kv head
    # folded into rows, token-major), and the cache as [pages, page_size, 2 * kv_heads *
    # head_dim] (the same memory: a view, not a copy).
    tokens, q_heads, head_dim = q.shape
    kv_heads = problem["kv_heads"]
    group = q_heads // kv_heads
    folded = q.reshape(tokens, kv_heads, group, head_dim).transpose(0, 1).reshape(kv_heads, tokens * group, head_dim)
    cache = kv_pages.contiguous().view(problem["num_pages"], problem["page_size"], -1)
    (out,) = _PAGED(problem, [*tables, folded, cache])
    return out.reshape(kv_heads, tokens, group, head_dim).transpose(0, 1).reshape(q.shape)


@torch.library.custom_op("torchtpu::ragged_paged_attention", mutates_args=(), device_types="cpu")
def ragged_paged_attention_op(
    q: Tensor,
    kv_pages: Tensor,
    kv_lens: Tensor,
    page_indices: Tensor,
    cu_q_lens: Tensor,
    num_seqs: Tensor,
    sm_scale: float,
    sliding_window: Optional[int],
    soft_cap: Optional[float],
) -> Tensor:
    """Ragged paged attention (see the module): ``[tokens, q_heads, head_dim]``."""
    return _ragged_paged_attention(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale, sliding_window, soft_cap)


@ragged_paged_attention_op.register_fake
def _(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale, sliding_window, soft_cap):
    _problem(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale, sliding_window, soft_cap)
    return q.new_empty(q.shape)


def ragged_paged_attention(
    q: Tensor,
    kv_pages: Tensor,
    kv_lens: Tensor,
    page_indices: Tensor,
    cu_q_lens: Tensor,
    num_seqs: Tensor,
    *,
    sm_scale: float = 1.0,
    sliding_window: Optional[int] = None,
    soft_cap: Optional[float] = None,
) -> Tensor:
    """Attention of a ragged batch of sequences over a paged KV cache, as vLLM's TPU kernel
    (see the module for the arguments)."""
    return torch.ops.torchtpu.ragged_paged_attention(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale, sliding_window, soft_cap)
