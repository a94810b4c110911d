"""PyTorch ops from ops written in Rust: torchtpu's registry (``torchtpu_kernels::registry``),
or a user's crate's.

A Rust op describes itself: its problem (a JSON object: shapes, dtype, flags), its operand and
output types for a problem, its CPU run (PJRT) and the module a TPU runs. :class:`RustOp` turns
that into what a ``torch.library.custom_op`` needs — the CPU implementation, the fake (meta)
implementation and the ``tpu`` implementation through TorchTPU's kernel bridge — so that an op's
Python is only how its torch arguments map onto its problem and operands.
"""

from __future__ import annotations

import functools
import json
import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from torchtpu import _torchtpu

_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16, "i32": torch.int32, "i8": torch.int8, "bool": torch.bool}
_NAMES = {v: k for k, v in _DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The Rust name of ``dtype`` (``f32``, ``bf16``...), as problems spell it."""
    if dtype not in _NAMES:
        raise TypeError(f"torchtpu's kernels do not take {dtype}")
    return _NAMES[dtype]


def names(module=_torchtpu) -> list[str]:
    """The ops an extension module serves (default: torchtpu's own registry)."""
    return list(module.op_names())


class RustOp:
    """The Rust op called ``name``, run on a problem (a dict) over its operands.

    ``module`` is the extension module serving it: torchtpu's own by default, or a user's,
    built on the ``torchtpu-pyo3`` crate (``torchtpu_pyo3::ops::add_ops``).
    """

    def __init__(self, name: str, module=_torchtpu):
        if name not in names(module):
            raise ValueError(f"no Rust op `{name}`; the registered ones are {', '.join(names(module))}")
        self.name = name
        self.module = module

    @staticmethod
    def _key(problem: dict) -> str:
        # JSON has no NaN or infinity: they travel as "nan", "inf" and "-inf" (kernels::op::float).
        def wire(v):
            return v if not isinstance(v, float) or math.isfinite(v) else ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))

        return json.dumps({k: wire(v) for k, v in problem.items()}, sort_keys=True)

    @functools.lru_cache(maxsize=1024)
    def _signature(self, key: str):
        inputs, outputs = self.module.op_signature(self.name, key)
        as_torch = lambda types: tuple((tuple(shape), _DTYPES[d]) for shape, d in types)  # noqa: E731
        return as_torch(inputs), as_torch(outputs)

    def signature(self, problem: dict):
        """((shape, dtype) of each operand, (shape, dtype) of each output) for ``problem``."""
        return self._signature(self._key(problem))

    def fake_outputs(self, problem: dict, like: Tensor) -> list[Tensor]:
        """Uninitialized outputs of ``problem`` on ``like``'s device: a fake implementation."""
        _, outputs = self.signature(problem)
        return [like.new_empty(shape, dtype=dtype) for shape, dtype in outputs]

    def __call__(self, problem: dict, operands: Sequence[Tensor]) -> list[Tensor]:
        """The outputs of the op on ``operands``, on their device: CPU through PJRT, a TorchTPU
        ``tpu`` device through the kernel bridge."""
        device = operands[0].device if operands else torch.device("cpu")
        if device.type == "tpu":
            from torchtpu import tpu

            return tpu._run(tpu.op_kernel(self, problem), [t.contiguous() for t in operands], device)
        capsules = self.module.op_run(self.name, self._key(problem), [t.contiguous() for t in operands])
        return [torch.from_dlpack(c) for c in capsules]

    def config(self, problem: dict) -> dict:
        """The config (block sizes) the CPU run of ``problem`` uses: what ``torchtpu tune``
        cached for it, else the tuned table's entry, else the op's heuristic."""
        return json.loads(self.module.op_config(self.name, self._key(problem)))

    def tpu_module(self, problem: dict, chip: str) -> tuple[str, bytes]:
        """The StableHLO module (Mosaic in a ``tpu_custom_call``) this op runs on ``chip``: its
        text, and the same module as a StableHLO portable artifact (MLIR bytecode)."""
        return self.module.op_tpu_module(self.name, self._key(problem), chip)

    def example(self) -> dict:
        """The op's example problem (the one ``torchtpu list`` shows)."""
        return json.loads(self.module.op_example(self.name))

    def examples(self) -> list[dict]:
        """The example problem in each float dtype the kernels take (f32, bf16) when its dtype
        is one of them, else the example alone."""
        example = self.example()
        if example.get("dtype") not in ("f32", "bf16"):
            return [example]
        return [{**example, "dtype": dtype} for dtype in ("f32", "bf16")]


def register_ops(module, namespace: str) -> list[str]:
    """Makes every op ``module`` serves a PyTorch op, with no Python of its own:
    ``torch.ops.<namespace>.<op>(operands, problem)`` runs it on ``operands`` (tensors in the
    op's operand types) for ``problem`` (the JSON of its problem), on CPU or ``tpu`` tensors,
    with a fake implementation from its signature (so ``opcheck``, ``torch.compile`` and
    ``torch.export`` take it). No autograd: a differentiable op pairs its forward and backward
    ops in a ``custom_op`` of its own. Returns the qualified names."""
    qualified = []
    for name in names(module):
        op = RustOp(name, module)
        qualname = f"{namespace}::{name}"

        def run(operands: list[Tensor], problem: str, op=op) -> list[Tensor]:
            return op(json.loads(problem), operands)

        custom = torch.library.custom_op(qualname, run, mutates_args=(), schema="(Tensor[] operands, str problem) -> Tensor[]")

        def fake(operands, problem, op=op):
            like = operands[0] if operands else torch.empty(0)
            return op.fake_outputs(json.loads(problem), like)

        custom.register_fake(fake)
        qualified.append(qualname)
    return qualified


def check_tensor(name: str, t, dtypes=(torch.float32, torch.bfloat16)) -> None:
    """``t`` is a tensor of one of ``dtypes``: else the error a user sees."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, not {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} is {t.dtype}; torchtpu's kernels take {' or '.join(str(d) for d in dtypes)}")


def check_int_tensor(name: str, t) -> None:
    """``t`` is a tensor of an integer dtype (a table a kernel reads): else the error a user sees."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, not {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor; got {t.dtype}")


def int32_clamped(t: Tensor, low: int, high: int) -> Tensor:
    """``t`` as the int32 a kernel's table takes, clamped in int64 into ``[low, high]`` first
    (bounds just outside the valid range): a value past int32 stays out of range, where the
    Rust check of the table refuses it, rather than wrapping round into it."""
    return t.to(torch.int64).clamp(low, high).to(torch.int32)


def same_device(**tensors: Optional[Tensor]) -> None:
    """The tensors given (``None`` skipped) are on one device: else the error a user sees."""
    present = {n: t for n, t in tensors.items() if t is not None}
    if len({t.device for t in present.values()}) > 1:
        where = ", ".join(f"{n} on {t.device}" for n, t in present.items())
        raise ValueError(f"all tensors must be on one device; got {where}")
