"""Drives TorchTPU's real kernel bridge as far as a machine without a TPU allows, and prints
what it saw as JSON. Run by test_torch_tpu_bridge.py in a process of its own, with torch-tpu
on the path (it registers itself as a torch device backend, which the other tests must not
load)."""

import json

import torch
from torch_tpu import _loader
from torch_tpu._internal.pallas import tpu_torch_pallas as bridge

import torchtpu  # noqa: F401  (registers the `tpu` implementations when it can)
from torchtpu import library, tpu

seen = {}
# Without a TPU, TorchTPU names no device, so there is nothing to register for.
seen["registered_without_a_tpu"] = tpu.register()
# What TorchTPU's loader does on a host with TPUs: name the `tpu` device (lazily: nothing
# touches a device until a tensor's data is needed).
_loader._init_device("tpu")
seen["registered"] = tpu.register()
seen["dispatch"] = {op._qualname: torch._C._dispatch_has_kernel_for_dispatch_key(op._qualname, "PrivateUse1") for op, _ in tpu.implementations()}

# Every shipped op's kernels, registered through the bridge as a call on `tpu` tensors would.
seen["kernels"] = []
for name in library.names():
    op = library.RustOp(name)
    for problem in op.examples():
        kernel = tpu.op_kernel(op, problem, chip="v5e")
        before = bridge.lookup_custom_kernel(kernel.name, kernel.fingerprint)
        returned = bridge.register_custom_kernel(kernel.name, kernel.fingerprint, serialized_mlir_module=kernel.artifact)
        after = bridge.lookup_custom_kernel(kernel.name, kernel.fingerprint)
        seen["kernels"].append({"op": name, "dtype": problem.get("dtype"), "before": before, "returned": repr(returned), "after": after})

# Registration does not parse what it is given: on a device, the first call does.
bridge.register_custom_kernel("not_a_module", "0" * 32, serialized_mlir_module=b"not MLIR")
seen["garbage_registers"] = bridge.lookup_custom_kernel("not_a_module", "0" * 32)

# Running needs a TPU: the bridge refuses host tensors, and without a TPU TorchTPU aborts the
# process on the first device computation. So the call on `tpu` tensors is followed up to the
# bridge's door: what our path hands `call_custom_kernel`.
try:
    bridge.call_custom_kernel("not_a_module", "0" * 32, inputs=[torch.ones(2)], output_shapes=[torch.empty(2)], donate_argnums=[], device_assignment=[])
except RuntimeError as e:
    seen["host_tensors"] = str(e)


class Stop(Exception):
    pass


class Recorder:
    """The real bridge, but `call_custom_kernel` records its arguments and stops."""

    calls = []

    def __getattr__(self, name):
        return getattr(bridge, name)

    def call_custom_kernel(self, name, key, *, inputs, output_shapes, donate_argnums, device_assignment):
        shape = lambda t: [list(t.shape), str(t.dtype).removeprefix("torch."), t.device.type]  # noqa: E731
        self.calls.append({"name": name, "key": key, "registered": bridge.lookup_custom_kernel(name, key), "inputs": [shape(t) for t in inputs], "outputs": [shape(t) for t in output_shapes]})
        raise Stop


tpu._bridge = Recorder
a = torch.empty(256, 384, dtype=torch.bfloat16, device="tpu")
b = torch.empty(384, 512, dtype=torch.bfloat16, device="tpu")
x = torch.empty(64, 1024, dtype=torch.float32, device="tpu")
w = torch.empty(1024, dtype=torch.float32, device="tpu")
for call in (lambda: torch.ops.torchtpu.matmul(a, b), lambda: torchtpu.rms_norm(x, (1024,), w, 1e-6)):
    try:
        call()
    except Stop:
        pass
seen["calls"] = Recorder.calls
print("BRIDGE " + json.dumps(seen))
