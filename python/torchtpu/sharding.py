"""DTensor sharding rules for our ops: with them, ``torch.distributed.tensor.DTensor`` inputs
run our kernels on each rank's shard, with the redistribution DTensor inserts.

- Attention (forward and backward) shards over the batch, or over the heads — q heads and
  k/v heads together, so each rank keeps whole grouped-query groups (both head counts must
  divide by the mesh) — or runs replicated. Segment ids follow the batch, a bias follows
  whichever of its batch and heads it has. With dropout only replicated: dropout keys its
  random stream by the (batch, head) a kernel sees, which on a shard is not the global one.
- Matmul shards rows (a's), columns (b's) or the contraction (a partial sum, which DTensor
  reduces), over the batch too when batched.

Registered on import (when ``torch.distributed`` is available)."""

from __future__ import annotations

import math

import torch

try:
    from torch.distributed.tensor import Partial, Replicate, Shard
    from torch.distributed.tensor.experimental import register_sharding
except ImportError:  # a torch built without distributed support
    register_sharding = None


def _mesh_sizes(spec) -> tuple:
    mesh = getattr(spec, "device_mesh", None) or getattr(spec, "mesh", None)
    return tuple(mesh.shape) if mesh is not None else (1,)


def _divides(n: int, spec) -> bool:
    """Whether ``n`` splits evenly over the whole mesh: a strategy is applied along every mesh
    dim, so a dim sharded on all of them is split into their product."""
    return n % math.prod(_mesh_sizes(spec)) == 0


def _attention_strategies(q, k, segments: bool, bias, dropout_p: float, inputs, outputs, tail):
    """Acceptable (outputs, inputs) placements for an attention op: ``inputs(place_qkv,
    place_segments, place_bias)`` and ``outputs(place)`` build the op's lists; ``tail`` is the
    placements of the arguments after the bias."""
    replicate = Replicate()
    strategies = [(outputs(replicate), inputs(replicate, replicate if segments else None, replicate if bias is not None else None) + tail(replicate))]
    if dropout_p > 0:
        return strategies
    batch, heads, kv_heads = q.shape[0], q.shape[1], k.shape[1]
    bias_batch, bias_heads = (bias.shape[0], bias.shape[1]) if bias is not None else (1, 1)
    if _divides(batch, q):
        on_bias = None if bias is None else (Shard(0) if bias_batch > 1 else replicate)
        strategies.append((outputs(Shard(0)), inputs(Shard(0), Shard(0) if segments else None, on_bias) + tail(replicate)))
    if _divides(heads, q) and _divides(kv_heads, q):
        on_bias = None if bias is None else (Shard(1) if bias_heads > 1 else replicate)
        strategies.append((outputs(Shard(1)), inputs(Shard(1), replicate if segments else None, on_bias) + tail(replicate)))
    return strategies


def _matmul_strategies(a, b, transpose_b: bool):
    """``a @ b`` (``a @ bᵀ`` with ``transpose_b``; 2-D or batched 3-D)."""
    r = Replicate()
    lead = a.ndim - 2
    rows, cols_b, contract_a = Shard(lead), Shard(lead + (0 if transpose_b else 1)), Shard(lead + 1)
    contract_b = Shard(lead + (1 if transpose_b else 0))
    strategies = [
        ([r], [r, r, None]),
        ([Shard(lead)], [rows, r, None]),
        ([Shard(lead + 1)], [r, cols_b, None]),
        ([Partial()], [contract_a, contract_b, None]),
    ]
    if lead:
        strategies.append(([Shard(0)], [Shard(0), Shard(0), None]))
    return strategies


def _register() -> None:
    ops = torch.ops.torchtpu

    @register_sharding(ops.flash_attention_forward.default)
    def _(q, k, v, causal, sm_scale, segment_ids, kv_segment_ids, bias=None, bottom_right=False, dropout_p=0.0, seed=None):
        segments = segment_ids is not None
        return _attention_strategies(
            q,
            k,
            segments,
            bias,
            dropout_p,
            inputs=lambda p, seg, b: [p, p, p, None, None, seg, seg, b, None, None],
            outputs=lambda p: [p, p],
            tail=lambda r: [r if seed is not None else None],
        )

    @register_sharding(ops.flash_attention_backward.default)
    def _(q, k, v, out, grad_out, lse, causal, sm_scale, segment_ids, kv_segment_ids, bias=None, bias_grad=False, bottom_right=False, dropout_p=0.0, seed=None):
        segments = segment_ids is not None
        # dbias is [b, h, sq, sk] with bias_grad (sharded as q), else an empty placeholder.
        d_bias = (lambda p: p) if bias_grad and bias is not None else (lambda p: Replicate())
        return _attention_strategies(
            q,
            k,
            segments,
            bias,
            dropout_p,
            inputs=lambda p, seg, b: [p, p, p, p, p, p, None, None, seg, seg, b, None, None, None],
            outputs=lambda p: [p, p, p, d_bias(p)],
            tail=lambda r: [r if seed is not None else None],
        )

    @register_sharding(ops.matmul.default)
    def _(a, b, transpose_b=False):
        return _matmul_strategies(a, b, transpose_b)


if register_sharding is not None:
    _register()
