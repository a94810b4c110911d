"""The generic layer: any Rust op as a PyTorch op with no Python of its own
(torch.ops.torchtpu_ops.*), and tuning results reaching the calls PyTorch makes."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import torchtpu
from torchtpu.library import RustOp

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_every_registered_op_is_a_torch_op():
    assert set(torchtpu.OPS) == {f"torchtpu_ops::{n}" for n in torchtpu.library.names()}


def test_a_raw_op_runs_checks_and_compiles(rng):
    x, w = torch.randn(37, 200, generator=rng), torch.randn(1, 200, generator=rng)
    problem = json.dumps({"rows": 37, "dim": 200, "dtype": "f32", "affine": True, "eps": 1e-6})
    y, rstd = torch.ops.torchtpu_ops.rms_norm([x, w], problem)
    torch.testing.assert_close(y, F.rms_norm(x, (200,), w[0], 1e-6), atol=2e-5, rtol=2e-5)
    assert rstd.shape == (37, 1) and rstd.dtype == torch.float32
    opcheck(torch.ops.torchtpu_ops.rms_norm.default, ([x, w], problem))
    fn = torch.compile(lambda x, w: torch.ops.torchtpu_ops.rms_norm([x, w], problem)[0] + 1, fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(x, w), y + 1)
    with pytest.raises(ValueError, match="operand 0 must be f32 \\[37, 200\\]"):
        torch.ops.torchtpu_ops.rms_norm([x[:5], w], problem)


def _cli():
    """The `torchtpu` binary the test command built (`cargo test` builds it)."""
    for profile in ("debug", "release"):
        path = REPO / "target" / profile / "torchtpu"
        if path.exists():
            return path
    subprocess.run(["cargo", "build", "--quiet", "--bin", "torchtpu"], cwd=REPO, check=True)
    return REPO / "target" / "debug" / "torchtpu"


def test_what_torchtpu_tune_finds_is_what_the_next_call_uses(tmp_path):
    # Tune attention for one shape on the CPU with the CLI, into a fresh cache; then, in a new
    # process reading that cache, the op PyTorch calls picks the tuned blocks for that shape
    # (its problem has an explicit scale and the CLI's none: tuning ignores the scale).
    env = {**os.environ, "TORCHTPU_CACHE_DIR": str(tmp_path)}
    shape = "batch=1,heads=2,kv_heads=2,q_len=192,kv_len=192,head_dim=64,causal=1"
    out = subprocess.run([str(_cli()), "tune", "flash_attention", "--device", "cpu", "--set", shape, "--budget", "3", "--json"], env=env, capture_output=True, text=True, check=True)
    best = dict(kv.split("=") for kv in json.loads(out.stdout)["best_config"].split(","))
    code = """
import json, torch, torchtpu
from torchtpu import ops
q = torch.randn(1, 2, 192, 64)
problem = ops._attention_problem(q, q, True, 0.125, None)
print(json.dumps(ops._FORWARD.config(problem)))
torchtpu.flash_attention(q, q, q, causal=True, sm_scale=0.125)
"""
    used = json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout)
    # Blocks are fitted to the shape: rounded lengths cap them.
    assert used == {k: min(int(v), 192) for k, v in best.items()}, (used, best)
    # The cache is this test's own: this process (the default cache) still has the op's
    # table or heuristic blocks, named as the op's config.
    problem = {"batch": 1, "heads": 2, "kv_heads": 2, "q_len": 192, "kv_len": 192, "head_dim": 64, "dtype": "f32", "causal": True, "segments": False, "sm_scale": 0.125}
    assert set(RustOp("flash_attention").config(problem)) == {"bq", "bk", "bkc"}
