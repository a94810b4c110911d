"""PyTorch's own OpInfo sample inputs for matmul, mm, bmm, F.linear and
F.scaled_dot_product_attention, run under torchtpu.drop_in(): every sample our kernels serve
agrees with PyTorch in forward and backward, and every sample is served. bf16 and f16 results are held to no worse than
PyTorch's own low-precision CPU result against f64. Samples with dropout are compared with
SDPA in f64 dropping what torchtpu's generator drops (``dropout_reference``, written
independently): PyTorch's own dropout draws other weights."""

import math

import pytest
import torch
import torch.nn.functional as F
from dropout_reference import keep_mask, seed_after
from torch.testing._internal.common_methods_invocations import op_db

import torchtpu

OPS = {o.name: o for o in op_db if o.name in ("matmul", "mm", "bmm", "nn.functional.linear", "nn.functional.scaled_dot_product_attention")}
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2), torch.float16: dict(atol=5e-3, rtol=5e-3)}


def _sdpa_with_our_dropout(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """SDPA with its weights dropped where torchtpu drops them when the OpInfo's op runs it (its
    ``wrapper_set_seed`` seeds PyTorch with 42 first): the inputs broadcast to one batch shape,
    each (batch, head) keyed as the kernels key it."""
    rank = max(t.dim() for t in (query, key, value))
    q, k, v = (t.reshape((1,) * (rank - t.dim()) + tuple(t.shape)) for t in (query, key, value))
    lead = torch.broadcast_shapes(*(t.shape[:-2] for t in (q, k, v)))
    q, k, v = (t.expand(*lead, *t.shape[-2:]) for t in (q, k, v))
    sq, sk = q.shape[-2], k.shape[-2]
    keep = keep_mask(seed_after(42), math.prod(lead), sq, sk, dropout_p).reshape(*lead, sq, sk)
    s = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if is_causal:
        s = s.masked_fill(~torch.ones(sq, sk, dtype=torch.bool).tril(), float("-inf"))
    if attn_mask is not None:
        s = s + attn_mask if attn_mask.dtype != torch.bool else s.masked_fill(~attn_mask, float("-inf"))
    return (F.softmax(s, dim=-1) * keep.to(s.dtype) / (1.0 - dropout_p)) @ v


class _Reference:
    op = staticmethod(_sdpa_with_our_dropout)


def _outputs_and_grads(op, sample, grad_seed, cast=None):
    """The op's output on the sample (its tensors cast to ``cast`` first, as fresh leaves) and
    the gradients of a random weighting of it for every input that takes one."""
    def leaf(t):
        if not isinstance(t, torch.Tensor):
            return t
        return t.detach().to(cast).requires_grad_(t.requires_grad) if cast is not None else t

    inputs = [leaf(t) for t in (sample.input, *sample.args)]
    kwargs = {k: leaf(v) for k, v in sample.kwargs.items()}
    torch.manual_seed(0)
    out = op.op(*inputs, **kwargs)
    leaves = [t for t in (*inputs, *kwargs.values()) if isinstance(t, torch.Tensor) and t.requires_grad]
    if not leaves:
        return out, []
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64).to(out.dtype)
    return out, list(torch.autograd.grad(out, leaves, weight, allow_unused=True))


def _error(got, want):
    return float((got.double() - want).detach().abs().max()) if got.numel() else 0.0


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("name", sorted(OPS))
def test_every_opinfo_sample_runs_on_our_kernels_and_agrees_with_pytorch(name, dtype):
    op = OPS[name]
    served = 0
    for i, sample in enumerate(op.sample_inputs("cpu", dtype, requires_grad=True)):
        with torchtpu.drop_in() as routed:
            got = _outputs_and_grads(op, sample, i)
        assert routed.hits and not routed.fallbacks, f"sample {i} fell through: {dict(routed.fallbacks)}"
        served += 1
        # With dropout, the computation PyTorch's SDPA would make had it dropped our weights.
        same = _Reference if sample.kwargs.get("dropout_p", 0.0) > 0 else op
        exact = _outputs_and_grads(same, sample, i, cast=torch.float64)
        theirs = _outputs_and_grads(same, sample, i)
        for what, ours_t, want, torch_t in zip(["forward", *(f"grad {k}" for k in range(len(got[1])))], [got[0], *got[1]], [exact[0], *exact[1]], [theirs[0], *theirs[1]]):
            if want is None:
                continue
            tol = TOL[dtype]["atol"] + TOL[dtype]["rtol"] * float(want.detach().abs().max()) if want.numel() else 0.0
            # As close to f64 as PyTorch's own result in this dtype, or within the dtype's tolerance.
            assert _error(ours_t, want) <= max(2 * _error(torch_t, want), tol), f"sample {i} {what}: ours {_error(ours_t, want):.3g}, torch {_error(torch_t, want):.3g}, tolerance {tol:.3g}"
    assert served > 0
