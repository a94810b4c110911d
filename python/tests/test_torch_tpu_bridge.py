"""TorchTPU's real kernel bridge (torch-tpu 0.2.0), driven as far as a machine without a TPU
allows: in a process of its own (torch_tpu_bridge.py; TorchTPU is a torch device backend the
other tests must not load), the `tpu` implementations register once TorchTPU names the
device, every shipped op's kernels register with the bridge, and a call on `tpu` tensors
reaches `call_custom_kernel` with the registered kernel and the right tensors. What needs a
TPU (the bridge parsing the artifact, compiling and running it) is not tested here."""

import json
import os
import pathlib
import subprocess
import sys

import torch

from torchtpu import library, tpu

TORCH_TPU = pathlib.Path(os.environ.get("TORCHTPU_TORCH_TPU", pathlib.Path.home() / ".cache/torchtpu/torch-tpu"))


def probe() -> dict:
    assert (TORCH_TPU / "torch_tpu").is_dir(), f"torch-tpu is not installed in {TORCH_TPU}: run scripts/deps.sh"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TORCH_TPU), *filter(None, [os.environ.get("PYTHONPATH")])]),
        # libtpu would query a cloud metadata server for minutes otherwise.
        "TPU_SKIP_MDS_QUERY": "1",
        "TPU_ACCELERATOR_TYPE": "v5litepod-4",
        "TPU_WORKER_HOSTNAMES": "localhost",
        "PYTHONWARNINGS": "ignore:<TorchTpu/Performance/TcMalloc/",
    }
    script = pathlib.Path(__file__).with_name("torch_tpu_bridge.py")
    run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in run.stdout.splitlines() if line.startswith("BRIDGE ")]
    assert run.returncode == 0 and lines, f"the bridge probe failed ({run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-5000:]}"
    return json.loads(lines[-1].removeprefix("BRIDGE "))


def test_the_real_bridge_takes_every_op_and_a_tpu_call_reaches_it():
    seen = probe()
    # Without a TPU TorchTPU names no device; once its loader names it, every op has a `tpu` kernel.
    assert seen["registered_without_a_tpu"] is False
    assert seen["registered"] is True
    assert seen["dispatch"] == {op._qualname: True for op, _ in tpu.implementations()}
    # Every op's kernels (f32 and bf16) register: the bridge returns None, then knows them.
    assert {(k["op"], k["dtype"]) for k in seen["kernels"]} == {(name, p.get("dtype")) for name in library.names() for p in library.RustOp(name).examples()}
    for k in seen["kernels"]:
        assert (k["before"], k["returned"], k["after"]) == (False, "None", True), k
    # Registration does not parse the module (a device's first call does), and host tensors
    # are refused at the door.
    assert seen["garbage_registers"] is True
    assert "expected tensor to be on tpu" in seen["host_tensors"]
    # A call on `tpu` tensors hands the bridge the registered kernel this process lowers too.
    matmul, rms = seen["calls"]
    meta = lambda *s, dtype=torch.bfloat16: torch.empty(*s, dtype=dtype, device="meta")  # noqa: E731
    kernel = tpu.matmul_kernel(meta(256, 384), meta(384, 512), chip="v5e")
    assert (matmul["name"], matmul["key"], matmul["registered"]) == (kernel.name, kernel.fingerprint, True)
    assert matmul["inputs"] == [[[256, 384], "bfloat16", "tpu"], [[384, 512], "bfloat16", "tpu"]]
    assert matmul["outputs"] == [[[256, 512], "bfloat16", "tpu"]]
    assert rms["name"] == "torchtpu_rms_norm_v5e" and rms["registered"] is True
    assert [o[0] for o in rms["outputs"]] == [[64, 1024], [64, 1]]
