"""The TPU path: our kernels on TorchTPU ``tpu`` tensors.

For a call on ``tpu`` tensors (:class:`torchtpu.library.RustOp` sends them here) we lower the
op for the chip (with that chip's tuned config) to a StableHLO module holding the Mosaic kernel
in a ``tpu_custom_call``, serialized as a StableHLO portable artifact (as ``jax.export`` hands
TorchTPU its Pallas kernels), register it once with TorchTPU's custom-kernel bridge (``tpu_torch_pallas.register_custom_kernel``, the door
TorchTPU's own Pallas kernels use) under a fingerprint of the module, and run it with
``call_custom_kernel``. Everything up to the bridge is testable without a TPU:
:func:`flash_attention_kernels` and :func:`matmul_kernel` give what a call would register, and
:func:`compile` compiles it with libtpu.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Optional

import torch
from torch import Tensor

from torchtpu import _torchtpu, cross_entropy, glu, grouped_matmul, norm, ops, paged_attention, quantized, rope
from torchtpu.library import check_tensor
from torchtpu.ops import _check_attention

#: The TPU generations torchtpu compiles for (torchtpu_hw::Chip).
CHIPS = tuple(_torchtpu.chips())


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
    #: blake2b-128 of the artifact (TorchTPU fingerprints its Pallas modules the same way, from
    #: their text): the key the bridge registers the kernel under.
    fingerprint: str
    #: StableHLO text: ``func.func public @main`` calling the Mosaic kernel via ``tpu_custom_call``.
    module: str
    #: The same module as a StableHLO portable artifact (VHLO in MLIR bytecode): what the bridge
    #: is given.
    artifact: bytes
    #: (shape, dtype) of each operand, in order.
    inputs: tuple
    #: (shape, dtype) of each result, in order.
    outputs: tuple


def _kernel(name: str, module: str, artifact: bytes, inputs, outputs) -> TpuKernel:
    fingerprint = hashlib.blake2b(artifact, digest_size=16).hexdigest()
    return TpuKernel(name, fingerprint, module, artifact, tuple(inputs), tuple(outputs))


def flash_attention_kernels(q: Tensor, k: Tensor, v: Tensor, causal: bool, sm_scale: float, with_segments: bool, chip: Optional[str] = None):
    """The (forward, dK/dV, dQ) kernels attention on these tensors (any device, ``meta``
    included: only shapes and dtypes are read) registers for ``chip``."""
    _check_attention(q, k, v, None, None)
    problem = ops._attention_problem(q, k, causal, sm_scale, q if with_segments else None)
    return tuple(op_kernel(op, problem, chip) for op in (ops._FORWARD, ops._DKV, ops._DQ))


def matmul_kernel(a: Tensor, b: Tensor, chip: Optional[str] = None) -> TpuKernel:
    """The kernel ``a @ b`` registers for ``chip``."""
    check_tensor("a", a)
    return op_kernel(ops._MATMUL, ops._matmul_problem(a, b), chip)


def op_kernel(op, problem: dict, chip: Optional[str] = None) -> TpuKernel:
    """The kernel a registered Rust op (a :class:`torchtpu.library.RustOp`) registers for
    ``problem`` on ``chip``: lowered once per op, problem and chip in a process, as the CPU
    runs compile once."""
    return _op_kernel(op, op._key(problem), chip or default_chip())


@functools.lru_cache(maxsize=1024)
def _op_kernel(op, key: str, chip: str) -> TpuKernel:
    problem = json.loads(key)
    inputs, outputs = op.signature(problem)
    return _kernel(f"torchtpu_{op.name}_{chip}", *op.tpu_module(problem, chip), inputs, outputs)


def compile(kernel: TpuKernel, chip: Optional[str] = None) -> int:
    """Compiles ``kernel``'s artifact (what the bridge is given) with libtpu for ``chip`` (no
    TPU needed); returns the code size in bytes, or raises ``RuntimeError`` with the
    compiler's message."""
    return _torchtpu.compile_for_tpu(kernel.artifact, chip or default_chip())


def _bridge():
    from torch_tpu._internal.pallas import tpu_torch_pallas  # only present with TorchTPU

    return tpu_torch_pallas


def _run(kernel: TpuKernel, inputs, device) -> list:
    bridge = _bridge()
    if not bridge.lookup_custom_kernel(kernel.name, kernel.fingerprint):
        bridge.register_custom_kernel(kernel.name, kernel.fingerprint, serialized_mlir_module=kernel.artifact)
    outputs = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in kernel.outputs]
    return bridge.call_custom_kernel(kernel.name, kernel.fingerprint, inputs=list(inputs), output_shapes=outputs, donate_argnums=[], device_assignment=[])


def implementations() -> list:
    """(custom op, its ``tpu`` implementation) for every op with a TPU path."""
    return [
        (ops.flash_attention_forward, ops._flash_forward),
        (ops.flash_attention_backward, ops._flash_backward),
        (ops.matmul, ops._matmul),
        (norm.rms_norm_forward, norm._rms_forward),
        (norm.rms_norm_backward, norm._rms_backward),
        (norm.layer_norm_forward, norm._layer_forward),
        (norm.layer_norm_backward, norm._layer_backward),
        (glu.glu_forward, glu._forward),
        (glu.glu_backward, glu._backward),
        (glu.glu_linear_forward, glu._glu_linear),
        (glu.glu_linear_train, glu._glu_linear_saving),
        (rope.rope_forward, rope._forward),
        (rope.rope_backward, rope._backward),
        (cross_entropy.linear_cross_entropy_forward, cross_entropy._forward),
        (cross_entropy.linear_cross_entropy_backward_h, cross_entropy._backward_h),
        (cross_entropy.linear_cross_entropy_backward_weight, cross_entropy._backward_weight),
        (grouped_matmul.gmm_op, grouped_matmul._gmm),
        (grouped_matmul.tgmm_op, grouped_matmul._tgmm),
        (quantized.quantized_linear_op, quantized._quantized_linear),
        (paged_attention.ragged_paged_attention_op, paged_attention._ragged_paged_attention),
    ]


def register() -> bool:
    """Registers the ops' ``tpu`` implementations if TorchTPU has named the ``tpu`` device
    (done at ``import torchtpu``; call again after importing ``torch_tpu`` later). Returns
    whether they are registered."""
    global _registered
    if _registered:
        return True
    if torch._C._get_privateuse1_backend_name() != "tpu":
        return False
    for op, implementation in implementations():
        torch.library.register_kernel(op, "tpu", implementation)
    _registered = True
    return True


_registered = False
register()
