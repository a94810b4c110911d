"""``torchtpu::gmm`` and ``torchtpu::tgmm``: grouped matmul for mixture-of-experts (megablox's
``gmm``/``tgmm``) on our kernels (the Rust ops ``gmm`` and ``tgmm``), with gradients.

``gmm(lhs [m, k], rhs [g, k, n], group_sizes [g]) -> [m, n]``: the rows of ``lhs`` come in
contiguous groups of ``group_sizes`` rows, group ``j``'s multiplied by ``rhs[j]``; rows after the
last group give zeros. ``transpose_rhs`` takes ``rhs`` as ``[g, n, k]`` (stacked ``nn.Linear``
weights). ``tgmm(lhs [m, k], grad [m, n], group_sizes) -> [g, k, n]`` is ``gmm``'s gradient for
``rhs``: ``lhs[rows of j].T @ grad[rows of j]`` per group, zeros for an empty group.
"""

from __future__ import annotations

import torch
from torch import Tensor

from torchtpu.library import RustOp, check_int_tensor, check_tensor, dtype_name, int32_clamped, same_device

_GMM, _TGMM = RustOp("gmm"), RustOp("tgmm")


def _ends(group_sizes: Tensor, rows: int) -> Tensor:
    """The group ends the kernels take (int32 running sums of the sizes, summed in int64)."""
    return int32_clamped(torch.cumsum(group_sizes.to(torch.int64), 0), -1, rows + 1)


def _check_sizes(group_sizes: Tensor) -> int:
    check_int_tensor("group_sizes", group_sizes)
    if group_sizes.dim() != 1 or group_sizes.numel() == 0:
        raise ValueError(f"group_sizes must be 1-D with one size per group (at least one); got shape {list(group_sizes.shape)}")
    return int(group_sizes.shape[0])


def _gmm_problem(lhs: Tensor, rhs: Tensor, group_sizes: Tensor, transpose_rhs: bool) -> dict:
    check_tensor("lhs", lhs)
    check_tensor("rhs", rhs)
    groups = _check_sizes(group_sizes)
    if lhs.dim() != 2 or rhs.dim() != 3:
        raise ValueError(f"gmm takes lhs [m, k] and rhs [g, {'n, k' if transpose_rhs else 'k, n'}]; got {list(lhs.shape)} and {list(rhs.shape)}")
    k = int(rhs.shape[2] if transpose_rhs else rhs.shape[1])
    n = int(rhs.shape[1] if transpose_rhs else rhs.shape[2])
    if int(lhs.shape[1]) != k or int(rhs.shape[0]) != groups:
        raise ValueError(
            f"gmm: lhs {list(lhs.shape)} and rhs {list(rhs.shape)}{' (transposed)' if transpose_rhs else ''} must agree on k, and rhs must hold one matrix per group ({groups})"
        )
    if lhs.dtype != rhs.dtype:
        raise TypeError(f"lhs and rhs must have one dtype; got {lhs.dtype} and {rhs.dtype}")
    same_device(lhs=lhs, rhs=rhs, group_sizes=group_sizes)
    return {"m": int(lhs.shape[0]), "k": k, "n": n, "groups": groups, "dtype": dtype_name(lhs.dtype), "transpose_rhs": bool(transpose_rhs)}


def _tgmm_problem(lhs: Tensor, grad: Tensor, group_sizes: Tensor) -> dict:
    check_tensor("lhs", lhs)
    check_tensor("grad", grad)
    groups = _check_sizes(group_sizes)
    if lhs.dim() != 2 or grad.dim() != 2 or lhs.shape[0] != grad.shape[0]:
        raise ValueError(f"tgmm takes lhs [m, k] and grad [m, n]; got {list(lhs.shape)} and {list(grad.shape)}")
    if lhs.dtype != grad.dtype:
        raise TypeError(f"lhs and grad must have one dtype; got {lhs.dtype} and {grad.dtype}")
    same_device(lhs=lhs, grad=grad, group_sizes=group_sizes)
    return {"m": int(lhs.shape[0]), "k": int(lhs.shape[1]), "n": int(grad.shape[1]), "groups": groups, "dtype": dtype_name(lhs.dtype), "transpose_rhs": False}


def _gmm(lhs: Tensor, rhs: Tensor, group_sizes: Tensor, transpose_rhs: bool) -> Tensor:
    problem = _gmm_problem(lhs, rhs, group_sizes, transpose_rhs)
    (out,) = _GMM(problem, [_ends(group_sizes, problem["m"]), lhs, rhs])
    return out


def _tgmm(lhs: Tensor, grad: Tensor, group_sizes: Tensor) -> Tensor:
    problem = _tgmm_problem(lhs, grad, group_sizes)
    (out,) = _TGMM(problem, [_ends(group_sizes, problem["m"]), lhs, grad])
    return out


@torch.library.custom_op("torchtpu::gmm", mutates_args=(), device_types="cpu")
def gmm_op(lhs: Tensor, rhs: Tensor, group_sizes: Tensor, transpose_rhs: bool) -> Tensor:
    """Grouped matmul: ``lhs[rows of j] @ rhs[j]`` (``@ rhs[j].T`` when ``transpose_rhs``)."""
    return _gmm(lhs, rhs, group_sizes, transpose_rhs)


@gmm_op.register_fake
def _(lhs, rhs, group_sizes, transpose_rhs):
    problem = _gmm_problem(lhs, rhs, group_sizes, transpose_rhs)
    return lhs.new_empty((problem["m"], problem["n"]))


@torch.library.custom_op("torchtpu::tgmm", mutates_args=(), device_types="cpu")
def tgmm_op(lhs: Tensor, grad: Tensor, group_sizes: Tensor) -> Tensor:
    """``lhs[rows of j].T @ grad[rows of j]`` for every group ``j``: ``[g, k, n]``."""
    return _tgmm(lhs, grad, group_sizes)


@tgmm_op.register_fake
def _(lhs, grad, group_sizes):
    problem = _tgmm_problem(lhs, grad, group_sizes)
    return lhs.new_empty((problem["groups"], problem["k"], problem["n"]))


def _setup_context(ctx, inputs, output):
    lhs, rhs, group_sizes, transpose_rhs = inputs
    ctx.save_for_backward(lhs, rhs, group_sizes)
    ctx.transpose_rhs = transpose_rhs


def _autograd(ctx, grad_out):
    lhs, rhs, group_sizes = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    d_lhs = d_rhs = None
    if ctx.needs_input_grad[0]:
        # out = lhs @ W: d_lhs = grad @ Wᵀ, the same rhs read the other way round.
        d_lhs = torch.ops.torchtpu.gmm(grad_out, rhs, group_sizes, not ctx.transpose_rhs)
    if ctx.needs_input_grad[1]:
        d_rhs = torch.ops.torchtpu.tgmm(grad_out, lhs, group_sizes) if ctx.transpose_rhs else torch.ops.torchtpu.tgmm(lhs, grad_out, group_sizes)
    return d_lhs, d_rhs, None, None


gmm_op.register_autograd(_autograd, setup_context=_setup_context)


def gmm(lhs: Tensor, rhs: Tensor, group_sizes: Tensor, transpose_rhs: bool = False) -> Tensor:
    """Grouped matmul for mixture-of-experts: group ``j`` of ``lhs``'s rows (``group_sizes[j]``
    rows, in order) times ``rhs[j]``; differentiable in ``lhs`` and ``rhs``."""
    return torch.ops.torchtpu.gmm(lhs, rhs, group_sizes, transpose_rhs)


def tgmm(lhs: Tensor, grad: Tensor, group_sizes: Tensor) -> Tensor:
    """``lhs[rows of j].T @ grad[rows of j]`` for every group: ``gmm``'s gradient for ``rhs``."""
    return torch.ops.torchtpu.tgmm(lhs, grad, group_sizes)
