"""The TPU path: our kernels on TorchTPU ``tpu`` tensors.

For a call on ``tpu`` tensors we lower the kernel for the chip (with that chip's tuned block)
to a StableHLO module holding the Mosaic kernel in a ``tpu_custom_call``, register it once
with TorchTPU's custom-kernel bridge (``tpu_torch_pallas.register_custom_kernel``, the door
TorchTPU's own Pallas kernels use) under a fingerprint of the module, and run it with
``call_custom_kernel``. Everything up to the bridge is testable without a TPU:
:func:`flash_attention_kernels` and :func:`matmul_kernel` give what a call would register, and
:func:`compile` compiles it with libtpu.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Optional

import torch
from torch import Tensor

from torchtpu import _torchtpu, norm, ops
from torchtpu.ops import _check_attention, _check_matmul

# Lanes and sublanes the attention kernels replicate segment ids across (see kernels/src/flash.rs).
_LANES, _SUBLANES = 128, 8
CHIPS = ("v4", "v5e", "v5p", "v6e", "tpu7x")


def default_chip() -> str:
    """The chip kernels are lowered for: ``$TORCHTPU_TPU_CHIP``, else v5e (as the Rust API)."""
    chip = os.environ.get("TORCHTPU_TPU_CHIP", "v5e")
    if chip not in CHIPS:
        raise ValueError(f"TORCHTPU_TPU_CHIP={chip!r} is not a chip torchtpu knows; expected one of {', '.join(CHIPS)}")
    return chip


@dataclasses.dataclass(frozen=True)
class TpuKernel:
    """One kernel as TorchTPU's bridge takes it."""

    name: str
    #: blake2b-128 of the module text, as TorchTPU fingerprints its Pallas modules.
    fingerprint: str
    #: StableHLO text: ``func.func public @main`` calling the Mosaic kernel via ``tpu_custom_call``.
    module: str
    #: (shape, dtype) of each operand, in order.
    inputs: tuple
    #: (shape, dtype) of each result, in order.
    outputs: tuple


def _kernel(name: str, module: str, inputs, outputs) -> TpuKernel:
    fingerprint = hashlib.blake2b(module.encode(), digest_size=16).hexdigest()
    return TpuKernel(name, fingerprint, module, tuple(inputs), tuple(outputs))


def _dtype_name(dtype: torch.dtype) -> str:
    names = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
    if dtype not in names:
        raise TypeError(f"TPU kernels take torch.float32 or torch.bfloat16, not {dtype}")
    return names[dtype]


def flash_attention_kernels(q: Tensor, k: Tensor, v: Tensor, causal: bool, sm_scale: float, with_segments: bool, chip: Optional[str] = None):
    """The (forward, dK/dV, dQ) kernels attention on these tensors (any device, ``meta``
    included: only shapes and dtypes are read) registers for ``chip``."""
    b, h, sq, d = (int(x) for x in q.shape)
    hk, sk = int(k.shape[1]), int(k.shape[2])
    chip = chip or default_chip()
    fwd, dkv, dq = _torchtpu.flash_attention_tpu_modules(b, h, hk, sq, sk, d, _dtype_name(q.dtype), causal, sm_scale, with_segments, chip)
    qt, kt, lse = ((b, h, sq, d), q.dtype), ((b, hk, sk, d), q.dtype), ((b, h, sq, 1), torch.float32)
    segs = [(shape, torch.int32) for shape in _segment_shapes(b, sq, sk, with_segments)]
    stem = f"torchtpu_flash_attention_{chip}"
    return (
        _kernel(f"{stem}_forward", fwd, [qt, kt, kt, *segs], [qt, lse]),
        _kernel(f"{stem}_backward_dkv", dkv, [qt, kt, kt, qt, qt, lse, *segs], [kt, kt]),
        _kernel(f"{stem}_backward_dq", dq, [qt, kt, kt, qt, qt, lse, *segs], [qt]),
    )


def matmul_kernel(a: Tensor, b: Tensor, chip: Optional[str] = None) -> TpuKernel:
    """The kernel ``a @ b`` registers for ``chip``."""
    batch = int(a.shape[0]) if a.dim() == 3 else None
    m, k, n = int(a.shape[-2]), int(a.shape[-1]), int(b.shape[-1])
    chip = chip or default_chip()
    module = _torchtpu.matmul_tpu_module(batch, m, n, k, _dtype_name(a.dtype), False, chip)
    lead = (batch,) if batch is not None else ()
    return _kernel(f"torchtpu_matmul_{chip}", module, [(tuple(a.shape), a.dtype), (tuple(b.shape), b.dtype)], [((*lead, m, n), a.dtype)])


def op_kernel(op, problem: dict, chip: Optional[str] = None) -> TpuKernel:
    """The kernel a registered Rust op (a :class:`torchtpu.library.RustOp`) registers for
    ``problem`` on ``chip``."""
    chip = chip or default_chip()
    inputs, outputs = op.signature(problem)
    return _kernel(f"torchtpu_{op.name}_{chip}", op.tpu_module(problem, chip), inputs, outputs)


def compile(kernel: TpuKernel, chip: Optional[str] = None) -> int:
    """Compiles ``kernel`` with libtpu for ``chip`` (no TPU needed); returns the code size in
    bytes, or raises ``RuntimeError`` with the compiler's message."""
    return _torchtpu.compile_for_tpu(kernel.module, chip or default_chip())


def _bridge():
    from torch_tpu._internal.pallas import tpu_torch_pallas  # only present with TorchTPU

    return tpu_torch_pallas


def _run(kernel: TpuKernel, inputs, device) -> list:
    bridge = _bridge()
    if not bridge.lookup_custom_kernel(kernel.name, kernel.fingerprint):
        bridge.register_custom_kernel(kernel.name, kernel.fingerprint, serialized_mlir_module=kernel.module.encode())
    outputs = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in kernel.outputs]
    return bridge.call_custom_kernel(kernel.name, kernel.fingerprint, inputs=list(inputs), output_shapes=outputs, donate_argnums=[], device_assignment=[])


def _segment_shapes(b: int, sq: int, sk: int, with_segments: bool):
    """The segment-id operands' shapes (see flash::segment_types): one placeholder tile each
    without segments."""
    if not with_segments:
        return [(1, _SUBLANES, _LANES)] * 2
    return [(b, sq, _LANES), (b, _SUBLANES, sk)]


def _segment_operands(q: Tensor, k: Tensor, segment_ids, kv_segment_ids):
    b, sq, sk = q.shape[0], q.shape[2], k.shape[2]
    if segment_ids is None:
        return [torch.zeros(shape, dtype=torch.int32, device=q.device) for shape in _segment_shapes(b, sq, sk, False)]
    segment_ids, kv_segment_ids = ops._segments_i32(segment_ids, kv_segment_ids)
    qs = segment_ids[:, :, None].expand(b, sq, _LANES).contiguous()
    ks = kv_segment_ids[:, None, :].expand(b, _SUBLANES, sk).contiguous()
    return qs, ks


def _flash_forward_tpu(q, k, v, causal, sm_scale, segment_ids, kv_segment_ids):
    _check_attention(q, k, v, segment_ids, kv_segment_ids)
    fwd, _, _ = flash_attention_kernels(q, k, v, causal, sm_scale, segment_ids is not None)
    out, lse = _run(fwd, [q, k, v, *_segment_operands(q, k, segment_ids, kv_segment_ids)], q.device)
    return out, lse.reshape(q.shape[:3])


def _flash_backward_tpu(q, k, v, out, grad_out, lse, causal, sm_scale, segment_ids, kv_segment_ids):
    _check_attention(q, k, v, segment_ids, kv_segment_ids)
    _, dkv, dq = flash_attention_kernels(q, k, v, causal, sm_scale, segment_ids is not None)
    operands = [q, k, v, out, grad_out, lse.reshape(*lse.shape, 1), *_segment_operands(q, k, segment_ids, kv_segment_ids)]
    dk, dv = _run(dkv, operands, q.device)
    (dq_,) = _run(dq, operands, q.device)
    return dq_, dk, dv


def _matmul_tpu(a, b):
    _check_matmul(a, b)
    (out,) = _run(matmul_kernel(a, b), [a.contiguous(), b.contiguous()], a.device)
    return out


def register() -> bool:
    """Registers the ops' ``tpu`` implementations if TorchTPU has named the ``tpu`` device
    (done at ``import torchtpu``; call again after importing ``torch_tpu`` later). Returns
    whether they are registered."""
    global _registered
    if _registered:
        return True
    if torch._C._get_privateuse1_backend_name() != "tpu":
        return False
    torch.library.register_kernel(ops.flash_attention_forward, "tpu", _flash_forward_tpu)
    torch.library.register_kernel(ops.flash_attention_backward, "tpu", _flash_backward_tpu)
    torch.library.register_kernel(ops.matmul, "tpu", _matmul_tpu)
    torch.library.register_kernel(norm.rms_norm_forward, "tpu", norm._forward_impl)
    torch.library.register_kernel(norm.rms_norm_backward, "tpu", norm._backward_impl)
    _registered = True
    return True


_registered = False
register()
