"""torchtpu's kernels as PyTorch ops.

``import torchtpu`` registers ``torch.ops.torchtpu.flash_attention``,
``torch.ops.torchtpu.matmul``, ``torch.ops.torchtpu.rms_norm``, ``torch.ops.torchtpu.layer_norm`` and the gated linear units
(``torchtpu.swiglu``, ``torchtpu.geglu``, fused with their projections in
``torchtpu.glu_linear``), rotary embeddings (``torchtpu.rope``,
``torchtpu.apply_rotary_pos_emb``) the fused LM-head loss (``torchtpu.linear_cross_entropy``) and grouped matmul for
mixture-of-experts (``torchtpu.gmm``, ``torchtpu.tgmm``) and int8 linear layers
(``torchtpu.quantized_linear``: weight-only and w8a8), and serving attention over a paged KV
cache (``torchtpu.ragged_paged_attention``, vLLM's TPU kernel's arguments) (torch also imports this package by itself through its
``torch.backends`` entry point). On CPU tensors they run our kernels through the PJRT CPU
plugin; on TorchTPU ``tpu`` tensors they run the same kernels, lowered to Mosaic, on the TPU.
On DTensors they run sharded (``torchtpu.sharding``).
"""



def _autoload() -> None:
    """torch's device-backend autoload hook: importing the package is all it takes."""


# Defined before anything imports torch: `import torchtpu` before `import torch` makes torch
# run its backend autoload, which looks this hook up on the partly imported package.
from torchtpu import ops as _ops  # noqa: E402
from torchtpu import library  # noqa: E402
from torchtpu import cross_entropy as _cross_entropy  # noqa: E402
from torchtpu import glu as _glu  # noqa: E402
from torchtpu import grouped_matmul as _grouped_matmul  # noqa: E402
from torchtpu import norm as _norm  # noqa: E402
from torchtpu import paged_attention as _paged_attention  # noqa: E402
from torchtpu import quantized as _quantized  # noqa: E402
from torchtpu import rope as _rope  # noqa: E402
from torchtpu import sharding  # noqa: E402
from torchtpu import tpu  # noqa: E402
from torchtpu.routing import drop_in  # noqa: E402

#: Every registered Rust op as ``torch.ops.torchtpu_ops.<op>(operands, problem)``, no Python each.
OPS = library.register_ops(library._torchtpu, "torchtpu_ops")

flash_attention = _ops.flash_attention
matmul = _ops.matmul_like_torch
rms_norm = _norm.rms_norm
layer_norm = _norm.layer_norm
swiglu = _glu.swiglu
geglu = _glu.geglu
glu_linear = _glu.glu_linear
rope = _rope.rope
apply_rotary_pos_emb = _rope.apply_rotary_pos_emb
linear_cross_entropy = _cross_entropy.linear_cross_entropy
gmm = _grouped_matmul.gmm
tgmm = _grouped_matmul.tgmm
quantized_linear = _quantized.quantized_linear
ragged_paged_attention = _paged_attention.ragged_paged_attention

__all__ = ["flash_attention", "matmul", "rms_norm", "layer_norm", "swiglu", "geglu", "glu_linear", "rope", "apply_rotary_pos_emb", "linear_cross_entropy", "gmm", "tgmm", "quantized_linear", "ragged_paged_attention", "drop_in", "library", "sharding", "tpu"]
